#!/usr/bin/env python
"""`make demo`: the paper's two language experiments end to end at small scale.

1. Table 2's pipeline (Trainer): hf_examples/run_language_modeling.py --preset demo, an
   AWD-LSTM on Penn Treebank for one epoch, with SoftAdam, SGD and Adam; validation and
   test perplexity.
2. Table 3's pipeline (fairseq): scripts/prepare_iwslt14.py, then scripts/run_iwslt14.py
   --preset demo, a small transformer for 200 updates, with SoftAdam, SGD and AdamW;
   validation perplexity and test BLEU.
3. Table 2- and Table 3-shaped summaries (paper figures beside, and the unigram model's
   perplexity: where a model sits before it has learned more than word frequencies), a
   reading of them in a few sentences (a demo this short says nothing about the paper's
   claims), and both experiments' training-loss curves in one figure, written to --out.

The demo's learning rates and budgets come from a sweep of their own (docs/RESULTS.md,
"make demo"), chosen so that every optimizer leaves the unigram plateau.

Data, in this order: local copies in --data-dir, $SOFTADAM_DATA_DIR or ../shared/data
(PTB's ptb.*.txt; IWSLT'14's de-en.tgz, else Multi30k De-En as the translation
stand-in), else downloads: PTB from the Hugging Face hub, IWSLT'14 from fairseq's host,
each checked. The data used is printed. Every run writes its record only when it has
finished, and a second `make demo` reuses finished runs (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from softadam_nlp.data.ptb import find_ptb_dir
from softadam_nlp.data.translation import find_translation_source
from softadam_nlp.experiments.reporting import (
    demo_reading,
    load_records,
    markdown_table,
    plot_demo_curves,
    unigram_perplexity,
)

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


def ptb_source(data_dir: Path | None) -> tuple[list[str], Path | None]:
    """Arguments that point run_language_modeling.py at PTB (a local copy, else the hub),
    and the local folder if there is one."""
    try:
        folder = find_ptb_dir(data_dir)
    except FileNotFoundError:
        print("PTB: no local copy found; loading the Hugging Face hub's copy (md5-checked)", flush=True)
        return ["--hub-dataset"], None
    print(f"PTB: local copy in {folder}", flush=True)
    return ["--data-dir", str(folder)], folder


def unigram_reference(train: Path, valid: Path, eos: str) -> float | None:
    """The unigram model's validation perplexity, where the text files are at hand."""
    if not (train.is_file() and valid.is_file()):
        return None
    return unigram_perplexity(train.read_text().splitlines(), valid.read_text().splitlines(), eos)


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


# Per experiment: the figure panel's title, the loss as the toolkit logs it, and the
# logarithm that turns a perplexity into that loss's unit.
PANELS = {
    "ptb": ("Table 2 pipeline: PTB (Trainer, AWD-LSTM)", "training loss (nats/word, with AR/TAR)", math.log),
    "iwslt14": ("Table 3 pipeline: De-En (fairseq)", "training loss (bits/token, label-smoothed)", math.log2),
}


def summarize(experiment: str, records: list[dict], unigram: float | None) -> str:
    """The Table-shaped summary with the unigram model's perplexity under it."""
    reference = (
        f"Unigram model of the training text: val ppl {unigram:.1f}.\n"
        if unigram is not None
        else "Unigram model: not computed (the text files are not at hand).\n"
    )
    return f"{markdown_table(records, experiment)}\n{reference}"


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
    results: dict[str, tuple[list[dict], float | None]] = {}
    try:
        if "ptb" in args.experiments:
            data, ptb_dir = ptb_source(args.data_dir)
            data += ["--no-verify"] if args.no_verify else []
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
            unigram = ptb_dir and unigram_reference(ptb_dir / "ptb.train.txt", ptb_dir / "ptb.valid.txt", "<eos>")
            results["ptb"] = (load_records(args.out / "ptb"), unigram or None)
            summaries.append("## Table 2 shape: PTB language model (Trainer)\n\n" + summarize("ptb", *results["ptb"]))
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
            # The prepared text (BPE applied) lies beside the data-bin.
            unigram = unigram_reference(data_bin.parent / "train.en", data_bin.parent / "valid.en", "</s>")
            results["iwslt14"] = (load_records(args.out / "iwslt14"), unigram)
            summaries.append(
                "## Table 3 shape: De-En translation (fairseq)\n\n" + summarize("iwslt14", *results["iwslt14"])
            )
    except (DemoFailed, FileNotFoundError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    panels = [
        (PANELS[e][0], records, PANELS[e][1], PANELS[e][2](unigram) if unigram else None)
        for e, (records, unigram) in results.items()
    ]
    figure = plot_demo_curves(panels, args.out / "train_loss.png")
    total = time.time() - started
    ran = "\n".join(f"- {step}: {seconds:.0f} s" for step, seconds in timings.items())
    summary = (
        f"# make demo\n\n{demo_reading(results)}\n\n"
        + "\n".join(summaries)
        + f"\nTraining-loss curves of both pipelines: {figure}\n"
        + "\n## Wall time\n\nEach run, from its record (training + evaluation):\n\n"
        + "\n".join(record_times(args.out, args.experiments))
        + f"\n\nThis invocation, step by step (a reused run takes seconds):\n\n{ran}\n- total: {total:.0f} s\n"
    )
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nWritten: {args.out / 'summary.md'}, curves and records under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
