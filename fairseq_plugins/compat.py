"""Let fairseq 0.12 resume from its own checkpoints on torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``; fairseq 0.12 calls it
without that argument, and its checkpoints hold an ``argparse.Namespace`` (the
legacy ``args`` entry), so ``--restore-file``, resuming from ``checkpoint_last.pt``
and ``fairseq-generate`` all fail with "Unsupported global: argparse.Namespace".
Allow-listing that one plain attribute container keeps the safe loader for
everything else. Importing ``fairseq_plugins`` (``--user-dir fairseq_plugins``) does it.
"""

import argparse

import torch


def allow_fairseq_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read fairseq 0.12 checkpoints."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        add_safe_globals([argparse.Namespace])
