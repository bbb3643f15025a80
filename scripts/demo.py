#!/usr/bin/env python
"""`make demo`: SoftAdam vs SGD vs Adam on a small LSTM language model on real PTB.

Trains the same tied one-layer LSTM (softadam_nlp.experiments.small_lm) once per
optimizer, prints a table of validation perplexity and writes the curves as a PNG.
Each finished run is saved as JSON under --out; a second invocation with the same
settings reuses it instead of training again (--fresh retrains).

Data: --data-dir, else $SOFTADAM_DATA_DIR, else ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from softadam_nlp.data.ptb import load_ptb
from softadam_nlp.experiments.small_lm import OptimizerSpec, SmallLMConfig, train_small_lm

# Learning rates from a 300-step probe on this model (docs/RESULTS.md, "Demo").
# SoftAdam uses an SGD-scale rate and no warmup; SGD has momentum 0.9.
DEFAULT_SPECS = {
    "softadam": OptimizerSpec("softadam", 100.0, (("eta", 1.0),)),
    "sgd": OptimizerSpec("sgd", 10.0, (("momentum", 0.9),)),
    "adam": OptimizerSpec("adam", 1e-2),
}


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in records:
        steps = [point["step"] for point in record["curve"]]
        ax.plot(steps, [point["valid_ppl_prefix"] for point in record["curve"]], marker="o", label=record["spec"])
    ax.set_yscale("log")
    ax.set_xlabel("training step (batch 20 x 35 tokens)")
    ax.set_ylabel(f"valid perplexity (first {records[0]['config']['eval_tokens']:,} tokens)")
    ax.set_title("Small tied LSTM on PTB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with ptb.{train,valid,test}.txt")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where records and the plot go")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_SPECS), choices=list(DEFAULT_SPECS))
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                        help="override an optimizer's learning rate, e.g. --lr softadam=30 (repeatable)")
    parser.add_argument("--steps", type=int, default=SmallLMConfig.steps, help="training steps per optimizer")
    parser.add_argument("--eval-every", type=int, default=SmallLMConfig.eval_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="retrain even if a finished record exists")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the md5 check of the PTB files (other copies; results not comparable)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be >= 1")

    try:
        corpus = load_ptb(args.data_dir, verify=not args.no_verify)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"data: Penn Treebank from {corpus.directory} ({'md5 NOT verified' if args.no_verify else 'md5 verified'}; vocab {corpus.vocab_size:,}, "
          f"{corpus.splits['train'].numel():,} training tokens)", flush=True)

    specs = dict(DEFAULT_SPECS)
    for override in args.lr:
        name, _, value = override.partition("=")
        if name not in specs:
            parser.error(f"--lr {override}: unknown optimizer {name!r} (choose from {', '.join(specs)})")
        try:
            specs[name] = replace(specs[name], lr=float(value))
        except ValueError:
            parser.error(f"--lr {override}: {value!r} is not a number")
        if specs[name].lr <= 0:
            parser.error(f"--lr {override}: the learning rate must be > 0")

    config = replace(SmallLMConfig(), steps=args.steps, eval_every=args.eval_every, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.optimizers:
        spec = specs[name]
        path = args.out / f"{name}.json"
        if path.exists() and not args.fresh:
            record = json.loads(path.read_text())
            if record["config"] == json.loads(json.dumps(config.__dict__)) and record["spec"] == spec.describe():
                print(f"{spec.describe()}: reusing finished run {path}", flush=True)
                records.append(record)
                continue
        record = train_small_lm(corpus, spec, config, progress=lambda line: print(line, flush=True))
        # Write to a temporary name first so an interrupted write never looks finished.
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
        records.append(record)

    print(f"\nValidation perplexity after {config.steps} steps (full PTB valid set, lower is better):\n")
    print("| optimizer | valid ppl | train time |")
    print("|---|---:|---:|")
    for record in sorted(records, key=lambda r: r["valid_ppl"]):
        print(f"| {record['spec']} | {record['valid_ppl']:.2f} | {record['train_seconds']:.0f} s |")
    plot = args.out / "valid_ppl_curves.png"
    plot_curves(records, plot)
    print(f"\ncurves: {plot}\nrecords: {args.out}/*.json")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"(demo took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
