"""Classical sequential-recommendation baselines (SASRec, BERT4Rec via RecBole) that score the same candidate files as every other method."""
