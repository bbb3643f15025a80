"""Experiment building blocks; the command-line entry points are in scripts/ and hf_examples/."""
