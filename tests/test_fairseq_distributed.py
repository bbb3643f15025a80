"""fairseq-train with SoftAdam in 2 processes on the CPU (gloo), trained and resumed.

fairseq launches one process per GPU itself; on the CPU each rank is started with its
own --distributed-rank (what torchrun does per node on GPUs) and the legacy_ddp backend,
because fairseq's c10d wrapper passes GPU device ids to torch's DDP even with --cpu.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from fairseq_cli import BIN, make_reversal_data_bin, train_log, translation_args


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reversal_data_bin(tmp_path_factory.mktemp("raw"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_ranks(data_bin: Path, save_dir: Path, *extra: object) -> list[dict]:
    """Both ranks of one fairseq-train run; returns rank 0's per-update log."""
    port = free_port()
    # Two batches of 50 sentences per epoch, one per rank, without dropout: which rank gets
    # which batch may change after a resume (fairseq does not replay its batch order), but
    # the averaged gradient is the same up to float rounding.
    args = translation_args(
        data_bin,
        save_dir,
        "--train-subset",
        "valid",
        "--batch-size",
        50,
        "--max-tokens",
        4000,
        "--required-batch-size-multiple",
        1,
        "--dropout",
        0.0,
        "--disable-validation",
        *extra,
        total_updates=30,
    )
    distributed = [
        "--distributed-world-size",
        2,
        "--distributed-init-method",
        f"tcp://127.0.0.1:{port}",
        "--distributed-no-spawn",
        "--distributed-backend",
        "gloo",
        "--ddp-backend",
        "legacy_ddp",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [str(BIN / "fairseq-train"), *map(str, args + distributed), "--distributed-rank", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    failed = [
        f"rank {rank} failed:\n{output[-3000:]}"
        for rank, (process, output) in enumerate(zip(ranks, outputs))
        if process.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    assert "distributed init (rank 1)" in outputs[1]
    return train_log(subprocess.CompletedProcess([], 0, outputs[0], ""))


def test_two_processes_train_and_resume_like_an_uninterrupted_run(data_bin: Path, tmp_path: Path) -> None:
    uninterrupted = train_two_ranks(data_bin, tmp_path / "straight", "--max-update", 30)
    assert [int(r["num_updates"]) for r in uninterrupted] == list(range(1, 31))
    assert [int(r["bsz"]) for r in uninterrupted] == [100] * 30  # both ranks' batches in every update
    losses = [float(r["loss"]) for r in uninterrupted]
    assert sum(losses[-5:]) < sum(losses[:5]) - 5 * 1.0

    train_two_ranks(data_bin, tmp_path / "first", "--max-update", 20)
    checkpoint = tmp_path / "first" / "checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["last_optimizer_state"]
    assert all(s["step"].item() == 20 for s in state["state"].values())
    resumed = train_two_ranks(data_bin, tmp_path / "second", "--max-update", 30, "--restore-file", checkpoint)
    assert [int(r["num_updates"]) for r in resumed] == list(range(21, 31))
    expected = {r["num_updates"]: r for r in uninterrupted}
    assert all(r["lr"] == expected[r["num_updates"]]["lr"] for r in resumed)
    assert max(abs(float(r["loss"]) - float(expected[r["num_updates"]]["loss"])) for r in resumed) <= 0.002
