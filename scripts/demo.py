#!/usr/bin/env python
"""`make demo`: the paper's two language experiments end to end at small scale.

1. Table 2's pipeline (Trainer): hf_examples/run_language_modeling.py --preset demo, an
   AWD-LSTM on Penn Treebank for one epoch, with SoftAdam, SGD and Adam; validation and
   test perplexity.
2. Table 3's pipeline (fairseq): scripts/prepare_iwslt14.py, then scripts/run_iwslt14.py
   --preset demo, a small transformer for 200 updates, with SoftAdam, SGD and AdamW;
   validation perplexity and test BLEU.
3. Table 2- and Table 3-shaped summaries (paper figures beside; a demo this short says
   nothing about the paper's claims) and the training-loss curves, written to --out.

Data, in this order: local copies in --data-dir, $SOFTADAM_DATA_DIR or ../shared/data
(PTB's ptb.*.txt; IWSLT'14's de-en.tgz, else Multi30k De-En as the translation
stand-in), else downloads: PTB from the Hugging Face hub, IWSLT'14 from fairseq's host,
each checked. The data used is printed. Every run writes its record only when it has
finished, and a second `make demo` reuses finished runs (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from softadam_nlp.data.ptb import find_ptb_dir
from softadam_nlp.data.translation import find_translation_source
from softadam_nlp.experiments.reporting import load_records, markdown_table, plot_train_curves

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = {"ptb": ("softadam", "sgd", "adam"), "iwslt14": ("softadam", "sgd", "adamw")}


class DemoFailed(RuntimeError):
    """A step failed; its own output above says why."""


def run_step(title: str, command: list[str]) -> float:
    """Run one script with its output shown as it comes; returns its wall time."""
    print(f"\n=== {title}\n+ {' '.join(command)}", flush=True)
    started = time.time()
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise DemoFailed(f"{title} failed (its output is above)")
    return time.time() - started


def ptb_source(data_dir: Path | None) -> list[str]:
    """Arguments that point run_language_modeling.py at PTB: a local copy, else the hub."""
    try:
        folder = find_ptb_dir(data_dir)
    except FileNotFoundError:
        print("PTB: no local copy found; loading the Hugging Face hub's copy (md5-checked)", flush=True)
        return ["--hub-dataset"]
    print(f"PTB: local copy in {folder}", flush=True)
    return ["--data-dir", str(folder)]


def translation_data(args: argparse.Namespace, timings: dict[str, float]) -> Path:
    """A fairseq data-bin: --data-bin as given, else prepared from a local corpus or a download."""
    if args.data_bin:
        print(f"translation: the data-bin {args.data_bin}", flush=True)
        return args.data_bin
    source = find_translation_source(args.data_dir)
    command = [sys.executable, "scripts/prepare_iwslt14.py"]
    if source is None:
        print("translation: no local IWSLT'14 or Multi30k copy; downloading IWSLT'14", flush=True)
        corpus = "iwslt14"
    else:
        corpus, raw = source
        label = "IWSLT'14 De-En" if corpus == "iwslt14" else "Multi30k De-En (stand-in for IWSLT'14)"
        print(f"translation: {label}, local copy {raw}", flush=True)
        command += ["--corpus", corpus, "--raw-dir", str(raw)]
    timings["prepare translation data"] = run_step("prepare translation data (reused once done)", command)
    return REPO / "data" / f"{corpus}.tokenized.de-en" / "data-bin"


LOSS_UNITS = {"ptb": "training loss (nats/word, with AR/TAR)", "iwslt14": "training loss (bits/token, label-smoothed)"}


def summarize(experiment: str, records_dir: Path, out: Path) -> str:
    """The Table-shaped summary and the training curves (one validation point per run is
    all a demo this short has, so the curve is the logged training loss)."""
    records = load_records(records_dir)
    plot = plot_train_curves(
        records, out / f"{experiment}_train_loss.png", f"make demo: {experiment}", LOSS_UNITS[experiment]
    )
    return f"{markdown_table(records, experiment)}\nCurves: {plot}\n"


def record_times(out: Path, experiments: list[str]) -> list[str]:
    lines = []
    for experiment in experiments:
        for record in load_records(out / experiment):
            seconds = (record.get("train_seconds") or 0) + (record.get("eval_seconds") or 0)
            lines.append(f"- {experiment} {record['optimizer']}: {seconds:.0f} s ({record.get('date', '?')})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="folder with local corpora (ptb/, multi30k/, de-en.tgz)")
    p.add_argument("--data-bin", type=Path, default=None, help="an existing fairseq data-bin (skips preparation)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="records, curves and summary")
    p.add_argument("--experiments", nargs="+", choices=sorted(OPTIMIZERS), default=["ptb", "iwslt14"])
    p.add_argument("--preset", default="demo", help="the scripts' preset (tests use `tiny`)")
    p.add_argument("--no-verify", action="store_true", help="skip PTB's md5 check (generated test data)")
    p.add_argument("--fresh", action="store_true", help="redo finished runs")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    started = time.time()
    timings: dict[str, float] = {}
    summaries = []
    try:
        if "ptb" in args.experiments:
            data = ptb_source(args.data_dir) + (["--no-verify"] if args.no_verify else [])
            for optimizer in OPTIMIZERS["ptb"]:
                timings[f"ptb {optimizer}"] = run_step(
                    f"Table 2 pipeline (Trainer, AWD-LSTM on PTB): {optimizer}",
                    [
                        sys.executable,
                        "hf_examples/run_language_modeling.py",
                        *data,
                        "--optimizer",
                        optimizer,
                        "--preset",
                        args.preset,
                        "--results",
                        str(args.out / "ptb"),
                        "--output-dir",
                        str(args.out / "work" / "ptb" / optimizer),
                        *(["--force"] if args.fresh else []),
                    ],
                )
            summaries.append(
                "## Table 2 shape: PTB language model (Trainer)\n\n" + summarize("ptb", args.out / "ptb", args.out)
            )
        if "iwslt14" in args.experiments:
            data_bin = translation_data(args, timings)
            for optimizer in OPTIMIZERS["iwslt14"]:
                timings[f"iwslt14 {optimizer}"] = run_step(
                    f"Table 3 pipeline (fairseq, transformer): {optimizer}",
                    [
                        sys.executable,
                        "scripts/run_iwslt14.py",
                        "--optimizer",
                        optimizer,
                        "--preset",
                        args.preset,
                        "--data-bin",
                        str(data_bin),
                        "--results",
                        str(args.out / "iwslt14"),
                        "--work-dir",
                        str(args.out / "work" / "iwslt14"),
                        *(["--force"] if args.fresh else []),
                    ],
                )
            summaries.append(
                "## Table 3 shape: De-En translation (fairseq)\n\n"
                + summarize("iwslt14", args.out / "iwslt14", args.out)
            )
    except (DemoFailed, FileNotFoundError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    total = time.time() - started
    ran = "\n".join(f"- {step}: {seconds:.0f} s" for step, seconds in timings.items())
    summary = (
        "# make demo\n\nA smoke-scale run of both pipelines: the numbers show that everything "
        "works end to end, not how the optimizers compare (see docs/RESULTS.md).\n\n"
        + "\n".join(summaries)
        + "\n## Wall time\n\nEach run, from its record (training + evaluation):\n\n"
        + "\n".join(record_times(args.out, args.experiments))
        + f"\n\nThis invocation, step by step (a reused run takes seconds):\n\n{ran}\n- total: {total:.0f} s\n"
    )
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nWritten: {args.out / 'summary.md'}, curves and records under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
