#!/usr/bin/env python
"""Run a grid of experiment runs (learning rates, SoftAdam's eta, seeds), resumably.

    # the PTB learning-rate sweep behind the cpu preset's rates
    python scripts/sweep.py ptb --optimizer softadam --lr 10 30 60 120 \\
        --results results/cpu/sweeps/ptb_lr --jobs 2 -- --preset cpu
    # SoftAdam's eta x lr sensitivity grid, one epoch per cell
    python scripts/sweep.py ptb --optimizer softadam --eta 0 0.5 1 2 4 10 --lr 10 30 100 300 \\
        --results results/cpu/sweeps/ptb_eta_lr --jobs 2 -- --preset cpu --epochs 1
    # translation runs go through scripts/run_iwslt14.py the same way
    python scripts/sweep.py iwslt14 --optimizer sgd --lr 0.1 0.3 --results results/cpu/sweeps/iwslt14_lr \\
        -- --preset cpu --data-bin data/multi30k.tokenized.de-en/data-bin

Each setting is one folder under --results (``softadam_lr30``, ``softadam_eta2_lr30``)
holding one record per seed, written by the experiment script itself when the run
has finished; a setting whose record exists is skipped, and an interrupted run resumes
from its own checkpoints (work folders under runs/sweeps/). Options after ``--`` go to
every run unchanged. With --jobs N, N runs go at once with one thread each (on the
2-core build machine two 1-thread runs finish sooner together than one after another
with two threads each). Each run's output goes to its log file; this prints one line
per run as it starts and ends.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from softadam_nlp.experiments.records import record_path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"ptb": "hf_examples/run_language_modeling.py", "iwslt14": "scripts/run_iwslt14.py"}
WORK_OPTION = {"ptb": "--output-dir", "iwslt14": "--work-dir"}


@dataclass(frozen=True)
class Run:
    experiment: str
    optimizer: str
    lr: float
    eta: float | None
    seed: int

    @property
    def setting(self) -> str:
        eta = f"_eta{self.eta:g}" if self.eta is not None else ""
        return f"{self.optimizer}{eta}_lr{self.lr:g}"

    @property
    def name(self) -> str:
        return f"{self.setting}/seed{self.seed}"


def grid(experiment: str, optimizer: str, lrs: list[float], etas: list[float] | None, seeds: list[int]) -> list[Run]:
    return [
        Run(experiment, optimizer, lr, eta, seed) for eta, lr, seed in itertools.product(etas or [None], lrs, seeds)
    ]


def command(run: Run, results: Path, work: Path, passthrough: list[str]) -> list[str]:
    work_dir = work / run.setting / f"seed{run.seed}"
    return [
        sys.executable,
        SCRIPTS[run.experiment],
        "--optimizer",
        run.optimizer,
        "--seed",
        str(run.seed),
        "--lr",
        f"{run.lr:g}",
        *(["--eta", f"{run.eta:g}"] if run.eta is not None else []),
        "--results",
        str(results / run.setting),
        WORK_OPTION[run.experiment],
        str(work_dir),
        *passthrough,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=sorted(SCRIPTS))
    p.add_argument("--optimizer", required=True)
    p.add_argument("--lr", type=float, nargs="+", required=True)
    p.add_argument("--eta", type=float, nargs="+", default=None, help="SoftAdam's eta values (default: the script's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--results", type=Path, required=True, help="one folder per setting goes here")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and logs (default: runs/sweeps/<results name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each when > 1")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; run nothing")
    args = p.parse_args(own)
    if args.eta is not None and args.optimizer != "softadam":
        p.error("--eta is SoftAdam's; drop it for other optimizers")
    if args.jobs < 1 or any(lr <= 0 for lr in args.lr) or any(e < 0 for e in args.eta or []):
        p.error("--jobs must be >= 1, learning rates > 0 and eta >= 0")
    work = args.work or REPO / "runs" / "sweeps" / args.results.name
    runs = grid(args.experiment, args.optimizer, args.lr, args.eta, args.seeds)
    pending = [r for r in runs if not record_path(args.results / r.setting, r.optimizer, r.seed).exists()]
    print(
        f"{len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to go "
        f"({args.jobs} at a time); records under {args.results}",
        flush=True,
    )
    if args.dry_run:
        for run in runs:
            print(
                ("pending  " if run in pending else "finished ")
                + " ".join(command(run, args.results, work, passthrough))
            )
        return 0

    environment = dict(os.environ, PYTHONPATH=str(REPO), **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {}))
    running: dict[subprocess.Popen, tuple[Run, float, Path]] = {}
    failed: list[tuple[Run, int, Path]] = []
    queue = list(pending)
    while queue or running:
        while queue and len(running) < args.jobs:
            run = queue.pop(0)
            log = work / run.setting / f"seed{run.seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as out:
                process = subprocess.Popen(
                    command(run, args.results, work, passthrough),
                    cwd=REPO,
                    env=environment,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            running[process] = (run, time.time(), log)
            print(f"{time.strftime('%H:%M:%S')} start {run.name} (log {log})", flush=True)
        time.sleep(2)
        for process in [p for p in running if p.poll() is not None]:
            run, started, log = running.pop(process)
            minutes = (time.time() - started) / 60
            if process.returncode == 0:
                print(f"{time.strftime('%H:%M:%S')} done  {run.name} in {minutes:.1f} min", flush=True)
            else:
                failed.append((run, process.returncode, log))
                print(
                    f"{time.strftime('%H:%M:%S')} FAILED {run.name} (exit {process.returncode}"
                    f"{', diverged' if process.returncode == 3 else ''}; see {log})",
                    flush=True,
                )
    for run, code, log in failed:
        print(f"failed: {run.name} exit {code} ({log})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
