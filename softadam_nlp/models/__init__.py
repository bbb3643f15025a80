"""Models for the paper's experiments."""
