"""Both hf_examples scripts end to end on tiny files generated here (a few hundred CPU steps)."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_scripts import REPO, run_repo_script

from softadam_nlp.data.ptb import PTB_HUB_SPLITS, load_ptb_hub, mikolov_text


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
    for lang in ("de", "en"):  # gzipped files are read too (Multi30k comes so)
        plain = tmp_path / "data" / f"valid.{lang}"
        (tmp_path / f"valid.{lang}.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    out = tmp_path / "out"
    result = run_example(
        "run_translation.py",
        "--data-dir",
        tmp_path / "data",
        "--valid-src",
        tmp_path / "valid.de.gz",
        "--valid-tgt",
        tmp_path / "valid.en.gz",
        "--step-times",
        tmp_path / "steps.json",
        "--vocab-size",
        200,
        "--d-model",
        64,
        "--layers",
        2,
        "--heads",
        4,
        "--ffn-dim",
        128,
        "--dropout",
        0,
        "--max-steps",
        500,
        "--batch-size",
        32,
        "--beams",
        2,
        "--max-length",
        32,
        "--optimizer",
        "softadam",
        "--lr",
        2.0,
        "--output-dir",
        out,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "softadam"
    # Beam search decodes the reversal task; an untrained model scores 0.
    assert metrics["eval_bleu"] > 30, metrics
    assert f"valid BLEU {metrics['eval_bleu']:.2f}" in result.stdout
    assert (out / "tokenizer" / "tokenizer.json").exists()
    steps = json.loads((tmp_path / "steps.json").read_text())  # scripts/gpu_check.py times steps from these
    assert len(steps["step_end_seconds"]) == 500 and steps["batch_size"] == 32 and steps["train_pairs"] == 400
    assert steps["step_end_seconds"] == sorted(steps["step_end_seconds"]) and 3 < steps["mean_target_tokens"] < 10


def test_run_language_modeling_reports_perplexity(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    out = tmp_path / "out"
    run_example(
        "run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--model",
        "gpt2",
        "--hidden-size",
        32,
        "--layers",
        1,
        "--heads",
        2,
        "--block-size",
        32,
        "--max-steps",
        100,
        "--dropout",
        0,
        "--output-dir",
        out,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # 31 types (30 words + <eos>): guessing uniformly scores 31; the chain allows about 2.
    assert metrics["valid_ppl"] < 10 and metrics["test_ppl"] < 10, metrics


@pytest.mark.parametrize("optimizer, lr", [("adamw", 3e-3), ("sgd", 0.5)])
def test_baselines_run_through_the_same_script(tmp_path: Path, optimizer: str, lr: float) -> None:
    write_ptb_layout(tmp_path / "ptb")
    run_example(
        "run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--model",
        "gpt2",
        "--hidden-size",
        32,
        "--layers",
        1,
        "--heads",
        2,
        "--block-size",
        32,
        "--max-steps",
        60,
        "--dropout",
        0,
        "--optimizer",
        optimizer,
        "--lr",
        lr,
        "--lr-scheduler",
        "step",
        "--warmup-steps",
        0.1,
        "--output-dir",
        tmp_path / "out",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer"] == optimizer and metrics["valid_ppl"] < 31


def test_awd_lstm_run_writes_a_record_reports_and_skips_finished_runs(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    results, work = tmp_path / "results", tmp_path / "work"
    common = ("--data-dir", tmp_path / "ptb", "--no-verify", "--preset", "tiny", "--epochs", 8, "--results", results)
    result = run_example("run_language_modeling.py", *common, "--optimizer", "softadam", "--output-dir", work)
    record = json.loads((results / "softadam-seed1.json").read_text())
    assert record["experiment"] == "ptb" and record["optimizer"] == "softadam" and record["seed"] == 1
    assert record["config"]["model"]["weight_drop"] == 0.6  # the paper's SoftAdam setting
    assert record["config"]["lr_scheduler"] == "step" and record["config"]["warmup_steps"] == 0
    assert record["config"]["flush_denormals"] is True  # x86 supports it; a diverging cell would crawl without
    assert [e["epoch"] for e in record["epochs"]] == list(range(1, 9))
    assert all(e["train_loss"] > 0 and e["wall_seconds"] > 0 for e in record["epochs"])
    # Perplexity over the whole splits: 31 types (uniform guessing: 31), the chain allows about 2.
    assert record["valid_ppl"] < 10 and record["test_ppl"] < 10, record
    assert record["tokens"]["valid"] > 500 and record["valid_ppl"] == pytest.approx(math.exp(record["valid_loss"]))
    # The best epoch is what gets evaluated at the end.
    best = min(record["epochs"], key=lambda e: e["valid_loss"])
    assert record["valid_loss"] == pytest.approx(best["valid_loss"], rel=1e-6)
    assert f"valid ppl {record['valid_ppl']:.2f}" in result.stdout
    again = run_example("run_language_modeling.py", *common, "--optimizer", "softadam", "--output-dir", work)
    assert "this run has finished (same settings): skipping" in again.stdout
    # A run of other settings is not taken for it, and does not overwrite it.
    other = run_repo_script(
        "hf_examples/run_language_modeling.py", *common, "--optimizer", "softadam", "--lr", 7, "--output-dir", work
    )
    assert other.returncode == 2 and "holds a run with other settings (lr:" in other.stderr, other.stderr
    assert "Pass --results DIR" in other.stderr and json.loads((results / "softadam-seed1.json").read_text()) == record
    # A run whose record is missing (crashed after its last checkpoint) resumes.
    (results / "softadam-seed1.json").unlink()
    resumed = run_example("run_language_modeling.py", *common, "--optimizer", "softadam", "--output-dir", work)
    assert "resuming from" in resumed.stdout and (results / "softadam-seed1.json").exists()
    run_example("run_language_modeling.py", *common, "--optimizer", "sgd", "--output-dir", tmp_path / "work-sgd")
    report = run_repo_script(
        "scripts/report.py", "--experiment", "ptb", "--records", results, "--plot", tmp_path / "ptb.png"
    )
    assert report.returncode == 0, report.stderr
    assert "| sgd | 1 |" in report.stdout and "| softadam | 1 |" in report.stdout and "63.63" in report.stdout
    assert (tmp_path / "ptb.png").stat().st_size > 10_000


def test_missing_data_fails_clearly(tmp_path: Path) -> None:
    result = run_repo_script(
        "hf_examples/run_language_modeling.py", "--data-dir", tmp_path, "--results", tmp_path / "r"
    )
    assert result.returncode == 2 and "ptb.train.txt" in result.stderr


def test_a_missing_ptb_split_fails_clearly(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.valid.txt").unlink()
    result = run_repo_script(
        "hf_examples/run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--results",
        tmp_path / "r",
    )
    assert result.returncode == 2 and "ptb.valid.txt is missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_ptb_with_the_wrong_md5_fails_clearly(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    result = run_repo_script(
        "hf_examples/run_language_modeling.py", "--data-dir", tmp_path / "ptb", "--results", tmp_path / "r"
    )
    assert result.returncode == 2 and "expected f26c4b92c5fdc7b3f8c7cdcb991d8420" in result.stderr
    assert "--no-verify" in result.stderr


def write_hub_layout(ptb_dir: Path, hub_dir: Path, splits: dict[str, str] = PTB_HUB_SPLITS) -> None:
    """The hub's parquet export of PTB-layout files: penn_treebank/<split>/0000.parquet, one
    stripped "sentence" per line."""
    import datasets

    for split, hub_split in splits.items():
        lines = (ptb_dir / f"ptb.{split}.txt").read_text().splitlines()
        folder = hub_dir / "penn_treebank" / hub_split
        folder.mkdir(parents=True)
        datasets.Dataset.from_dict({"sentence": [line.strip() for line in lines]}).to_parquet(
            str(folder / "0000.parquet")
        )


def test_hub_copy_is_checked_against_mikolovs_files(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    write_hub_layout(tmp_path / "ptb", tmp_path / "hub")
    # The rebuilt text is byte for byte the file, so the canonical md5s apply to the hub copy.
    for split in ("train", "valid", "test"):
        text = (tmp_path / "ptb" / f"ptb.{split}.txt").read_text()
        assert mikolov_text(line.strip() for line in text.splitlines()) == text
    raw = load_ptb_hub(str(tmp_path / "hub"), verify=False)
    assert sorted(raw) == ["test", "train", "valid"]
    assert raw["valid"]["text"] == [
        line.strip() for line in (tmp_path / "ptb" / "ptb.valid.txt").read_text().splitlines()
    ]
    with pytest.raises(ValueError, match="expected f26c4b92c5fdc7b3f8c7cdcb991d8420"):
        load_ptb_hub(str(tmp_path / "hub"))
    write_hub_layout(tmp_path / "ptb", tmp_path / "no-test", {"train": "train", "valid": "validation"})
    with pytest.raises(ValueError, match="no 'test' split"):
        load_ptb_hub(str(tmp_path / "no-test"), verify=False)


def test_awd_lstm_trains_from_the_hub_copy(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    write_hub_layout(tmp_path / "ptb", tmp_path / "hub")
    run_example(
        "run_language_modeling.py",
        "--hub-dataset",
        tmp_path / "hub",
        "--no-verify",
        "--preset",
        "tiny",
        "--epochs",
        1,
        "--results",
        tmp_path / "results",
        "--output-dir",
        tmp_path / "work",
    )
    record = json.loads((tmp_path / "results" / "softadam-seed1.json").read_text())
    assert record["data"] == str(tmp_path / "hub")
    # The same token streams as the files: every line plus its <eos>.
    for split in ("train", "valid", "test"):
        lines = (tmp_path / "ptb" / f"ptb.{split}.txt").read_text().splitlines()
        assert record["tokens"][split] == sum(len(line.split()) + 1 for line in lines)


def test_unreachable_hub_fails_clearly(tmp_path: Path) -> None:
    result = run_repo_script(
        "hf_examples/run_language_modeling.py",
        "--hub-dataset",
        "--results",
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not load ptb-text-only/ptb_text_only" in result.stderr and "--data-dir" in result.stderr


@pytest.mark.parametrize("optimizer", ["softadam", "sgd", "adam"])
def test_paper_preset_dry_run_prints_trainer_arguments_transformers_accepts(optimizer: str, tmp_path: Path) -> None:
    from transformers import HfArgumentParser, TrainingArguments

    write_ptb_layout(tmp_path / "ptb")
    result = run_example(
        "run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--preset",
        "paper",
        "--optimizer",
        optimizer,
        "--dry-run",
        "--output-dir",
        tmp_path / "work",
        "--results",
        tmp_path / "results",
    )
    lines = result.stdout.splitlines()
    flags = shlex.split(lines[lines.index(next(x for x in lines if x.startswith("# TrainingArguments"))) + 1])
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    assert args.num_train_epochs == 500 and args.per_device_train_batch_size == 20 and args.max_grad_norm == 0.25
    assert args.learning_rate == {"softadam": 30.0, "sgd": 30.0, "adam": 3e-3}[optimizer] and args.warmup_steps == 0
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert "'embedding_size': 400, 'hidden_size': 1150, 'num_layers': 3" in result.stdout  # the recipe's model
    assert f"'weight_drop': {0.6 if optimizer == 'softadam' else 0.5}" in result.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()  # nothing trained


def test_training_arguments_cli_round_trips_and_refuses_what_it_cannot_spell() -> None:
    from transformers import TrainingArguments

    from softadam_nlp.hf import training_arguments_cli

    args = TrainingArguments(
        output_dir="out",
        learning_rate=30.0,
        num_train_epochs=3,
        eval_strategy="epoch",
        report_to=[],
        load_best_model_at_end=True,
        save_strategy="epoch",
        use_cpu=True,
    )
    flags = training_arguments_cli(args)
    assert flags[:2] == ["--output_dir", "out"] and "--learning_rate" in flags and "--eval_strategy" in flags
    # A field the CLI cannot carry (a dict-valued option) is caught, not silently dropped.
    with pytest.raises(ValueError):
        training_arguments_cli(TrainingArguments(output_dir="out", lr_scheduler_kwargs={"min_lr": 1e-5}, use_cpu=True))


def test_sweep_runs_a_grid_once_and_feeds_the_heatmap(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    results = tmp_path / "sweep"
    sweep = (
        "ptb",
        "--optimizer",
        "softadam",
        "--eta",
        0,
        1,
        "--lr",
        30,
        "--results",
        results,
        "--work",
        tmp_path / "work",
        "--jobs",
        2,
        "--",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--preset",
        "tiny",
        "--epochs",
        1,
    )
    first = run_repo_script("scripts/sweep.py", *sweep)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 runs, 0 finished, 2 to go" in first.stdout and first.stdout.count(" done ") == 2
    for eta in (0, 1):
        record = json.loads((results / f"softadam_eta{eta}_lr30" / "softadam-seed1.json").read_text())
        assert record["config"]["eta"] == eta and record["config"]["lr"] == 30 and record["config"]["epochs"] == 1
    again = run_repo_script("scripts/sweep.py", *sweep)
    assert "2 runs, 2 finished, 0 to go" in again.stdout and " start " not in again.stdout
    listed = run_repo_script("scripts/sweep.py", *sweep[:-10], "--seeds", 1, 2, "--dry-run")
    assert listed.stdout.count("finished ") == 2 and listed.stdout.count("pending ") == 2
    report = run_repo_script(
        "scripts/report.py", "--experiment", "ptb", "--records", results, "--heatmap", tmp_path / "h.png"
    )
    assert report.returncode == 0 and "| eta \\ lr | 30 |" in report.stdout and (tmp_path / "h.png").exists()
    refused = run_repo_script(
        "scripts/sweep.py", "ptb", "--optimizer", "sgd", "--eta", 1, "--lr", 1, "--results", results
    )
    assert refused.returncode == 2 and "--eta is SoftAdam's" in refused.stderr


def test_a_killed_awd_run_resumes_from_its_last_complete_checkpoint_with_the_same_losses(tmp_path: Path) -> None:
    # SIGKILL the run once it has saved two epoch checkpoints, then make the newest one
    # what a kill during its save leaves (trainer_state.json, Trainer's last file, not
    # written; optimizer.pt cut short). The rerun must drop it, resume from the one
    # before, and end with the losses of an uninterrupted run.
    write_ptb_layout(tmp_path / "ptb")

    def command(name: str) -> list[str]:
        return [
            sys.executable,
            str(REPO / "hf_examples" / "run_language_modeling.py"),
            "--data-dir",
            str(tmp_path / "ptb"),
            "--no-verify",
            "--preset",
            "tiny",
            "--epochs",
            "6",
            "--optimizer",
            "softadam",
            "--results",
            str(tmp_path / name / "results"),
            "--output-dir",
            str(tmp_path / name / "work"),
        ]

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    straight = subprocess.run(command("straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = subprocess.Popen(
        command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    work = tmp_path / "killed" / "work"

    def complete_checkpoints() -> list[Path]:
        return sorted(work.glob("checkpoint-*/trainer_state.json")) if work.is_dir() else []

    deadline = time.monotonic() + 300
    while len(complete_checkpoints()) < 2:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    folders = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = folders[-1]
    (newest / "trainer_state.json").unlink(missing_ok=True)
    optimizer_file = newest / "optimizer.pt"
    if optimizer_file.exists():
        optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])

    resumed = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed {newest}: incomplete" in resumed.stdout
    assert f"resuming from {folders[-2]}" in resumed.stdout
    want, got = (
        json.loads((tmp_path / name / "results" / "softadam-seed1.json").read_text()) for name in ("straight", "killed")
    )
    assert [e["epoch"] for e in got["epochs"]] == list(range(1, 7))
    # Trainer restores every RNG and SoftAdam its state, so validation is bit for bit the
    # same. The epoch's mean logged training loss is not: the first log after a resume
    # averages over fewer steps (Trainer restarts its logging interval there).
    assert [e["valid_loss"] for e in got["epochs"]] == [e["valid_loss"] for e in want["epochs"]]
    for mine, theirs in zip(got["epochs"], want["epochs"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-2)
    assert got["valid_ppl"] == want["valid_ppl"] and got["test_ppl"] == want["test_ppl"]


def test_eta_schedule_options_are_checked(tmp_path: Path) -> None:
    for bad, message in (
        (["--eta-schedule", "linear"], "needs --eta-end"),
        (["--eta-end", "0"], "needs a linear"),
        (["--optimizer", "adam", "--eta-schedule", "cosine", "--eta-end", "0"], "SoftAdam's"),
    ):
        result = run_repo_script("hf_examples/run_language_modeling.py", "--data-dir", tmp_path, *bad)
        assert result.returncode == 2 and message in result.stderr


def test_awd_run_with_an_eta_schedule_records_it(tmp_path: Path) -> None:
    write_ptb_layout(tmp_path / "ptb")
    run_example(
        "run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--preset",
        "tiny",
        "--epochs",
        2,
        "--optimizer",
        "softadam",
        "--eta",
        4,
        "--eta-schedule",
        "linear",
        "--eta-end",
        0,
        "--results",
        tmp_path / "r",
        "--output-dir",
        tmp_path / "w",
    )
    record = json.loads((tmp_path / "r" / "softadam-seed1.json").read_text())
    assert (record["config"]["eta"], record["config"]["eta_schedule"], record["config"]["eta_end"]) == (
        4.0,
        "linear",
        0.0,
    )
    # A constant-eta run in a second folder: the report pools both and keeps them apart.
    run_example(
        "run_language_modeling.py",
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--preset",
        "tiny",
        "--epochs",
        2,
        "--optimizer",
        "softadam",
        "--results",
        tmp_path / "constant",
        "--output-dir",
        tmp_path / "w1",
    )
    report = run_repo_script(
        "scripts/report.py",
        "--experiment",
        "ptb",
        "--records",
        tmp_path / "constant",
        tmp_path / "r",
        "--plot",
        tmp_path / "curves.png",
    )
    assert report.returncode == 0, report.stderr
    assert "| softadam | 1 |" in report.stdout and "| softadam, eta 4→0 linear | 1 |" in report.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_deepspeed_option_hands_softadam_to_trainer_as_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    # Trainer discards optimizers=(...) under DeepSpeed, so --deepspeed switches the scripts to
    # optimizer_cls_and_kwargs (Trainer + DeepSpeed training itself: tests/test_hf_distributed.py).
    from transformers import HfArgumentParser, TrainingArguments

    write_ptb_layout(tmp_path / "ptb")
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    common = (
        "--data-dir",
        tmp_path / "ptb",
        "--no-verify",
        "--dry-run",
        "--output-dir",
        tmp_path / "work",
        "--results",
        tmp_path / "results",
    )
    result = run_repo_script(
        "hf_examples/run_language_modeling.py",
        *common,
        "--deepspeed",
        config,
        "--lr-scheduler",
        "linear",
        "--eta",
        "0.5",
        DS_ACCELERATOR="cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "# optimizer SoftAdam {'lr': 120.0, 'betas': (0.9, 0.999), 'eps': 1e-08, 'eta': 0.5}, given to Trainer "
        "as optimizer_cls_and_kwargs (DeepSpeed)" in result.stdout
    )
    lines = result.stdout.splitlines()
    flags = shlex.split(lines[lines.index(next(x for x in lines if x.startswith("# TrainingArguments"))) + 1])
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    assert args.deepspeed == str(config)
    for extra, message in (
        (["--deepspeed", tmp_path / "none.json"], "no such file"),
        (["--deepspeed", config, "--lr-scheduler", "step"], "--lr-scheduler step and --eta-schedule are not available"),
    ):
        for script in ("run_language_modeling.py", "run_translation.py"):
            bad = run_repo_script(f"hf_examples/{script}", *common[:2], *extra)
            assert bad.returncode == 2 and message in bad.stderr, (script, bad.stderr[-500:])


def test_new_runs_write_outside_the_committed_records_and_take_trainers_spellings(tmp_path: Path) -> None:
    """A fresh clone's first run trains (its record goes to runs/results/, not beside the
    committed evidence in results/); TrainingArguments' spellings reach the same options;
    an option of the other model is refused rather than ignored."""
    write_ptb_layout(tmp_path / "ptb")
    common = ("--data-dir", tmp_path / "ptb", "--no-verify", "--preset", "tiny", "--dry-run")
    default = run_example("run_language_modeling.py", *common, "--output-dir", tmp_path / "work")
    assert default.returncode == 0, default.stderr
    assert f"record -> {REPO / 'runs' / 'results' / 'tiny' / 'ptb' / 'softadam-seed1.json'}" in default.stdout
    spelled = run_example(
        "run_language_modeling.py",
        *common,
        "--learning_rate",
        3,
        "--num_train_epochs=2",
        "--per_device_train_batch_size",
        4,
        "--output_dir",
        tmp_path / "work",
        "--max_grad_norm",
        0.5,
        "--eta_schedule",
        "linear",
        "--eta_end",
        0.0,
    )
    assert spelled.returncode == 0, spelled.stderr
    lines = spelled.stdout.splitlines()
    flags = shlex.split(lines[lines.index(next(x for x in lines if x.startswith("# TrainingArguments"))) + 1])
    from transformers import HfArgumentParser, TrainingArguments

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (3.0, 2, 4)
    assert args.max_grad_norm == 0.5 and args.output_dir == str(tmp_path / "work")
    for model, flag, value, owner in (
        ("awd_lstm", "--max-steps", 20, "gpt2"),
        ("awd_lstm", "--max_steps", 20, "gpt2"),
        ("gpt2", "--epochs", 2, "awd_lstm"),
    ):
        refused = run_repo_script(
            "hf_examples/run_language_modeling.py",
            "--data-dir",
            tmp_path / "ptb",
            "--no-verify",
            "--model",
            model,
            flag,
            value,
        )
        assert refused.returncode == 2 and f"applies to --model {owner} only" in refused.stderr, refused.stderr
