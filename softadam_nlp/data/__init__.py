"""Corpus loaders for the experiments: each verifies its files before use."""
