"""The ``instructrec`` subcommands training owns, registered through the ``instructrec.commands``
entry point (see :mod:`instructrec.cli`). Light on purpose: names and help only."""

from instructrec.cli import Command

COMMANDS = (
    Command("annotate", "instructrec.training.annotate.cli", "generate fine-grained instruction annotations with a teacher"),
    Command("train", "instructrec.training.tune_cli", "instruction-tune a seq2seq model"),
    Command("promote", "instructrec.training.promote",
            "replace the shipped model (models/minilm-games) by a relay leg's only when it gains HR@1"),
    Command("soup", "instructrec.training.soup",
            "average the weights of relay legs (and the shipped model) into one candidate for promote"),
    Command("curve", "instructrec.training.curve", "the learning curve of a training run (table, PNG, README block)"),
    Command("evaluate", "instructrec.training.evaluate.cli",
            "evaluate models and baselines with the paper's protocol, write the report"),
    Command("catalogue", "instructrec.training.catalogue_cli",
            "build the item catalogue /recommend generates from (titles tokenised for a model)"),
    Command("behaviour", "instructrec.training.hybrid.behaviour_cli",
            "build the behaviour index hybrid scoring reads (item-to-item neighbours of a dataset)"),
    Command("sequential", "instructrec.training.hybrid.sequential",
            "train the hybrid's sequential signal (SASRec in plain torch; resumable, early stopping)"),
    Command("gate", "instructrec.training.hybrid.gate_cli", "fit the hybrid gate of a model on validation cases"),
    Command("eval-client", "instructrec.training.evaluate.client_cli", "evaluate a live /rerank service on a candidate file"),
)
