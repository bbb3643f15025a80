#!/usr/bin/env python
"""Measure, in one run of at most 8 minutes, everything a single CUDA GPU can tell about
this package, and write it down as it goes.

Steps, in order, each a subprocess with its own time limit (a failed, timed-out or
unavailable step is recorded with its reason and the tail of its output, and the next
one runs):

1. ``gpu_tests``: ``pytest -m gpu`` on the test files that use the ``gpu`` marker
   (pytest.ini); passed/failed/skipped counts from its JUnit XML.
2. ``optimizer_step_transformer``, ``optimizer_step_gpt2_1p3b``: scripts/bench_optimizer.py
   --device cuda on transformer_iwslt_de_en's shapes and on a 1.3B-parameter GPT-2's:
   SoftAdam default, foreach and fused against torch's fused AdamW and SGD, and the fused
   execution's first step (its compile, into empty compile caches) apart.
3. ``trainer_throughput``: scripts/bench_end_to_end.py, Trainer samples/s of the factory
   (its default, and foreach and fused forced) against ``adamw_torch_fused`` on GPT-2
   small's shape (12 layers, 768-d) with 1024-token sequences in bf16; its fairseq half is
   left out (step 5 times fairseq).
4. ``awd_lstm_step_time``: scripts/bench_awd_lstm.py, Table 2's `paper` AWD-LSTM on PTB
   through BPTTTrainer with SoftAdam; ``translation_step_time``: hf_examples/run_translation.py
   with transformer_iwslt_de_en's sizes on Multi30k. Each gives its time per step and the
   wall time that implies for the full `paper` run (340,500 steps; 70,000 updates).
5. ``fairseq_train``: fairseq-train --optimizer softadam (--user-dir fairseq_plugins) for 300
   updates of transformer_iwslt_de_en on the Multi30k data-bin; unavailable where fairseq
   does not import.

OUT/gpu_check.json (one record) and OUT/gpu_check.md (a summary) are rewritten whenever a
step starts or ends, so a run stopped at its time limit still leaves what it measured.
Scratch files (logs, bench records, checkpoints) go to --work-dir, not to OUT.

On the GPU machine (the device tool's `run`, which copies the working tree but not
../shared/data), carry the data in a folder that .git/info/exclude ignores, and remove it
afterwards (never commit data):

    mkdir -p .gpu_data && cp -r ../shared/data/ptb ../shared/data/multi30k .gpu_data/
    grep -qx '/.gpu_data/' .git/info/exclude || echo /.gpu_data/ >> .git/info/exclude
    # device run: command "python3 scripts/gpu_check.py --data-dir .gpu_data --out $OUT",
    #             carry [".gpu_data"] (plus "data/multi30k.tokenized.de-en" for step 5), timeout_s 600
    rm -rf .gpu_data

--dry-run plans every step and checks its command without timing anything or touching
a GPU (it runs on the CPU): the scripts exist, their argument parsers accept the
arguments (bench scripts and run_translation.py through their parse_args, pytest through
its own parser, fairseq-train through the installed fairseq's), and the data is found or
reported missing. It writes the same two files with every step "planned". --only runs a
subset of the steps; --step-args 'STEP=ARGS' appends arguments to one step's command.

    python scripts/gpu_check.py --dry-run --out runs/gpu_check
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package is used from the checkout, uninstalled, on the GPU machine
    sys.path.insert(0, str(REPO))

TOTAL_LIMIT_S = 480  # the whole check: 8 minutes
# Each step's own limit, in seconds; they add up to TOTAL_LIMIT_S.
STEP_LIMITS_S = {
    "gpu_tests": 90,
    "optimizer_step_transformer": 55,
    "optimizer_step_gpt2_1p3b": 90,
    "trainer_throughput": 85,
    "awd_lstm_step_time": 45,
    "translation_step_time": 65,
    "fairseq_train": 50,
}
STEPS = tuple(STEP_LIMITS_S)
MIN_STEP_S = 10  # a step is not started with less of the overall limit left than this

# Step 4 and 5's measurements, and the full paper runs they are scaled to.
TIMED_STEPS, WARMUP_STEPS = 200, 20
PAPER_TABLE2_STEPS = 340_500  # 500 epochs x 681 steps (run_language_modeling.py --preset paper --dry-run)
PAPER_TABLE3_UPDATES = 70_000  # Liu et al.'s recipe (scripts/run_iwslt14.py, BUDGET["paper"])
TRANSLATION_BATCH = 256  # sentences: about 3,700 tokens a side on Multi30k, near the recipe's 4,000 tokens
FAIRSEQ_UPDATES, FAIRSEQ_LOG_INTERVAL = 300, 50
MULTI30K_FILES = ("train.de.gz", "train.en.gz", "val.de.gz", "val.en.gz")
DEFAULT_FAIRSEQ_DATA_BIN = REPO / "data" / "multi30k.tokenized.de-en" / "data-bin"
TAIL_CHARS = 4000

RECORD_NAME, SUMMARY_NAME = "gpu_check.json", "gpu_check.md"


@dataclasses.dataclass
class Step:
    """One step of the check: its command, how a dry run checks it, and how its results are read."""

    name: str
    title: str
    command: list[str] = dataclasses.field(default_factory=list)
    # Dry run: None when the command's arguments are accepted, else why not.
    check: Callable[[list[str]], Optional[str]] = lambda command: None
    # After the command: what it measured (read from the files it wrote), and a few lines on it.
    read_results: Callable[[], dict] = dict
    summarize: Callable[[dict], list[str]] = lambda results: []
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    unavailable: Optional[str] = None  # why it cannot run on this machine: recorded, not a failure
    plan_error: Optional[str] = None  # the step could not even be planned: a failure
    selected: bool = True  # False: left out by --only
    exit_codes: dict[int, str] = dataclasses.field(default_factory=dict)  # what a nonzero exit code means
    limit_s: float = 0.0

    def __post_init__(self) -> None:
        self.limit_s = self.limit_s or STEP_LIMITS_S[self.name]


@dataclasses.dataclass
class Context:
    """What the steps are planned from."""

    python: str
    work: Path
    dry_run: bool
    data: dict[str, Any]
    fairseq_data_bin: Path
    no_verify: bool
    cuda_missing: Optional[str]  # why CUDA cannot be used here (a real run only)
    fairseq_missing: Optional[str]


# ---------------------------------------------------------------------------------------------
# Checking commands without running them (--dry-run)


def load_script(path: Path) -> ModuleType:
    """Import a script as a module (its `if __name__ == "__main__"` block does not run)."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # scripts import each other by name (bench_end_to_end -> bench_optimizer)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def as_program(program: object) -> Iterator[None]:
    """sys.argv[0] is `program` inside the block, so that argparse's messages name it, not this script."""
    saved = sys.argv[0]
    sys.argv[0] = str(program)
    try:
        yield
    finally:
        sys.argv[0] = saved


