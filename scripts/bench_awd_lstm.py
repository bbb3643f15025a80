#!/usr/bin/env python
"""Time per optimizer step of Table 2's AWD-LSTM on Penn Treebank, through the Trainer.

The same pieces as `hf_examples/run_language_modeling.py` (a --preset of its PRESETS, the
optimizer's rate from its LEARNING_RATES, weight drop 0.6 for SoftAdam, clipping 0.25,
weight decay 1.2e-6, the step schedule over the full run's length) trained through
`BPTTTrainer` for --warmup + --steps optimizer steps, no evaluation, no checkpoints. The
script itself cannot stop after N steps: its AWD-LSTM trains for whole epochs by design.
Step times are taken at the end of every optimizer step (after a CUDA synchronization on
the GPU); the report gives the mean and median over the --steps after the warm-up, one
timed pass over the validation split (the per-epoch evaluation), and the wall time they
imply for the preset's full run (paper: 500 epochs x 681 steps = 340,500 steps).

    python scripts/bench_awd_lstm.py --preset paper --device cuda --json awd_lstm_steps.json

PTB comes from --data-dir (default: $SOFTADAM_DATA_DIR or ../shared/data/ptb), md5-checked
unless --no-verify.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LANGUAGE_MODELING_SCRIPT = REPO / "hf_examples" / "run_language_modeling.py"


def script_constants(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Module-level literal constants of a script, read without importing it:
    run_language_modeling.py imports `datasets` at the top, which the GPU machine lacks,
    and its presets and rates are plain literals."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name):
            pairs = [(target, node.value)]
        elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # A, B = 1, 2
            pairs = list(zip(target.elts, node.value.elts))
        else:
            continue
        for name, value in pairs:
            if isinstance(name, ast.Name) and name.id in names:
                found[name.id] = ast.literal_eval(value)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{path} has no literal {', '.join(missing)}")
    return found


RECIPE = script_constants(
    LANGUAGE_MODELING_SCRIPT, ("PRESETS", "LEARNING_RATES", "SOFTADAM_WEIGHT_DROP", "VALID_BATCH")
)
OPTIMIZERS = ("softadam", "sgd", "adam")
WEIGHT_DECAY, MAX_GRAD_NORM = 1.2e-6, 0.25  # the script's defaults (the recipe's)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (PTB is looked for, not read); nothing is built or timed."""
    from softadam_nlp.data.ptb import find_ptb_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(RECIPE["PRESETS"]), default="paper", help="default: paper")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="softadam", help="default: softadam")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with ptb.{train,valid,test}.txt (or ptb/)")
    p.add_argument("--no-verify", action="store_true", help="skip the PTB md5 check (other text in the PTB layout)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="default: cuda")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps (default: 200)")
    p.add_argument("--warmup", type=int, default=20, help="optimizer steps before the timed ones (default: 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step is never timed)")
    try:
        args.ptb_dir = find_ptb_dir(args.data_dir)
    except FileNotFoundError as error:
        p.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from softadam_nlp.data.ptb import load_ptb
    from softadam_nlp.experiments.bptt import BPTTTrainer, evaluate_stream, segments_per_epoch
    from softadam_nlp.experiments.runtime import flush_denormals
    from softadam_nlp.hf import STEP_SCHEDULE, build_optimizers
    from softadam_nlp.models.awd_lstm import AWDLSTMConfig, AWDLSTMForLanguageModeling

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but CUDA is not available on this machine", file=sys.stderr)
        return 2
    preset = RECIPE["PRESETS"][args.preset]
    lr = RECIPE["LEARNING_RATES"][args.optimizer][args.preset]
    weight_drop = RECIPE["SOFTADAM_WEIGHT_DROP"] if args.optimizer == "softadam" else 0.5
    try:
        corpus = load_ptb(args.ptb_dir, verify=not args.no_verify)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train, valid = corpus.splits["train"], corpus.splits["valid"]
    steps_per_epoch = segments_per_epoch(train, preset["batch_size"], preset["bptt"])
    full_run_steps = steps_per_epoch * preset["epochs"]

    on_gpu = args.device == "cuda"

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()  # the step's kernels have run, not only been queued
            self.times.append(time.perf_counter())

    torch.manual_seed(args.seed)
    config = AWDLSTMConfig(vocab_size=corpus.vocab_size, weight_drop=weight_drop, **preset["model"])
    model = AWDLSTMForLanguageModeling(config)
    with tempfile.TemporaryDirectory() as work:
        training_args = TrainingArguments(
            output_dir=work,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=preset["batch_size"],
            learning_rate=lr,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM,
            seed=args.seed,
            use_cpu=args.device == "cpu",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        # The schedule spans the full run, as in the paper-scale run: the timed steps sit at its start.
        optimizers = build_optimizers(args.optimizer, model, training_args, full_run_steps, STEP_SCHEDULE, momentum=0.0)
        clock = StepClock()
        trainer = BPTTTrainer(
            model=model,
            args=training_args,
            train_tokens=train,
            bptt=preset["bptt"],
            optimizers=optimizers,
            callbacks=[clock],
        )
        with flush_denormals():
            trainer.train()
            started = time.perf_counter()
            evaluate_stream(trainer.model, valid, RECIPE["VALID_BATCH"], preset["bptt"])
            if on_gpu:
                torch.cuda.synchronize()
            valid_seconds = time.perf_counter() - started

    timed = clock.times[args.warmup - 1 :]  # the end of the last warm-up step starts the clock
    per_step = [b - a for a, b in zip(timed, timed[1:])]
    mean = (timed[-1] - timed[0]) / args.steps
    median = statistics.median(per_step)
    training_hours = full_run_steps * mean / 3600
    with_validation_hours = training_hours + preset["epochs"] * valid_seconds / 3600
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"AWD-LSTM ({args.preset}: {preset['model']}, {parameters:,} parameters), {args.optimizer} lr {lr:g}, "
        f"batch {preset['batch_size']}, bptt {preset['bptt']}, on {args.device}"
    )
    print(f"{args.steps} steps after {args.warmup} warm-up: mean {mean * 1e3:.1f} ms/step, median {median * 1e3:.1f}")
    print(f"one validation pass: {valid_seconds:.2f} s")
    print(
        f"full {args.preset} run ({preset['epochs']} epochs x {steps_per_epoch} steps = {full_run_steps:,} steps): "
        f"{training_hours:.2f} h of training steps, {with_validation_hours:.2f} h with a validation pass per epoch"
    )
    if args.json:
        record = {
            "command": ["python", "scripts/bench_awd_lstm.py", *(sys.argv[1:] if argv is None else argv)],
            "preset": args.preset,
            "optimizer": args.optimizer,
            "lr": lr,
            "weight_drop": weight_drop,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "torch": torch.__version__,
            "model": {**preset["model"], "vocab_size": corpus.vocab_size, "parameters": parameters},
            "batch_size": preset["batch_size"],
            "bptt": preset["bptt"],
            "warmup_steps": args.warmup,
            "steps_timed": args.steps,
            "seconds_per_step": {"mean": mean, "median": median},
            "validation_pass_seconds": valid_seconds,
            "steps_per_epoch": steps_per_epoch,
            "epochs": preset["epochs"],
            "full_run_steps": full_run_steps,
            "full_run_hours": {"training_steps": training_hours, "with_validation_per_epoch": with_validation_hours},
            "step_end_seconds": [t - clock.times[0] for t in clock.times],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
