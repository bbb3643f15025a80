"""Run the repository's command-line scripts as a user would: a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_repo_script(relative_path: str, *args: object, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """``python REPO/relative_path ARGS`` with the repository importable; output captured."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, str(REPO / relative_path), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def run_under_torchrun(
    relative_path: str, *args: object, ranks: int = 2, timeout: int = 1200, **env: str
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node RANKS REPO/relative_path ARGS``: CPU processes
    with one thread each (they share the machine's cores), the repository importable,
    output captured."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return subprocess.run(
        [*command, str(REPO / relative_path), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
