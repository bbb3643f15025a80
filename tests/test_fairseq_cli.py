"""SoftAdam through the real fairseq command-line tools, on corpora generated here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from fairseq_cli import (
    COMMON,
    PLUGIN_DIR,
    make_reversal_data_bin,
    run_tool,
    train_log,
    translation_args,
    write_markov_text,
)

TOTAL = 300  # updates of the main run (20 epochs of 15 updates)


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reversal_data_bin(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def main_run(data_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One uninterrupted run of TOTAL updates; several tests read it."""
    save_dir = tmp_path_factory.mktemp("main-run")
    result = run_tool("fairseq-train", *translation_args(data_bin, save_dir, "--max-update", TOTAL))
    return save_dir, train_log(result)


def test_loss_falls_and_lr_decays_linearly_to_zero_without_warmup(main_run) -> None:
    _, log = main_run
    assert [int(r["num_updates"]) for r in log] == list(range(1, TOTAL + 1))
    losses = [float(r["loss"]) for r in log]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 2.0
    # fairseq logs the learning rate set *after* update k, i.e. the one update k+1
    # will use: lr * (1 - k/TOTAL). So update 1 ran at the full --lr (no warmup) and
    # the schedule reaches 0 at --max-update.
    for record in log:
        k = int(record["num_updates"])
        assert float(record["lr"]) == pytest.approx(1.0 * (1 - k / TOTAL), abs=1e-4)
    assert float(log[-1]["lr"]) == 0.0


def _params_after_one_update(data_bin: Path, save_dir: Path, *scheduler: object) -> dict:
    args = translation_args(data_bin, save_dir, "--max-update", 1, "--disable-validation")
    i = args.index("--lr-scheduler")
    args[i : i + 4] = list(scheduler)  # replace "--lr-scheduler polynomial_decay --total-num-update N"
    run_tool("fairseq-train", *args)
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]


def test_first_update_runs_at_the_full_learning_rate(data_bin: Path, tmp_path: Path) -> None:
    linear = _params_after_one_update(
        data_bin, tmp_path / "linear", "--lr-scheduler", "polynomial_decay", "--total-num-update", TOTAL
    )
    constant = _params_after_one_update(
        data_bin, tmp_path / "constant", "--lr-scheduler", "fixed", "--warmup-updates", 0
    )
    warmup = _params_after_one_update(
        data_bin, tmp_path / "warmup", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 100
    )
    assert all(torch.equal(linear[k], constant[k]) for k in linear)
    assert not all(torch.equal(linear[k], warmup[k]) for k in linear)  # the comparison can tell


