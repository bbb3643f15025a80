#!/usr/bin/env python
"""Training throughput with SoftAdam against the toolkits' own Adam, end to end.

- fairseq: words/s of ``fairseq-train --optimizer softadam`` against ``--optimizer adam``
  on the `cpu` preset transformer of scripts/run_iwslt14.py (needs its data-bin);
- Trainer: samples/s with ``create_optimizer_and_scheduler`` against
  ``optim="adamw_torch_fused"``, on a GPT-2-shaped model built from its config
  (random weights, random tokens: nothing is downloaded).

Runs alternate between the two optimizers (A B B A ...) so that both see the same
machine load; the first logged interval of each run (start-up, kernel loading) is left
out, and the report gives per-run medians, their median over runs and the ratio.

    python scripts/bench_end_to_end.py --data-bin data/multi30k.tokenized.de-en/data-bin \\
        --json results/bench/end_to_end_cpu.json

On a GPU (Trainer only: the GPU machine has no fairseq, and --toolkit both leaves fairseq
out, saying so in the record, where it is not installed), GPT-2 small's shape (12 layers,
768-d, 12 heads, vocabulary 50257) on 1024-token sequences in bf16, with SoftAdam's
foreach and fused executions as runs of their own beside its default:

    python scripts/bench_end_to_end.py --toolkit trainer --device cuda --bf16 --trainer-model gpt2-124m \\
        --seq-len 1024 --softadam-executions foreach fused --json end_to_end_cuda.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_optimizer import write_bench_record  # noqa: E402
from run_iwslt14 import MODELS, PLUGIN, device_flags  # noqa: E402

from softadam_nlp.experiments.fairseq_runs import TIMED_RUN_OPTIONS, fairseq_tool, parse_fairseq_log  # noqa: E402

FAIRSEQ_OPTIMIZERS = {
    "softadam": ["--optimizer", "softadam", "--softadam-eta", "1.0", "--lr", "0.5"],
    "adam": ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.001"],
}


def alternating(names: list[str], repeats: int) -> list[str]:
    """A B B A A B ...: each optimizer runs first as often as second."""
    order = []
    for r in range(repeats):
        order += names if r % 2 == 0 else names[::-1]
    return order


def fairseq_words_per_second(optimizer: str, data_bin: Path, updates: int, interval: int, preset: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        log_file = Path(work) / "train.log"
        command = [
            fairseq_tool("fairseq-train"),
            str(data_bin),
            "--user-dir",
            str(PLUGIN),
            "--task",
            "translation",
            *MODELS[preset],
            *FAIRSEQ_OPTIMIZERS[optimizer],
            "--weight-decay",
            "0.0001",
            "--lr-scheduler",
            "fixed",
            "--criterion",
            "label_smoothed_cross_entropy",
            "--label-smoothing",
            "0.1",
            "--max-tokens",
            "4096",
            "--max-update",
            str(updates),
            "--seed",
            "1",
            *TIMED_RUN_OPTIONS,
            "--log-format",
            "json",
            "--log-interval",
            str(interval),
            "--log-file",
            str(log_file),
            *device_flags(),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"fairseq-train failed:\n{result.stderr[-2000:]}")
        inner = parse_fairseq_log(log_file.read_text().splitlines())["train_inner"]
    rates = [float(r["wps"]) for r in inner[1:]]  # the first interval holds start-up
    if not rates:
        raise RuntimeError(f"no logged intervals after the first: raise --updates above 2 x --interval ({interval})")
    return {"median": statistics.median(rates), "intervals": rates}


# GPT-2-shaped models for the Trainer benchmark, built from a config (random weights).
# bos/eos sit inside the small vocabulary (GPT-2's own 50256 is out of it and warns).
TRAINER_MODELS = {
    "small": {
        "vocab_size": 10_000,
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 4,
        "bos_token_id": 9_999,
        "eos_token_id": 9_999,
    },
    "gpt2-124m": {"vocab_size": 50_257, "n_embd": 768, "n_layer": 12, "n_head": 12},  # GPT-2 small
}
# The factory's keyword arguments for each SoftAdam run: its default, or one execution forced.
SOFTADAM_KWARGS = {
    "softadam": {},
    "softadam_foreach": {"foreach": True},
    "softadam_per-tensor": {"foreach": False},
    "softadam_fused": {"fused": True},
}


def trainer_samples_per_second(
    optimizer: str,
    steps: int,
    skip: int,
    batch_size: int,
    device: str = "cpu",
    bf16: bool = False,
    model_name: str = "small",
    seq_len: int = 128,
) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from softadam_nlp.hf import create_optimizer_and_scheduler

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":  # count the step's queued kernels, not only their launches
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    config = GPT2Config(n_positions=seq_len, **TRAINER_MODELS[model_name])
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(
        0, config.vocab_size, (steps * batch_size, seq_len), generator=torch.Generator().manual_seed(0)
    )
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(
            output_dir=work,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=1e-3,
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            bf16=bf16,
            dataloader_num_workers=0,
            seed=0,
            **({"optim": "adamw_torch_fused"} if optimizer == "adamw_torch_fused" else {}),
        )
        timer = StepTimes()
        optimizers = (
            create_optimizer_and_scheduler(model, args, steps, **SOFTADAM_KWARGS[optimizer])
            if optimizer in SOFTADAM_KWARGS
            else (None, None)
        )
        Trainer(model=model, args=args, train_dataset=dataset, optimizers=optimizers, callbacks=[timer]).train()
    seconds = timer.times[-1] - timer.times[skip - 1]  # steps skip+1 .. steps
    return {"median": (steps - skip) * batch_size / seconds, "steps_timed": steps - skip}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked; nothing is run (scripts/gpu_check.py's dry run calls this)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toolkit", choices=["fairseq", "trainer", "both"], default="both")
    p.add_argument(
        "--data-bin",
        type=Path,
        default=REPO / "data/multi30k.tokenized.de-en/data-bin",
        help="fairseq-binarized translation data (scripts/prepare_iwslt14.py)",
    )
    p.add_argument("--preset", choices=sorted(MODELS), default="cpu", help="fairseq model of run_iwslt14.py")
    p.add_argument("--updates", type=int, default=60, help="fairseq updates per run (default: 60)")
    p.add_argument("--interval", type=int, default=10, help="fairseq log interval, in updates (default: 10)")
    p.add_argument("--steps", type=int, default=40, help="Trainer steps per run (default: 40)")
    p.add_argument("--skip", type=int, default=5, help="Trainer steps left out of the timing (default: 5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="runs per optimizer (default: 2)")
    trainer = p.add_argument_group("Trainer")
    trainer.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where Trainer trains (default: cuda when there is one, else cpu)",
    )
    trainer.add_argument("--bf16", action="store_true", help="Trainer's bf16 mixed precision")
    trainer.add_argument(
        "--trainer-model",
        choices=sorted(TRAINER_MODELS),
        default="small",
        help="small (default): 4 layers, 256-d, vocabulary 10,000; gpt2-124m: GPT-2 small's shape",
    )
    trainer.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (default: 128)")
    trainer.add_argument(
        "--softadam-executions",
        nargs="+",
        choices=["foreach", "per-tensor", "fused"],
        default=[],
        help="also run the factory with each of these executions forced (runs named softadam_<execution>)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.updates <= 2 * args.interval:
        p.error("--updates must exceed 2 x --interval (the first logged interval is left out)")
    if not 0 < args.skip < args.steps:
        p.error("--skip must be between 1 and --steps - 1")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    args.fairseq_skipped = None
    if args.toolkit != "trainer" and importlib.util.find_spec("fairseq") is None:
        if args.toolkit == "fairseq":
            p.error("--toolkit fairseq: fairseq is not installed on this machine")
        args.fairseq_skipped = "fairseq is not installed on this machine"
    if args.toolkit != "trainer" and not args.fairseq_skipped and not (args.data_bin / "dict.de.txt").exists():
        p.error(f"no fairseq data-bin at {args.data_bin}: run scripts/prepare_iwslt14.py first, or give --data-bin")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.fairseq_skipped:
        print(f"fairseq left out: {args.fairseq_skipped}", file=sys.stderr, flush=True)

    benches = []
    if args.toolkit in ("fairseq", "both") and not args.fairseq_skipped:
        benches.append(
            (
                "fairseq",
                "words/s",
                ["softadam", "adam"],
                lambda name: fairseq_words_per_second(name, args.data_bin, args.updates, args.interval, args.preset),
            )
        )
    if args.toolkit in ("trainer", "both"):
        benches.append(
            (
                "trainer",
                "samples/s",
                ["softadam", "adamw_torch_fused", *(f"softadam_{name}" for name in args.softadam_executions)],
                lambda name: trainer_samples_per_second(
                    name,
                    args.steps,
                    args.skip,
                    args.batch_size,
                    args.device,
                    args.bf16,
                    args.trainer_model,
                    args.seq_len,
                ),
            )
        )
    report = {}
    for toolkit, unit, names, measure in benches:
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for i, name in enumerate(alternating(names, args.repeats)):
            print(f"{toolkit}: run {i + 1}/{len(names) * args.repeats} ({name})", file=sys.stderr, flush=True)
            runs[name].append(measure(name))
        medians = {name: statistics.median(r["median"] for r in runs[name]) for name in names}
        ratio = medians[names[0]] / medians[names[1]]
        print(f"\n{toolkit} ({unit}, median over {args.repeats} runs each):")
        for name in names:
            per_run = ", ".join(f"{r['median']:.1f}" for r in runs[name])
            print(f"  {name}: {medians[name]:.1f}  (runs: {per_run})")
        print(f"  {names[0]} / {names[1]} = {ratio:.3f}")
        report[toolkit] = {"unit": unit, "median": medians, "ratio": ratio, "runs": runs}
        for extra in names[2:]:  # the forced executions, against the same baseline
            report[toolkit][f"ratio_{extra}"] = medians[extra] / medians[names[1]]
            print(f"  {extra} / {names[1]} = {report[toolkit][f'ratio_{extra}']:.3f}")
    if args.fairseq_skipped:
        report["fairseq"] = {"skipped": args.fairseq_skipped}

    if args.json:
        settings = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("json", "fairseq_skipped")
        }
        write_bench_record(args.json, "bench_end_to_end.py", argv, {"settings": settings, **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
