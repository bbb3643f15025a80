"""The PTB loader and `make demo` (scripts/demo.py, tiny preset), on data generated here."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from fairseq_cli import make_translation_data_bin
from repo_scripts import run_repo_script

from softadam_nlp.data import data_roots
from softadam_nlp.data.ptb import batchify, find_ptb_dir, load_ptb
from softadam_nlp.data.translation import find_translation_source
from softadam_nlp.experiments.reporting import demo_reading, unigram_perplexity


def write_tiny_ptb(directory: Path) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)] + ["<unk>", "N"]
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 400), ("valid", 60), ("test", 60)):
        text = "\n".join(
            " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + " " for _ in range(lines)
        )
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


def run_demo(*args: object) -> subprocess.CompletedProcess:
    return run_repo_script("scripts/demo.py", *args, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def test_demo_runs_both_pipelines_summarizes_plots_and_reuses_finished_runs(tmp_path: Path) -> None:
    write_tiny_ptb(tmp_path / "data" / "ptb")
    data_bin = make_translation_data_bin(tmp_path / "translation")
    out = tmp_path / "out"
    args = ("--data-dir", tmp_path / "data", "--data-bin", data_bin, "--no-verify", "--preset", "tiny", "--out", out)
    first = run_demo(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"PTB: local copy in {tmp_path / 'data' / 'ptb'}" in first.stdout
    assert f"translation: the data-bin {data_bin}" in first.stdout
    for experiment, optimizers in (("ptb", ("softadam", "sgd", "adam")), ("iwslt14", ("softadam", "sgd", "adamw"))):
        for optimizer in optimizers:
            record = json.loads((out / experiment / f"{optimizer}-seed1.json").read_text())
            assert record["preset"] == "tiny" and len(record["train_curve"]) >= 2
    assert (out / "train_loss.png").stat().st_size > 20_000  # both pipelines' curves, one figure
    summary = (out / "summary.md").read_text()
    assert "| softadam | 1 |" in summary and "66.64" in summary and "34.44" in summary  # paper columns of both tables
    # The unigram model of the generated PTB text (the test data-bin has no text beside it),
    # and the reading that points to the CPU-scale tables.
    ptb_dir = tmp_path / "data" / "ptb"
    unigram = unigram_perplexity(
        (ptb_dir / "ptb.train.txt").read_text().splitlines(), (ptb_dir / "ptb.valid.txt").read_text().splitlines()
    )
    assert f"Unigram model of the training text: val ppl {unigram:.1f}." in summary
    assert "Unigram model: not computed" in summary
    assert "docs/RESULTS.md" in summary.split("##")[0] and f"unigram model's {unigram:.0f}" in summary
    assert "- total:" in summary and summary in first.stdout and "- ptb softadam:" in summary
    # Progress shows while the runs train: fairseq's summarized log lines.
    assert "epoch 1 update" in first.stdout

    second = run_demo(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("this run has finished (same settings): skipping") == 6


def test_demo_without_data_says_what_it_tried(tmp_path: Path) -> None:
    result = run_demo("--data-dir", tmp_path / "missing", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "PTB: no local copy found" in result.stdout
    assert "could not load ptb-text-only/ptb_text_only" in result.stderr


def test_translation_source_prefers_iwslt_then_multi30k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTADAM_DATA_DIR", raising=False)
    assert find_translation_source(tmp_path) is None
    (tmp_path / "multi30k").mkdir()
    (tmp_path / "multi30k" / "train.de.gz").write_bytes(b"")
    assert find_translation_source(tmp_path) == ("multi30k", tmp_path / "multi30k")
    (tmp_path / "iwslt14").mkdir()
    (tmp_path / "iwslt14" / "de-en.tgz").write_bytes(b"")
    assert find_translation_source(tmp_path) == ("iwslt14", tmp_path / "iwslt14" / "de-en.tgz")
    # $SOFTADAM_DATA_DIR is searched after --data-dir; ../shared/data only without one.
    monkeypatch.setenv("SOFTADAM_DATA_DIR", str(tmp_path))
    assert find_translation_source(tmp_path / "empty") == ("iwslt14", tmp_path / "iwslt14" / "de-en.tgz")
    assert data_roots(tmp_path / "empty") == [tmp_path / "empty", tmp_path]


def test_unigram_perplexity_counts_one_eos_per_line() -> None:
    # counts a:2, b:1, eos:1 of 4; "a b <eos>" has probabilities 1/2, 1/4, 1/4
    assert unigram_perplexity(["a a b", ""], ["a b"], eos="<eos>") == pytest.approx(32 ** (1 / 3))
    # an unseen token counts as seen once
    assert unigram_perplexity(["a"], ["c"], eos="<eos>") == pytest.approx(2.0)


def test_demo_reading_names_an_optimizer_left_on_the_plateau() -> None:
    records = [{"optimizer": "sgd", "valid_ppl": 300.0}, {"optimizer": "adamw", "valid_ppl": 40.0}]
    reading = demo_reading({"iwslt14": (records, 279.0), "ptb": ([{"optimizer": "adam", "valid_ppl": 400.0}], 687.0)})
    assert "sgd (translation) did not" in reading and "40-300 on translation" in reading
    assert demo_reading({"ptb": ([{"optimizer": "adam", "valid_ppl": 400.0}], 687.0)}).startswith(
        "Every optimizer learned more than word frequencies: validation perplexity 400 on PTB against the unigram "
        "model's 687."
    )
