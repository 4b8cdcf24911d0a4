"""Offline side of hybrid scoring: build the behaviour index from a dataset, fit the gate."""