def script_accepts(script: Path) -> Callable[[list[str]], Optional[str]]:
    """A check that `script`'s parse_args(argv) accepts the command's arguments (those after
    `python SCRIPT`), with every check it makes after parsing."""

    def check(command: list[str]) -> Optional[str]:
        if not script.is_file():
            return f"{script} does not exist"
        try:
            parse_args = load_script(script).parse_args
        except Exception as error:  # any import failure is the answer
            return f"{script.relative_to(REPO)} does not import: {error!r}"
        except SystemExit as error:
            return f"{script.relative_to(REPO)} exits on import ({error.code})"
        errors = io.StringIO()
        try:
            with as_program(script), contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                parse_args(command[2:])
        except SystemExit as error:
            lines = errors.getvalue().strip().splitlines()
            if error.code in (0, None):
                return "its arguments make it exit at once (--help?)"
            return f"{script.relative_to(REPO)} refused its arguments: {lines[-1] if lines else error.code}"
        except Exception as error:
            return f"{script.relative_to(REPO)}'s parse_args raised {error!r}"
        return None

    return check


def pytest_accepts(command: list[str]) -> Optional[str]:
    """pytest parses the command's options (it collects nothing: its Python plugin is off, so
    no test module is imported) and the gpu marker is registered."""
    markers = configparser.ConfigParser()
    markers.read(REPO / "pytest.ini")
    registered = [line.split(":")[0].strip() for line in markers.get("pytest", "markers", fallback="").splitlines()]
    if "gpu" not in registered:
        return "the gpu marker is not registered in pytest.ini"
    options = [arg for arg in command[3:] if not (REPO / arg).is_file()]  # the test files exist by construction
    probe = [command[0], "-m", "pytest", *options, "--collect-only", "-p", "no:python", "tests"]
    result = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env({}))
    if result.returncode in (0, 5):  # 5: no tests collected, as intended
        return None
    return f"pytest refused its arguments (exit {result.returncode}): {tail(result.stdout + result.stderr, 600)}"


def fairseq_accepts(command: list[str]) -> Optional[str]:
    """The installed fairseq's own training parser accepts the command (nothing is read)."""
    from softadam_nlp.experiments.fairseq_runs import check_fairseq_command

    try:
        with as_program(Path(command[0]).name), contextlib.redirect_stdout(io.StringIO()):
            check_fairseq_command(command)
    except ValueError as error:
        return f"fairseq-train refused its arguments: {error}"
    return None


# ---------------------------------------------------------------------------------------------
# The steps