def test_resume_from_checkpoint_continues_like_an_uninterrupted_run(data_bin: Path, tmp_path: Path) -> None:
    # fairseq 0.12.3.1 does not replay the same batches after a resume (its own adam
    # shows it too: identical parameters after loading, a different next batch). So
    # this run trains on a single batch per epoch (the 100-sentence valid split,
    # without dropout), where only the order of sentences inside the batch can change,
    # which moves the loss by float rounding alone. That isolates what the plugin owns:
    # SoftAdam's state and the learning-rate schedule across --restore-file.
    def args(save_dir: Path, *extra: object) -> list[object]:
        return translation_args(
            data_bin,
            save_dir,
            "--train-subset",
            "valid",
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

    uninterrupted = train_log(run_tool("fairseq-train", *args(tmp_path / "straight", "--max-update", 30)))
    run_tool("fairseq-train", *args(tmp_path / "first", "--max-update", 20))
    checkpoint = tmp_path / "first" / "checkpoint_last.pt"
    resumed = train_log(
        run_tool("fairseq-train", *args(tmp_path / "second", "--max-update", 30, "--restore-file", checkpoint))
    )
    reset = train_log(
        run_tool(
            "fairseq-train",
            *args(tmp_path / "third", "--max-update", 30, "--restore-file", checkpoint, "--reset-optimizer"),
        )
    )
    assert [int(r["num_updates"]) for r in resumed] == list(range(21, 31))
    expected = {r["num_updates"]: r for r in uninterrupted}

    def gap(log: list[dict]) -> float:
        return max(abs(float(r["loss"]) - float(expected[r["num_updates"]]["loss"])) for r in log)

    assert all(r["lr"] == expected[r["num_updates"]]["lr"] for r in resumed)
    assert gap(resumed) <= 0.002  # the printed losses agree to the last digit or one rounding step
    assert gap(reset) > 10 * 0.002  # losing SoftAdam's moments would show


def test_reset_optimizer_starts_fresh_state_from_the_trained_model(data_bin: Path, main_run, tmp_path: Path) -> None:
    save_dir, log = main_run
    shutil.copy(save_dir / "checkpoint_last.pt", tmp_path / "start.pt")
    # fairseq's --reset-optimizer also restarts the update counter.
    fresh = train_log(
        run_tool(
            "fairseq-train",
            *translation_args(
                data_bin,
                tmp_path / "reset",
                "--max-update",
                5,
                "--restore-file",
                tmp_path / "start.pt",
                "--reset-optimizer",
                "--reset-lr-scheduler",
                "--disable-validation",
                total_updates=5,
            ),
        )
    )
    state = torch.load(tmp_path / "reset" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    steps = {s["step"].item() for s in state["last_optimizer_state"]["state"].values()}
    assert steps == {5.0}  # SoftAdam's step count restarted with the optimizer
    assert [int(r["num_updates"]) for r in fresh] == [1, 2, 3, 4, 5]
    assert float(fresh[0]["loss"]) < float(log[0]["loss"]) - 2.0  # but the trained weights were loaded


def test_generate_decodes_the_test_split_and_sacrebleu_scores_it(data_bin: Path, main_run) -> None:
    save_dir, _ = main_run
    # fairseq-fixed 0.12.3.1 silently leaves out a final batch smaller than
    # --required-batch-size-multiple (default 8): 96 of these 100 sentences otherwise.
    result = run_tool(
        "fairseq-generate",
        data_bin,
        "--user-dir",
        PLUGIN_DIR,
        "--cpu",
        "--path",
        save_dir / "checkpoint_last.pt",
        "--beam",
        4,
        "--batch-size",
        50,
        "--required-batch-size-multiple",
        1,
    )
    hyps, refs = {}, {}
    for line in result.stdout.splitlines():
        if line.startswith("H-"):
            tag, _, text = line.split("\t")
            hyps[int(tag[2:])] = text
        elif line.startswith("T-"):
            tag, text = line.split("\t")
            refs[int(tag[2:])] = text
    assert sorted(hyps) == sorted(refs) == list(range(100))
    bleu = sacrebleu.corpus_bleu([hyps[i] for i in range(100)], [[refs[i] for i in range(100)]])
    # An untrained model scores ~0 on this task; 300 updates learn part of the reversal.
    assert bleu.score > 5.0, bleu


def test_language_modeling_task(tmp_path: Path) -> None:
    write_markov_text(tmp_path / "raw")
    run_tool(
        "fairseq-preprocess",
        "--only-source",
        "--trainpref",
        tmp_path / "raw" / "train.txt",
        "--validpref",
        tmp_path / "raw" / "valid.txt",
        "--testpref",
        tmp_path / "raw" / "test.txt",
        "--destdir",
        tmp_path / "bin",
        "--workers",
        1,
    )
    log = train_log(
        run_tool(
            "fairseq-train",
            tmp_path / "bin",
            "--task",
            "language_modeling",
            "--arch",
            "transformer_lm",
            "--decoder-layers",
            1,
            "--decoder-embed-dim",
            64,
            "--decoder-ffn-embed-dim",
            128,
            "--decoder-attention-heads",
            4,
            "--share-decoder-input-output-embed",
            "--dropout",
            0.0,
            "--tokens-per-sample",
            64,
            "--sample-break-mode",
            "none",
            *COMMON,
            "--optimizer",
            "softadam",
            "--lr",
            0.5,
            "--softadam-nesterov",
            "--lr-scheduler",
            "polynomial_decay",
            "--total-num-update",
            150,
            "--max-update",
            150,
            "--save-dir",
            tmp_path / "ck",
        )
    )
    losses = [float(r["loss"]) for r in log]
    assert len(losses) == 150 and float(log[0]["lr"]) == pytest.approx(0.5 * (1 - 1 / 150), abs=1e-4)
    # Each word has 3 equally likely successors: the best loss is log2(3) = 1.58 bits.
    assert sum(losses[-10:]) / 10 < 2.5 < losses[0]


@pytest.mark.parametrize(
    "precision",
    [["--fp16", "--fp16-no-flatten-grads"], ["--memory-efficient-fp16"]],
    ids=["fp16-no-flatten", "memory-efficient-fp16"],
)
def test_fp16_wrappers_train(data_bin: Path, tmp_path: Path, precision: list[str]) -> None:
    log = train_log(
        run_tool(
            "fairseq-train", *translation_args(data_bin, tmp_path, "--max-update", 60, *precision, total_updates=60)
        )
    )
    losses = [float(r["loss"]) for r in log]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--softadam-eta", "-1", "--softadam-eta: Invalid eta=-1.0"),
        ("--softadam-betas", "(0.9, 1.5)", "--softadam-betas: Invalid betas[1]=1.5"),
        ("--weight-decay", "-0.1", "--weight-decay: Invalid weight_decay=-0.1"),
    ],
)
def test_bad_values_fail_with_the_option_named(
    data_bin: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = run_tool(
        "fairseq-train", *translation_args(data_bin, tmp_path, "--max-update", 1, option, value), check=False
    )
    assert result.returncode != 0
    # The traceback ends in one line that names the fairseq option.
    assert result.stderr.strip().splitlines()[-1].startswith(f"ValueError: {message}")


def test_hydra_yaml_config(data_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "softadam.yaml").write_text(f"""
common: {{cpu: true, user_dir: {PLUGIN_DIR}, log_format: json, log_interval: 1, seed: 1}}
task: {{_name: translation, data: {data_bin}}}
model: {{_name: transformer, encoder_layers: 1, decoder_layers: 1, encoder_embed_dim: 64,
        decoder_embed_dim: 64, encoder_ffn_embed_dim: 128, decoder_ffn_embed_dim: 128,
        encoder_attention_heads: 4, decoder_attention_heads: 4}}
criterion: {{_name: cross_entropy}}
dataset: {{max_tokens: 1000}}
optimizer: {{_name: softadam, softadam_betas: [0.8, 0.99], softadam_eta: 2.0, weight_decay: 0.01}}
lr_scheduler: {{_name: polynomial_decay, total_num_update: 20}}
optimization: {{lr: [0.5], max_update: 20}}
checkpoint: {{save_dir: {tmp_path / "ck"}, no_epoch_checkpoints: true}}
""")
    run_tool("fairseq-hydra-train", "--config-dir", tmp_path / "cfg", "--config-name", "softadam", cwd=tmp_path)
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["optimizer_name"] == "FairseqSoftAdam"
    assert state["optimizer_history"][-1]["num_updates"] == 20
    group = state["last_optimizer_state"]["param_groups"][0]
    assert (tuple(group["betas"]), group["eta"], group["weight_decay"]) == ((0.8, 0.99), 2.0, 0.01)


def test_timed_runs_leave_no_prefetch_thread_at_exit(data_bin: Path, tmp_path: Path) -> None:
    """scripts/bench_end_to_end.py and scripts/gpu_check.py end fairseq-train right after its
    last update (TIMED_RUN_OPTIONS). fairseq's prefetch thread, still loading batches then,
    can abort the process as the interpreter finalizes (softadam_nlp/experiments/
    fairseq_runs.py says how); with the options there is no such thread to race."""
    from softadam_nlp.experiments.fairseq_runs import TIMED_RUN_OPTIONS

    # fairseq-train in a Python that reports the threads still alive as it exits.
    script = (
        "import atexit, sys, threading\n"
        "from fairseq_cli.train import cli_main\n"
        "atexit.register(lambda: print('THREADS AT EXIT', sorted(type(t).__name__ for t in threading.enumerate())))\n"
        "sys.argv = ['fairseq-train'] + sys.argv[1:]\n"
        "cli_main()\n"
    )

    def threads_at_exit(*options: str) -> str:
        args = translation_args(data_bin, tmp_path / "unused", "--max-update", 3, *options)
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return next(line for line in result.stdout.splitlines() if line.startswith("THREADS AT EXIT"))

    assert "BackgroundConsumer" in threads_at_exit("--no-save", "--disable-validation")  # the test can tell
    assert "BackgroundConsumer" not in threads_at_exit(*TIMED_RUN_OPTIONS)
