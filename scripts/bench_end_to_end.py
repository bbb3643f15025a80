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
"""

from __future__ import annotations

import argparse
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

from softadam_nlp.experiments.fairseq_runs import fairseq_tool, parse_fairseq_log  # noqa: E402

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
            "--no-save",
            "--disable-validation",
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


def trainer_samples_per_second(optimizer: str, steps: int, skip: int, batch_size: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from softadam_nlp.hf import create_optimizer_and_scheduler

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    # bos/eos inside the small vocabulary (GPT-2's own 50256 is out of it and warns).
    config = GPT2Config(
        vocab_size=10_000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=9_999, eos_token_id=9_999
    )
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (steps * batch_size, 128), generator=torch.Generator().manual_seed(0))
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
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=0,
            **({"optim": "adamw_torch_fused"} if optimizer == "adamw_torch_fused" else {}),
        )
        timer = StepTimes()
        optimizers = create_optimizer_and_scheduler(model, args, steps) if optimizer == "softadam" else (None, None)
        Trainer(model=model, args=args, train_dataset=dataset, optimizers=optimizers, callbacks=[timer]).train()
    seconds = timer.times[-1] - timer.times[skip - 1]  # steps skip+1 .. steps
    return {"median": (steps - skip) * batch_size / seconds, "steps_timed": steps - skip}


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.updates <= 2 * args.interval:
        p.error("--updates must exceed 2 x --interval (the first logged interval is left out)")
    if not 0 < args.skip < args.steps:
        p.error("--skip must be between 1 and --steps - 1")
    if args.toolkit != "trainer" and not (args.data_bin / "dict.de.txt").exists():
        p.error(f"no fairseq data-bin at {args.data_bin}: run scripts/prepare_iwslt14.py first, or give --data-bin")

    benches = []
    if args.toolkit in ("fairseq", "both"):
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
                ["softadam", "adamw_torch_fused"],
                lambda name: trainer_samples_per_second(name, args.steps, args.skip, args.batch_size),
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

    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        write_bench_record(args.json, "bench_end_to_end.py", argv, {"settings": settings, **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
