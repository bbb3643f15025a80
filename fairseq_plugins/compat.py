"""Let fairseq 0.12 resume from its own checkpoints on torch >= 2.6.

torch 2.6 made `torch.load` default to `weights_only=True`; fairseq 0.12 calls it
without that argument in two places that matter here:

- loading a checkpoint file: its checkpoints hold an `argparse.Namespace` (the legacy
  `args` entry), so `--restore-file`, resuming from `checkpoint_last.pt` and
  `fairseq-generate` fail with "Unsupported global: argparse.Namespace";
- distributed resume: rank 0 loads the checkpoint, turns its config into an omegaconf
  `DictConfig` and sends the whole state to the other ranks through
  `torch.save`/`torch.load` (tensors replaced by fairseq's `_TensorPlaceholder`),
  where the other ranks fail on the omegaconf classes and on that placeholder.

Allow-listing these plain containers (and the builtin types their metadata names)
keeps the safe loader for everything else. Importing `fairseq_plugins`
(`--user-dir fairseq_plugins`) does it.
"""

import argparse
import collections
import typing

import torch


def _omegaconf_containers() -> list[object]:
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        FloatNode,
        IntegerNode,
        StringNode,
    ]


def allow_fairseq_checkpoints() -> None:
    """Let `torch.load(weights_only=True)` read fairseq 0.12 checkpoints and the states
    its ranks send each other when resuming."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        from fairseq.distributed.utils import _TensorPlaceholder

        add_safe_globals(
            [
                argparse.Namespace,
                _TensorPlaceholder,
                *_omegaconf_containers(),
                typing.Any,
                collections.defaultdict,
                dict,
                list,
                int,
                float,
                str,
                bool,
            ]
        )
