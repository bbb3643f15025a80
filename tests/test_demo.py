"""The PTB loader and the demo CLI, on a small corpus generated here."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from repo_scripts import run_repo_script
from softadam_nlp.data.ptb import batchify, find_ptb_dir, load_ptb


def write_tiny_ptb(directory: Path) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)] + ["<unk>", "N"]
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 400), ("valid", 60), ("test", 60)):
        text = "\n".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + " " for _ in range(lines))
        # Every word occurs in train, so valid/test have no out-of-vocabulary words.
        if split == "train":
            text += "\n " + " ".join(words) + " "
        (directory / f"ptb.{split}.txt").write_text(text + "\n")


def test_loader_checks_md5_and_builds_vocab(tmp_path: Path) -> None:
    write_tiny_ptb(tmp_path / "ptb")
    with pytest.raises(ValueError, match="md5"):
        load_ptb(tmp_path)
    corpus = load_ptb(tmp_path, verify=False)
    assert corpus.directory == tmp_path / "ptb"
    assert corpus.vocab_size == 33  # 32 words + <eos>
    train_lines = (tmp_path / "ptb" / "ptb.train.txt").read_text().splitlines()
    assert corpus.splits["train"].numel() == sum(len(line.split()) + 1 for line in train_lines)
    assert corpus.vocab[corpus.splits["train"][len(train_lines[0].split())].item()] == "<eos>"


def test_loader_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTADAM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        find_ptb_dir(tmp_path / "nowhere")


def test_batchify_makes_contiguous_streams() -> None:
    stream = batchify(torch.arange(23), 4)
    assert stream.shape == (5, 4)
    assert stream[:, 1].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="batch_size"):
        batchify(torch.arange(4), 0)


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return run_repo_script("scripts/demo.py", *args)


def test_demo_trains_tabulates_plots_and_reuses_finished_runs(tmp_path: Path) -> None:
    write_tiny_ptb(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data-dir", str(tmp_path / "data"), "--no-verify", "--steps", "6", "--eval-every", "3", "--out", str(out)]
    first = run_demo(*args)
    assert first.returncode == 0, first.stderr
    assert "md5 NOT verified" in first.stdout
    for name in ("softadam", "sgd", "adam"):
        record = json.loads((out / f"{name}.json").read_text())
        assert [p["step"] for p in record["curve"]] == [3, 6]
        assert record["valid_ppl"] < 33 * 3  # learnt something beyond a blown-up model
        assert f"| {record['spec']} | {record['valid_ppl']:.2f} |" in first.stdout
    assert (out / "valid_ppl_curves.png").stat().st_size > 1000

    second = run_demo(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("reusing finished run") == 3


def test_demo_without_data_fails_clearly(tmp_path: Path) -> None:
    result = run_demo("--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Penn Treebank not found" in result.stderr
