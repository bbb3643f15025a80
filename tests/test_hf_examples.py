"""Both hf_examples scripts end to end on tiny files generated here (a few hundred CPU steps)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from repo_scripts import run_repo_script


def run_example(script: str, *args: object) -> subprocess.CompletedProcess:
    result = run_repo_script(f"hf_examples/{script}", *args, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_parallel(directory: Path) -> None:
    """German-looking source words; the English side is the sentence reversed and renamed."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for split, n in (("train", 400), ("valid", 20)):
        src, tgt = [], []
        for _ in range(n):
            words = [rng.randrange(15) for _ in range(rng.randint(3, 7))]
            src.append(" ".join(f"quelle{i}" for i in words))
            tgt.append(" ".join(f"target{i}" for i in reversed(words)))
        (directory / f"{split}.de").write_text("\n".join(src) + "\n")
        (directory / f"{split}.en").write_text("\n".join(tgt) + "\n")


def write_ptb_layout(directory: Path) -> None:
    """Text from a Markov chain where each word has two equally likely successors."""
    rng = random.Random(0)
    successors = {w: rng.sample(range(30), 2) for w in range(30)}
    directory.mkdir(parents=True)
    for split, n in (("train", 600), ("valid", 60), ("test", 60)):
        lines = []
        for _ in range(n):
            word, sentence = rng.randrange(30), []
            for _ in range(rng.randint(5, 12)):
                sentence.append(f"w{word}")
                word = rng.choice(successors[word])
            lines.append(" " + " ".join(sentence) + " ")
        (directory / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")


def test_run_translation_reports_bleu(tmp_path: Path) -> None:
    write_parallel(tmp_path / "data")
    out = tmp_path / "out"
    result = run_example("run_translation.py", "--data-dir", tmp_path / "data", "--vocab-size", 200,
                         "--d-model", 64, "--layers", 2, "--heads", 4, "--ffn-dim", 128, "--dropout", 0,
                         "--max-steps", 500, "--batch-size", 32, "--beams", 2, "--max-length", 32,
                         "--optimizer", "softadam", "--lr", 2.0, "--output-dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "softadam"
    # Beam search decodes the reversal task; an untrained model scores 0.
    assert metrics["eval_bleu"] > 30, metrics
    assert f"valid BLEU {metrics['eval_bleu']:.2f}" in result.stdout
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_run_language_modeling_reports_perplexity(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    out = tmp_path / "out"
    run_example("run_language_modeling.py", "--data-dir", tmp_path / "ptb", "--hidden-size", 32, "--layers", 1,
                "--heads", 2, "--block-size", 32, "--max-steps", 100, "--dropout", 0, "--output-dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    # 31 types (30 words + <eos>): guessing uniformly scores 31; the chain allows about 2.
    assert metrics["valid_ppl"] < 10 and metrics["test_ppl"] < 10, metrics


@pytest.mark.parametrize("optimizer, lr", [("adamw", 3e-3), ("sgd", 0.5)])
def test_baselines_run_through_the_same_script(tmp_path: Path, optimizer: str, lr: float) -> None:
    write_ptb_layout(tmp_path / "ptb")
    run_example("run_language_modeling.py", "--data-dir", tmp_path / "ptb", "--hidden-size", 32, "--layers", 1,
                "--heads", 2, "--block-size", 32, "--max-steps", 60, "--dropout", 0, "--optimizer", optimizer,
                "--lr", lr, "--lr-scheduler", "step", "--warmup-steps", 0.1, "--output-dir", tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer"] == optimizer and metrics["valid_ppl"] < 31


def test_missing_data_fails_clearly(tmp_path: Path) -> None:
    result = run_repo_script("hf_examples/run_language_modeling.py", "--data-dir", tmp_path)
    assert result.returncode == 2 and "ptb.train.txt" in result.stderr
