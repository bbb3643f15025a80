#!/usr/bin/env python
"""Turn run records into a Table 2/3-shaped Markdown table and a validation-perplexity plot.

    python scripts/report.py --experiment iwslt14 --records results/cpu/iwslt14 \
        --plot docs/figures/iwslt14_cpu_valid_ppl.png

Rows are optimizers (mean ± std over the seeds found; SoftAdam runs with an eta schedule
get a row per schedule), with the paper's figures in adjacent columns; the plot is
validation perplexity per epoch, mean over seeds. Several --records folders are pooled:

    python scripts/report.py --experiment ptb --records results/cpu/ptb results/cpu/eta_schedule/ptb
--by-lr tabulates a learning-rate sweep (and --plot draws it against the rate); --heatmap PNG
tabulates and draws SoftAdam's eta x learning-rate sensitivity grid:

    python scripts/report.py --experiment ptb --records results/cpu/sweeps/ptb_eta_lr \
        --heatmap docs/figures/ptb_softadam_eta_lr.png

--per-seed BASELINE adds a seed-by-seed table, each run's difference from BASELINE's run
of the same seed beside it (--optimizer keeps one optimizer's records):

    python scripts/report.py --experiment ptb --records results/cpu/ptb results/cpu/eta_schedule/ptb \
        --optimizer softadam --per-seed softadam

--per-epoch adds each run's validation perplexity after every epoch, six epochs to a column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softadam_nlp.experiments.reporting import (
    COLUMNS,
    load_records,
    markdown_table,
    per_epoch_table,
    per_seed_table,
    plot_lr_sweep,
    plot_sensitivity_heatmap,
    plot_valid_curves,
    sensitivity_table,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=sorted(COLUMNS), required=True)
    p.add_argument(
        "--records",
        type=Path,
        nargs="+",
        required=True,
        help="folders of run records (*.json, searched recursively), pooled",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the curves to this PNG (with --by-lr: the metric against the learning rate)",
    )
    p.add_argument("--title", default=None)
    p.add_argument("--by-lr", action="store_true", help="one row per optimizer and learning rate (an lr sweep)")
    p.add_argument(
        "--heatmap",
        type=Path,
        default=None,
        help="SoftAdam's eta x lr grid: print it and draw it to this PNG (instead of the table)",
    )
    p.add_argument("--optimizer", default=None, help="only this optimizer's records (e.g. softadam)")
    p.add_argument(
        "--per-seed",
        metavar="BASELINE",
        default=None,
        help="also print a table per seed with each run's difference from BASELINE's run of the same "
        "seed (a row label of the main table, e.g. softadam)",
    )
    p.add_argument(
        "--per-epoch",
        action="store_true",
        help="also print each run's validation perplexity after every epoch (one row per run and seed)",
    )
    args = p.parse_args(argv)
    # A mistyped or not-yet-produced folder would otherwise just add no rows, and the table
    # would quietly lack the runs the reader asked for.
    missing = [str(folder) for folder in args.records if not folder.is_dir()]
    if missing:
        print(f"error: --records: no such folder: {' '.join(missing)}", file=sys.stderr)
        return 2
    records = [
        r
        for folder in args.records
        for r in load_records(folder)
        if r.get("experiment", args.experiment) == args.experiment and args.optimizer in (None, r.get("optimizer"))
    ]
    if not records:
        only = f" {args.optimizer}" if args.optimizer else ""
        print(f"error: no {args.experiment}{only} records under {' '.join(map(str, args.records))}", file=sys.stderr)
        return 2
    if args.heatmap:
        print(sensitivity_table(records))
        plot_sensitivity_heatmap(
            records, args.heatmap, args.title or f"{args.experiment}: SoftAdam validation perplexity"
        )
        print(f"heatmap: {args.heatmap}")
        return 0
    print(markdown_table(records, args.experiment, by_lr=args.by_lr))
    if args.per_seed:
        try:
            print(per_seed_table(records, args.experiment, baseline=args.per_seed))
        except ValueError as error:
            print(f"error: --per-seed: {error}", file=sys.stderr)
            return 2
    if args.per_epoch:
        print(per_epoch_table(records))
    if args.plot:
        title = args.title or f"{args.experiment}: validation perplexity"
        (plot_lr_sweep if args.by_lr else plot_valid_curves)(records, args.plot, title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