def uses_gpu_marker(path: Path) -> bool:
    """Whether a test file's code uses `pytest.mark.gpu` (as a decorator, in pytestmark or
    as an alias), found in its syntax tree, so that a mention in a string does not count."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "gpu"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
    )


def gpu_marked_test_files() -> list[str]:
    """The test files that use the gpu marker. Only these are collected: other test modules
    import fairseq or datasets at the top, which the GPU machine lacks, and a collection
    error would stop the whole run."""
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py") if uses_gpu_marker(path))


def plan_gpu_tests(ctx: Context) -> Step:
    junit = ctx.work / "gpu_tests.xml"
    files = gpu_marked_test_files()
    step = Step(
        "gpu_tests",
        "the suite's GPU tests (pytest -m gpu)",
        command=[ctx.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", *files],
        check=pytest_accepts,
        read_results=lambda: junit_counts(junit, files),
        summarize=summarize_tests,
        exit_codes={
            1: "exit code 1: some tests failed",
            2: "exit code 2: pytest was interrupted (a test file that does not import?)",
            5: "exit code 5: no test marked gpu was collected",
        },
    )
    if importlib.util.find_spec("pytest") is None:
        step.unavailable = "pytest is not installed on this machine"
    elif not files:
        message = "no test file under tests/ uses pytest.mark.gpu yet: this step has no test to run"
        if ctx.dry_run:
            step.notes.append("warning: " + message)
        else:
            step.unavailable = message
    return step


def junit_counts(junit: Path, files: list[str]) -> dict:
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    not_passed = []
    for case in root.iter("testcase"):
        for outcome in ("failure", "error"):
            found = case.find(outcome)
            if found is not None:
                message = (found.get("message") or "").splitlines()[:1]
                not_passed.append(f"{case.get('classname')}::{case.get('name')} ({outcome}: {''.join(message)[:200]})")
    return {
        "files": files,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "not_passed": not_passed,
    }


def summarize_tests(results: dict) -> list[str]:
    lines = [
        f"{results['passed']} passed, {results['failed']} failed, {results['errors']} errors, "
        f"{results['skipped']} skipped (in {', '.join(results['files'])})"
    ]
    return lines + [f"not passed: {name}" for name in results["not_passed"]]


def plan_optimizer_step(ctx: Context, workload: str) -> Step:
    script = REPO / "scripts" / "bench_optimizer.py"
    record = ctx.work / f"optimizer_step_cuda_{workload}.json"
    caches = ctx.work / f"compile_caches_{workload}"
    title = {
        "transformer": "optimizer step on CUDA, transformer_iwslt_de_en shapes (36.7M parameters, 253 tensors)",
        "gpt2_1p3b": "optimizer step on CUDA, 1.3B-parameter GPT-2 shapes (GPT-3 XL sizes, 292 tensors)",
    }[workload]
    return Step(
        f"optimizer_step_{workload}",
        title,
        command=[ctx.python, str(script), "--device", "cuda", "--workload", workload, "--json", str(record)],
        check=script_accepts(script),
        read_results=lambda: read_json(record),
        summarize=summarize_optimizer_step,
        # Empty compile caches, so that fused's first step is the compile a new machine pays.
        env={"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")},
        notes=["first step of each execution timed apart; the Triton and torch.compile caches start empty"],
    )


def summarize_optimizer_step(record: dict) -> list[str]:
    """A headline (SoftAdam's default and fused against fused AdamW), then every execution."""
    model, ratios = record["model"], record["ratio_to_fused_adamw"]
    first = record.get("first_step_seconds", {})
    device = record.get("device", "cpu")
    headline = ", ".join(
        f"{name} {ratios[name]:.2f}x" for name in ("SoftAdam (default path)", "SoftAdam fused") if name in ratios
    )
    headline += " fused AdamW's step time"
    if "SoftAdam fused" in first:
        headline += f"; fused's first step (compile) {first['SoftAdam fused']:.1f} s"
    peak = record.get("peak_memory_allocated_gib")
    lines = [
        headline,
        f"{model['parameters']:,} parameters in {model['tensors']} tensors; SoftAdam's default on {device.upper()}: "
        f"{record['softadam_default_path']}" + (f"; peak GPU memory {peak:.1f} GiB" if peak is not None else ""),
    ]
    for name, median in record["median_ms_per_step"].items():
        first_step = f"; first step {first[name]:.2f} s" if name in first else ""
        lines.append(f"{name}: {median:.2f} ms/step, {ratios[name]:.2f}x fused AdamW{first_step}")
    return lines


def plan_trainer_throughput(ctx: Context) -> Step:
    script = REPO / "scripts" / "bench_end_to_end.py"
    record = ctx.work / "end_to_end_cuda.json"
    command = [ctx.python, str(script), "--toolkit", "trainer", "--device", "cuda", "--bf16"]
    command += ["--trainer-model", "gpt2-124m", "--seq-len", "1024", "--batch-size", "8", "--steps", "40"]
    command += ["--skip", "5", "--repeats", "2", "--softadam-executions", "foreach", "fused", "--json", str(record)]
    return Step(
        "trainer_throughput",
        "Trainer throughput on CUDA, bf16: the factory (default, foreach, fused) vs adamw_torch_fused, GPT-2 small",
        command=command,
        check=script_accepts(script),
        read_results=lambda: read_json(record),
        summarize=summarize_trainer,
        notes=[
            "GPT-2 small's shape (12 layers, 768-d, 12 heads, vocabulary 50257), random weights and tokens, "
            "1024-token sequences, batch 8, 35 steps timed after 5, 2 runs of each optimizer in alternation",
            "--toolkit trainer: fairseq's half of the benchmark is left out here (step fairseq_train times fairseq)",
        ],
    )


def summarize_trainer(record: dict) -> list[str]:
    trainer = record["trainer"]
    seq_len = record["settings"]["seq_len"]
    headline = f"samples/s: softadam / adamw_torch_fused = {trainer['ratio']:.3f}"
    for key, ratio in trainer.items():
        if key.startswith("ratio_"):  # the forced executions
            headline += f", {key[len('ratio_') :]} / adamw_torch_fused = {ratio:.3f}"
    return [headline] + [
        f"{name}: {samples:.1f} samples/s ({samples * seq_len:,.0f} tokens/s)"
        for name, samples in trainer["median"].items()
    ]


def plan_awd_lstm(ctx: Context) -> Step:
    script = REPO / "scripts" / "bench_awd_lstm.py"
    record = ctx.work / "awd_lstm_paper_steps.json"
    command = [ctx.python, str(script), "--preset", "paper", "--optimizer", "softadam", "--device", "cuda"]
    command += ["--steps", str(TIMED_STEPS), "--warmup", str(WARMUP_STEPS), "--json", str(record)]
    command += ["--data-dir", str(ctx.data["ptb"] or "PTB-NOT-FOUND")] + (["--no-verify"] if ctx.no_verify else [])
    step = Step(
        "awd_lstm_step_time",
        "Table 2's paper AWD-LSTM on PTB: time per step (BPTTTrainer, SoftAdam)",
        command=command,
        check=script_accepts(script),
        read_results=lambda: {k: v for k, v in read_json(record).items() if k != "step_end_seconds"},
        summarize=summarize_awd_lstm,
        notes=["3 layers, 400/1150, batch 20, BPTT 70; SoftAdam lr from run_language_modeling.py's LEARNING_RATES"],
    )
    step.unavailable = ctx.data["ptb_missing"]
    return step


def summarize_awd_lstm(record: dict) -> list[str]:
    per_step = record["seconds_per_step"]
    hours = record["full_run_hours"]
    lines = [
        f"{record['model']['parameters']:,} parameters, {record['optimizer']} lr {record['lr']:g}: "
        f"{per_step['mean'] * 1e3:.1f} ms/step (median {per_step['median'] * 1e3:.1f}) over "
        f"{record['steps_timed']} steps after {record['warmup_steps']}",
        f"one validation pass: {record['validation_pass_seconds']:.1f} s",
        f"full paper run ({record['full_run_steps']:,} steps): {hours['training_steps']:.1f} h of training steps, "
        f"{hours['with_validation_per_epoch']:.1f} h with a validation pass per epoch (one seed, one optimizer)",
    ]
    if record["full_run_steps"] != PAPER_TABLE2_STEPS:  # 681 steps an epoch on Mikolov's PTB
        lines.append(f"warning: {record['full_run_steps']:,} steps, not Table 2's {PAPER_TABLE2_STEPS:,}: not PTB?")
    return lines


def plan_translation(ctx: Context) -> Step:
    script = REPO / "hf_examples" / "run_translation.py"
    output = ctx.work / "translation"
    step_times = ctx.work / "translation_step_times.json"
    multi30k = Path(ctx.data["multi30k"] or "MULTI30K-NOT-FOUND")
    command = [ctx.python, str(script)]
    for flag, name in zip(("--train-src", "--train-tgt", "--valid-src", "--valid-tgt"), MULTI30K_FILES):
        command += [flag, str(multi30k / name)]
    # transformer_iwslt_de_en's sizes (also the script's defaults: given so that the plan shows them)
    command += ["--d-model", "512", "--layers", "6", "--heads", "4", "--ffn-dim", "1024", "--dropout", "0.3"]
    command += ["--optimizer", "softadam", "--lr", "0.5", "--max-steps", str(WARMUP_STEPS + TIMED_STEPS)]
    command += ["--batch-size", str(TRANSLATION_BATCH), "--max-eval-samples", "64", "--beams", "1"]
    command += ["--output-dir", str(output), "--step-times", str(step_times)]
    step = Step(
        "translation_step_time",
        "HF translation example (run_translation.py), transformer_iwslt_de_en sizes on Multi30k: time per step",
        command=command,
        check=script_accepts(script),
        read_results=lambda: translation_results(step_times, output / "metrics.json"),
        summarize=summarize_translation,
        notes=[
            "MarianMT architecture with 6+6 layers, 512-d, FFN 1024, 4 heads, shared embeddings; fp32; "
            f"batch {TRANSLATION_BATCH} sentences; BLEU after so few steps means nothing"
        ],
    )
    step.unavailable = ctx.data["multi30k_missing"]
    return step


def translation_results(step_times: Path, metrics: Path) -> dict:
    record = read_json(step_times)
    times = record.pop("step_end_seconds")[WARMUP_STEPS - 1 :]
    mean = (times[-1] - times[0]) / (len(times) - 1)
    median = statistics.median(b - a for a, b in zip(times, times[1:]))
    return {
        **record,
        "warmup_steps": WARMUP_STEPS,
        "steps_timed": len(times) - 1,
        "seconds_per_step": {"mean": mean, "median": median},
        "target_tokens_per_batch": record["batch_size"] * record["mean_target_tokens"],
        "full_run_updates": PAPER_TABLE3_UPDATES,
        "full_run_hours": PAPER_TABLE3_UPDATES * mean / 3600,
        "valid_bleu": read_json(metrics).get("eval_bleu") if metrics.is_file() else None,
    }


def summarize_translation(results: dict) -> list[str]:
    per_step = results["seconds_per_step"]
    return [
        f"{results['parameters']:,} parameters, batch {results['batch_size']} sentences (about "
        f"{results['target_tokens_per_batch']:,.0f} target tokens): {per_step['mean'] * 1e3:.1f} ms/step "
        f"(median {per_step['median'] * 1e3:.1f}) over {results['steps_timed']} steps after {results['warmup_steps']}",
        f"{PAPER_TABLE3_UPDATES:,} updates (Table 3's length) would take {results['full_run_hours']:.1f} h "
        "through Seq2SeqTrainer (evaluation and checkpoint averaging not counted)",
    ]


def plan_fairseq_train(ctx: Context) -> Step:
    run_iwslt14 = load_script(REPO / "scripts" / "run_iwslt14.py")
    from softadam_nlp.experiments.fairseq_runs import TIMED_RUN_OPTIONS, fairseq_tool

    log_file = ctx.work / "fairseq_train.log"
    softadam = run_iwslt14.OPTIMIZERS["softadam"]
    # Table 3's paper preset (model, batch, schedule as run_iwslt14.py builds them for SoftAdam),
    # cut to a few hundred updates, without checkpoints, validation or prefetch thread.
    command = [fairseq_tool("fairseq-train"), str(ctx.fairseq_data_bin), "--user-dir", str(run_iwslt14.PLUGIN)]
    command += ["--task", "translation", *run_iwslt14.MODELS["paper"], *softadam["args"]]
    command += ["--lr", str(softadam["lr"]["paper"]), "--lr-scheduler", "linear", "--warmup-updates", "1"]
    command += ["--min-lr", "1e-09", "--max-update", str(FAIRSEQ_UPDATES)]
    command += ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    command += ["--max-tokens", str(run_iwslt14.BUDGET["paper"]["max_tokens"]), "--seed", "1"]
    command += [*TIMED_RUN_OPTIONS, "--log-format", "json"]
    command += ["--log-interval", str(FAIRSEQ_LOG_INTERVAL), "--log-file", str(log_file)]
    step = Step(
        "fairseq_train",
        f"fairseq-train --optimizer softadam, transformer_iwslt_de_en on Multi30k, {FAIRSEQ_UPDATES} updates",
        command=command,
        check=fairseq_accepts,
        read_results=lambda: fairseq_results(log_file),
        summarize=summarize_fairseq,
    )
    if ctx.fairseq_missing:
        step.unavailable = ctx.fairseq_missing
    elif not (ctx.fairseq_data_bin / "dict.de.txt").is_file():
        step.unavailable = (
            f"no fairseq data-bin at {ctx.fairseq_data_bin}: prepare it with scripts/prepare_iwslt14.py --corpus "
            "multi30k and carry data/multi30k.tokenized.de-en, or give --fairseq-data-bin"
        )
    return step


def fairseq_results(log_file: Path) -> dict:
    from softadam_nlp.experiments.fairseq_runs import parse_fairseq_log

    inner = parse_fairseq_log(log_file.read_text().splitlines())["train_inner"]
    intervals = [
        {"num_updates": int(r["num_updates"]), "wps": float(r["wps"]), "ups": float(r["ups"]), "wpb": float(r["wpb"])}
        for r in inner
    ]
    timed = intervals[1:]  # the first interval holds start-up
    if not timed:
        raise ValueError(f"fewer than two logged intervals in {log_file}")
    seconds = statistics.median(r["wpb"] / r["wps"] for r in timed)
    return {
        "intervals": intervals,
        "seconds_per_update": seconds,
        "words_per_second": statistics.median(r["wps"] for r in timed),
        "words_per_batch": statistics.median(r["wpb"] for r in timed),
        "full_run_updates": PAPER_TABLE3_UPDATES,
        "full_run_hours": PAPER_TABLE3_UPDATES * seconds / 3600,
    }


def summarize_fairseq(results: dict) -> list[str]:
    return [
        f"{results['seconds_per_update'] * 1e3:.1f} ms/update, {results['words_per_second']:,.0f} words/s "
        f"({results['words_per_batch']:,.0f} target words per batch), the first logged interval left out",
        f"{PAPER_TABLE3_UPDATES:,} updates (Table 3's length) would take {results['full_run_hours']:.1f} h "
        "(validation, checkpoints and generation not counted)",
    ]


PLANNERS: dict[str, Callable[[Context], Step]] = {
    "gpu_tests": plan_gpu_tests,
    "optimizer_step_transformer": lambda ctx: plan_optimizer_step(ctx, "transformer"),
    "optimizer_step_gpt2_1p3b": lambda ctx: plan_optimizer_step(ctx, "gpt2_1p3b"),
    "trainer_throughput": plan_trainer_throughput,
    "awd_lstm_step_time": plan_awd_lstm,
    "translation_step_time": plan_translation,
    "fairseq_train": plan_fairseq_train,
}
assert tuple(PLANNERS) == STEPS


# ---------------------------------------------------------------------------------------------
# The record


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tail(text: str, chars: int = TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Report:
    """gpu_check.json and gpu_check.md in OUT, rewritten (atomically) at every change. Every
    step has its entry from the start ("pending"), so a run stopped early shows what it left."""

    def __init__(self, out: Path, header: dict, steps: list[Step]) -> None:
        self.out = out
        self.record = {**header, "started": now(), "updated": None, "finished": False, "steps": []}
        self.entries = {}
        for step in steps:
            self.entries[step.name] = {
                "name": step.name,
                "title": step.title,
                "status": "pending" if step.selected else "not selected",
                "time_limit_seconds": step.limit_s,
                "commands": [step.command] if step.command else [],
                "env": step.env,
                "notes": step.notes,
                "reason": None,
                "wall_seconds": None,
                "exit_code": None,
                "results": None,
                "summary": [],
                "output_tail": None,
            }
            self.record["steps"].append(self.entries[step.name])

    def update(self, step: Step, **fields: Any) -> dict:
        entry = self.entries[step.name]
        entry.update(fields, time_limit_seconds=step.limit_s)
        self.save()
        return entry

    def save(self) -> None:
        self.record["updated"] = now()
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in ((RECORD_NAME, json.dumps(self.record, indent=2) + "\n"), (SUMMARY_NAME, self.markdown())):
            staging = self.out / f".{name}.tmp"
            staging.write_text(text)
            staging.replace(self.out / name)

    def markdown(self) -> str:
        r = self.record
        machine, data = r.get("machine", {}), r.get("data", {})
        packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items() if v)
        lines = [
            "# GPU check" + (" (dry run: planned, nothing timed)" if r["dry_run"] else ""),
            "",
            f"- command: `{shlex.join(r['command'])}`",
            f"- started {r['started']}, updated {r['updated']}, " + ("finished" if r["finished"] else "not finished"),
            f"- machine: {machine.get('gpu') or 'no GPU'}; python {machine.get('python')}; {packages}",
            f"- data: PTB {data.get('ptb') or 'missing'}; Multi30k {data.get('multi30k') or 'missing'}; "
            f"fairseq data-bin {data.get('fairseq_data_bin')}",
            f"- time limit {r['time_limit_seconds']} s in all",
            "",
            "| step | status | seconds | result |",
            "|---|---|---:|---|",
        ]
        for s in r["steps"]:
            seconds = "" if s["wall_seconds"] is None else f"{s['wall_seconds']:.1f}"
            result = (s["summary"][:1] or [s["reason"] or ""])[0].replace("|", "\\|")
            lines.append(f"| {s['name']} | {s['status']} | {seconds} | {result} |")
        for s in r["steps"]:
            lines += [
                "",
                f"## {s['name']}: {s['title']}",
                "",
                f"status: **{s['status']}** (limit {s['time_limit_seconds']} s)",
            ]
            for command in s["commands"]:
                lines += ["", "```bash", shlex.join(command), "```"]
            if s["env"]:
                lines += ["", "environment: " + ", ".join(f"`{k}={v}`" for k, v in s["env"].items())]
            lines += [""] + [f"- {line}" for line in s["notes"] + s["summary"]]
            if s["reason"]:
                lines += ["", f"reason: {s['reason']}"]
            if s["output_tail"] and s["status"] not in ("done",):
                lines += ["", "output (tail):", "", "```text", s["output_tail"][-2000:], "```"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running


class Interrupted(Exception):
    """SIGTERM (a time limit outside the check): stop, record, exit."""


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_command(command: list[str], env: dict[str, str], limit_s: float, log_path: Path) -> tuple[Optional[int], float]:
    """Run `command` in its own process group with stdout and stderr to `log_path`;
    (exit code, or None when it ran past `limit_s` and was killed with its children; seconds)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: Optional[int] = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = None
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        if code is None:
            os.killpg(process.pid, signal.SIGKILL)  # compile workers, data loaders, fairseq-train's children
            process.wait()
    return code, time.perf_counter() - started


def execute(steps: list[Step], report: Report, ctx: Context, deadline: float, total_limit_s: float) -> bool:
    """Run (or, in a dry run, check) each step in turn, saving the report at every change.
    True when no step failed (an unavailable step is no failure)."""
    all_good = True
    for step in steps:
        if not step.selected:
            continue
        if step.plan_error:
            report.update(step, status="failed", reason=step.plan_error)
            all_good = False
            continue
        if step.unavailable:
            report.update(step, status="unavailable", reason=step.unavailable)
            continue
        if ctx.dry_run:
            problem = step.check(step.command)
            report.update(step, status="failed" if problem else "planned", reason=problem)
            all_good &= problem is None
            continue
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            report.update(
                step, status="not run", reason=f"the check's overall time limit ({total_limit_s} s) was reached"
            )
            continue
        step.limit_s = min(step.limit_s, int(left))
        report.update(step, status="running")
        log_path = ctx.work / f"{step.name}.log"
        print(f"[gpu_check] {step.name}: {shlex.join(step.command)}", flush=True)
        try:
            code, seconds = run_command(step.command, subprocess_env(step.env), step.limit_s, log_path)
        except (Interrupted, KeyboardInterrupt):
            output = tail(log_path.read_text(errors="replace"))
            report.update(
                step, status="interrupted", reason="the check was stopped during this step", output_tail=output
            )
            raise
        fields: dict[str, Any] = {"wall_seconds": round(seconds, 1), "exit_code": code}
        fields["output_tail"] = tail(log_path.read_text(errors="replace"))
        try:
            fields["results"] = step.read_results()
            fields["summary"] = step.summarize(fields["results"])
        except Exception as error:  # a step without readable results is reported as such
            if code == 0:
                code, fields["reason"] = -1, f"its results could not be read: {error!r}"
        if code == 0:
            fields["status"] = "done"
        elif code is None:
            fields.update(status="timed out", reason=f"ran past its {step.limit_s:.0f} s limit and was killed")
        else:
            fields.update(
                status="failed", reason=fields.get("reason") or step.exit_codes.get(code, f"exit code {code}")
            )
        all_good &= fields["status"] == "done"
        print(f"[gpu_check] {step.name}: {fields['status']} in {seconds:.1f} s", flush=True)
        for line in fields.get("summary", []):
            print(f"    {line}", flush=True)
        report.update(step, **fields)
    return all_good


# ---------------------------------------------------------------------------------------------
# The machine and the data


def package_versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, Optional[str]] = {}
    for package in ("torch", "triton", "transformers", "accelerate", "tokenizers", "sacrebleu", "pytest"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    for package in ("fairseq-fixed", "fairseq"):
        with contextlib.suppress(PackageNotFoundError):
            versions["fairseq"] = version(package)
            break
    else:
        versions["fairseq"] = None
    return versions


def gpu_description() -> Optional[str]:
    """The GPU from nvidia-smi (no CUDA context is made in this process: the steps need the memory)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=60)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def cuda_missing() -> Optional[str]:
    import torch

    if torch.cuda.is_available():
        return None
    return f"CUDA is not available on this machine (torch {torch.__version__}, CUDA build {torch.version.cuda})"


def fairseq_missing() -> Optional[str]:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import fairseq  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "fairseq":
            return "fairseq is not installed on this machine"
        return f"fairseq does not import: {error!r}"
    except Exception as error:
        return f"fairseq does not import: {error!r}"
    return None


def find_data(data_dir: Optional[Path]) -> dict[str, Any]:
    """PTB and Multi30k through the package's own lookup (softadam_nlp.data): --data-dir (or
    its ptb/ and multi30k/), else $SOFTADAM_DATA_DIR, else ../shared/data beside the repository."""
    from softadam_nlp.data import data_roots
    from softadam_nlp.data.ptb import find_ptb_dir

    found: dict[str, Any] = {"ptb": None, "ptb_missing": None, "multi30k": None, "multi30k_missing": None}
    try:
        found["ptb"] = str(find_ptb_dir(data_dir))
    except FileNotFoundError as error:
        found["ptb_missing"] = str(error)
    candidates = [folder for root in data_roots(data_dir) for folder in (root / "multi30k", root)]
    for folder in candidates:
        if all((folder / name).is_file() for name in MULTI30K_FILES):
            found["multi30k"] = str(folder)
            break
    else:
        looked = ", ".join(str(c) for c in candidates) or "(nowhere: no data folder given or known)"
        found["multi30k_missing"] = (
            f"Multi30k not found: looked for {', '.join(MULTI30K_FILES)} in {looked}; pass --data-dir (a folder "
            "with multi30k/) or set $SOFTADAM_DATA_DIR"
        )
    return found


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help=f"folder for {RECORD_NAME} and {SUMMARY_NAME}")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with ptb/ and multi30k/ (default: $SOFTADAM_DATA_DIR, else ../shared/data beside the repository)",
    )
    p.add_argument("--dry-run", action="store_true", help="plan and check every step; time nothing, use no GPU")
    p.add_argument("--only", nargs="+", choices=STEPS, metavar="STEP", help=f"run these steps only: {', '.join(STEPS)}")
    p.add_argument(
        "--step-args",
        action="append",
        default=[],
        metavar="STEP=ARGS",
        help="append ARGS (shell-quoted) to STEP's command, e.g. 'optimizer_step_gpt2_1p3b=--rounds 3'",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the PTB md5 check (other text in the PTB layout)")
    p.add_argument(
        "--fairseq-data-bin",
        type=Path,
        default=DEFAULT_FAIRSEQ_DATA_BIN,
        help="Multi30k's fairseq data-bin for fairseq_train (default: data/multi30k.tokenized.de-en/data-bin)",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="scratch files (default: a new temporary folder)")
    p.add_argument("--time-limit", type=int, default=TOTAL_LIMIT_S, help=f"seconds in all (default: {TOTAL_LIMIT_S})")
    args = p.parse_args(argv)
    # Absolute paths: the steps run with the repository as their working directory.
    for name in ("out", "data_dir", "fairseq_data_bin", "work_dir"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.extra_args = {}
    for item in args.step_args:
        name, _, extra = item.partition("=")
        if name not in STEPS or not extra.strip():
            p.error(f"--step-args takes STEP=ARGS with STEP one of {', '.join(STEPS)}; got {item!r}")
        args.extra_args.setdefault(name, []).extend(shlex.split(extra))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_limit
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    data = find_data(args.data_dir)
    data["fairseq_data_bin"] = str(args.fairseq_data_bin)
    selected = args.only or list(STEPS)
    ctx = Context(
        python=sys.executable,
        work=work.resolve(),
        dry_run=args.dry_run,
        data=data,
        fairseq_data_bin=args.fairseq_data_bin,
        no_verify=args.no_verify,
        cuda_missing=None if args.dry_run else cuda_missing(),
        fairseq_missing=fairseq_missing() if "fairseq_train" in selected else None,
    )
    header = {
        "script": "scripts/gpu_check.py",
        "command": ["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)],
        "dry_run": args.dry_run,
        "time_limit_seconds": args.time_limit,
        "work_dir": str(ctx.work),
        "machine": {
            "gpu": None if args.dry_run else gpu_description(),
            "cuda": "not checked (dry run)" if args.dry_run else (ctx.cuda_missing or "available"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "packages": package_versions(),
        },
        "data": data,
    }
    steps = []
    for name in STEPS:
        if name not in selected:
            steps.append(Step(name, "left out by --only", selected=False))
            continue
        try:
            step = PLANNERS[name](ctx)
        except Exception as error:  # one step that cannot be planned does not stop the others
            step = Step(name, name, plan_error=f"could not be planned: {error!r}")
        step.command += args.extra_args.get(name, [])
        if ctx.cuda_missing and not step.unavailable:
            step.unavailable = ctx.cuda_missing
        steps.append(step)
    report = Report(args.out, header, steps)
    report.save()

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, stop)
    try:
        all_good = execute(steps, report, ctx, deadline, args.time_limit)
    except (Interrupted, KeyboardInterrupt):
        for entry in report.record["steps"]:
            if entry["status"] == "pending":
                entry.update(status="not run", reason="the check was stopped before this step")
        report.save()
        return 143
    report.record["finished"] = True
    report.record["wall_seconds"] = round(time.monotonic() - started, 1)
    report.save()
    if args.dry_run and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)  # nothing was written there but the pytest probe's XML
    counts: dict[str, int] = {}
    for entry in report.record["steps"]:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    print(f"[gpu_check] {', '.join(f'{n} {s}' for s, n in counts.items())} -> {args.out / SUMMARY_NAME}")
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
