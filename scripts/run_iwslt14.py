#!/usr/bin/env python
"""Train and evaluate one IWSLT'14 De-En transformer run with fairseq (Table 3).

    python scripts/run_iwslt14.py --optimizer softadam --seed 1 --preset cpu \
        --data-bin data/multi30k.tokenized.de-en/data-bin

One run: fairseq-train (SoftAdam without warmup; AdamW and SGD with warmup; linear
decay to 0), the last --average-last epoch checkpoints averaged, fairseq-validate for
the validation perplexity (fairseq's ppl, 2^nll), fairseq-generate --beam 5 --remove-bpe
on test for tokenized BLEU (as the paper's era reported it) and sacreBLEU on
detokenized text with its signature. The record goes to RESULTS/<optimizer>-seed<N>.json
(RESULTS: --results, by default runs/results/<preset>/iwslt14; the committed records under
results/ are written only by commands that name them), when everything has finished. A
record there of the same settings means the run has finished (--force reruns); one of
other settings is an error that says what differs.
Training resumes from its last checkpoint when rerun after a crash.

Presets: `paper` is fairseq's transformer_iwslt_de_en recipe (label-smoothed CE 0.1,
dropout 0.3, max-tokens 4096, shared decoder embeddings); `cpu` is a 3-layer 256-d model
for the Multi30k stand-in on CPUs; `tiny` is for tests. The `cpu` learning rates are
the best of the sweep in docs/RESULTS.md (SoftAdam, AdamW; SGD: the largest rate that
did not diverge); the `paper` ones are untuned starting points (no GPU here).
--lr and --max-update override.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from softadam_nlp.eta_schedule import TOOLKIT_ETA_SCHEDULES, eta_schedule_cli_error
from softadam_nlp.experiments.fairseq_runs import (
    average_checkpoints,
    check_fairseq_command,
    checkpoints_to_average,
    detokenized_bleu,
    divergence,
    epoch_curves,
    fairseq_tool,
    finished_updates,
    parse_fairseq_log,
    parse_generate_output,
    progress_line,
    recover_last_checkpoint,
    train_curve,
)
from softadam_nlp.experiments.records import RecordConflict, default_results, finished_with_settings, write_record
from softadam_nlp.experiments.records import record_path as make_record_path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "fairseq_plugins"

MODELS = {
    # Liu et al. (2019)'s recipe, which the paper follows for Table 3: no shared decoder embedding.
    "paper": ["--arch", "transformer_iwslt_de_en", "--dropout", "0.3"],
    "cpu": [
        "--arch",
        "transformer",
        "--share-decoder-input-output-embed",
        "--dropout",
        "0.3",
        "--encoder-layers",
        "3",
        "--decoder-layers",
        "3",
        "--encoder-embed-dim",
        "256",
        "--decoder-embed-dim",
        "256",
        "--encoder-ffn-embed-dim",
        "1024",
        "--decoder-ffn-embed-dim",
        "1024",
        "--encoder-attention-heads",
        "4",
        "--decoder-attention-heads",
        "4",
    ],
    "demo": [
        "--arch",
        "transformer",
        "--share-decoder-input-output-embed",
        "--dropout",
        "0.1",
        "--encoder-layers",
        "2",
        "--decoder-layers",
        "2",
        "--encoder-embed-dim",
        "128",
        "--decoder-embed-dim",
        "128",
        "--encoder-ffn-embed-dim",
        "512",
        "--decoder-ffn-embed-dim",
        "512",
        "--encoder-attention-heads",
        "4",
        "--decoder-attention-heads",
        "4",
    ],
    "tiny": [
        "--arch",
        "transformer",
        "--share-decoder-input-output-embed",
        "--dropout",
        "0.1",
        "--encoder-layers",
        "1",
        "--decoder-layers",
        "1",
        "--encoder-embed-dim",
        "32",
        "--decoder-embed-dim",
        "32",
        "--encoder-ffn-embed-dim",
        "64",
        "--decoder-ffn-embed-dim",
        "64",
        "--encoder-attention-heads",
        "2",
        "--decoder-attention-heads",
        "2",
    ],
}
# Max updates, max tokens per batch, warmup updates of AdamW/SGD, epoch checkpoints averaged,
# beam size for the test set (demo: greedy, since beam search over 1,000 sentences from a
# barely trained model takes longer than its training).
# cpu: sized from a 100-update calibration run (about 0.6 updates/s on the 2-core build
# machine, Multi30k: ~110 updates an epoch), so that training takes under 20 minutes.
# demo: chosen by its own sweep (results/demo/sweeps/iwslt14_lr*): at 200 updates of 2,048
# tokens SGD and SoftAdam stayed near the unigram model's perplexity whatever the rate;
# 400 updates of 1,024 tokens (the same tokens, about the same time) let every optimizer
# leave it. Its rates: SoftAdam 1 of 0.5/1/2, SGD 0.3 of 0.3/0.5 (1 and 3 diverged at 200
# updates), AdamW 3e-3 (1e-2 was worse at 200 updates).
BUDGET = {
    "paper": {"max_update": 70_000, "max_tokens": 4000, "warmup": 4000, "average_last": 10, "beam": 5},
    "cpu": {"max_update": 700, "max_tokens": 4096, "warmup": 100, "average_last": 2, "beam": 5},
    "demo": {"max_update": 400, "max_tokens": 1024, "warmup": 100, "average_last": 1, "beam": 1},
    "tiny": {"max_update": 30, "max_tokens": 1000, "warmup": 5, "average_last": 2, "beam": 5},
}
OPTIMIZERS = {  # per optimizer: fairseq options and the default learning rate per preset
    "softadam": {
        "args": ["--optimizer", "softadam", "--softadam-eta", "1.0", "--weight-decay", "0.0001"],
        "lr": {"paper": 0.5, "cpu": 0.5, "demo": 1.0, "tiny": 1.0},
        "warmup": False,
    },
    "adamw": {  # fairseq's adam decouples weight decay (AdamW)
        "args": ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.0001"],
        "paper_args": ["--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--weight-decay", "0.0001"],
        "lr": {"paper": 3e-4, "cpu": 1e-3, "demo": 3e-3, "tiny": 3e-3},
        "warmup": True,
    },
    "sgd": {
        "args": ["--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0.0001"],
        "lr": {"paper": 0.3, "cpu": 0.1, "demo": 0.3, "tiny": 0.3},
        "warmup": True,
    },
}


def device_flags() -> list[str]:
    """fairseq runs on the GPU when there is one; ``--cpu`` otherwise."""
    return [] if torch.cuda.is_available() else ["--cpu"]


# Options of the fairseq-train command that say where things are or how often to log, not
# what is trained: left out when a record's command is compared with a new run's.
NOT_SETTINGS = {"--user-dir", "--save-dir", "--log-file", "--log-interval", "--log-format", "--cpu"}


def command_settings(command: list[str]) -> dict[str, str]:
    """A fairseq-train command's options, as {option: its value(s)}, without the data-bin
    path and the options in NOT_SETTINGS."""
    settings: dict[str, str] = {}
    option = None
    for token in command[1:]:
        if token.startswith("--"):
            option = token
            settings[option] = ""
        elif option is not None:
            settings[option] = f"{settings[option]} {token}".strip()
    return {k: v for k, v in settings.items() if k not in NOT_SETTINGS}


def train_command(args: argparse.Namespace, save_dir: Path, log_file: Path) -> list[str]:
    budget = BUDGET[args.preset]
    max_update = args.max_update or budget["max_update"]
    spec = OPTIMIZERS[args.optimizer]
    lr = args.lr if args.lr is not None else spec["lr"][args.preset]
    optimizer_args = list(spec["paper_args"] if args.preset == "paper" and "paper_args" in spec else spec["args"])
    if args.eta is not None:
        optimizer_args[optimizer_args.index("--softadam-eta") + 1] = str(args.eta)
    if args.eta_schedule != "constant":
        optimizer_args += ["--softadam-eta-schedule", args.eta_schedule, "--softadam-eta-end", str(args.eta_end)]
    warmup = args.warmup if args.warmup is not None else budget["warmup"] if spec["warmup"] else 0
    if args.preset == "paper":
        # Liu et al. (2019)'s linear schedule (fairseq_plugins/linear_schedule.py): warm up from 1e-8,
        # decay to 1e-9 at --max-update; the warmup-free optimizer (SoftAdam) gets --warmup-updates 1,
        # as the recipe's RAdam does, and starts at --lr.
        warmup_args = (
            ["--warmup-updates", str(warmup), "--warmup-init-lr", "1e-08"] if warmup else ["--warmup-updates", "1"]
        )
        schedule = ["--lr-scheduler", "linear", *warmup_args, "--min-lr", "1e-09"]
    else:
        # linear decay to 0 after a linear warmup from lr/warmup (fairseq's polynomial_decay)
        schedule = [
            "--lr-scheduler",
            "polynomial_decay",
            "--warmup-updates",
            str(warmup),
            "--total-num-update",
            str(max_update),
        ]
    return [
        fairseq_tool("fairseq-train"),
        str(args.data_bin),
        "--user-dir",
        str(PLUGIN),
        "--task",
        "translation",
        *MODELS[args.preset],
        *optimizer_args,
        "--lr",
        str(lr),
        *schedule,
        "--max-update",
        str(max_update),
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--max-tokens",
        str(args.max_tokens or budget["max_tokens"]),
        "--seed",
        str(args.seed),
        "--save-dir",
        str(save_dir),
        "--keep-last-epochs",
        str(args.average_last),
        "--log-format",
        "json",
        "--log-interval",
        str(max(1, min(50, max_update // 10))),
        "--log-file",
        str(log_file),
        *device_flags(),
    ]


class ToolFailed(RuntimeError):
    def __init__(self, command: list[str], result: subprocess.CompletedProcess):
        super().__init__(f"{Path(command[0]).name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        self.stderr = result.stderr


def run(command: list[str], show_progress: bool = False) -> str:
    """Run a fairseq tool and return its output. With ``show_progress`` (fairseq-train, which
    runs for minutes to days) its log lines are summarized on stdout as they come; the
    streams are then merged, which only suits output read for its log lines."""
    print("+ " + " ".join(command), flush=True)
    if not show_progress:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolFailed(command, result)
        return result.stdout + result.stderr
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(line)
            summary = progress_line(line)
            if summary:
                print("  " + summary, flush=True)
    output = "".join(lines)
    if process.returncode != 0:
        raise ToolFailed(command, subprocess.CompletedProcess(command, process.returncode, output, output))
    return output


def validate_command(args: argparse.Namespace, checkpoint: Path) -> list[str]:
    return [
        fairseq_tool("fairseq-validate"),
        str(args.data_bin),
        "--user-dir",
        str(PLUGIN),
        "--task",
        "translation",
        "--path",
        str(checkpoint),
        "--valid-subset",
        "valid",
        "--max-tokens",
        "4096",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--log-format",
        "json",
        *device_flags(),
    ]


def generate_command(args: argparse.Namespace, checkpoint: Path) -> list[str]:
    # Outputs are capped at 1.2 x source + 10 tokens: a weak model's degenerate
    # 200-token beams otherwise dominate the CPU time; real translations fit easily.
    return [
        fairseq_tool("fairseq-generate"),
        str(args.data_bin),
        "--user-dir",
        str(PLUGIN),
        "--path",
        str(checkpoint),
        "--beam",
        str(BUDGET[args.preset]["beam"]),
        "--remove-bpe",
        "--max-len-a",
        "1.2",
        "--max-len-b",
        "10",
        "--batch-size",
        "128",
        "--required-batch-size-multiple",
        "1",
        *device_flags(),
    ]


def validate(args: argparse.Namespace, checkpoint: Path) -> dict:
    record = parse_fairseq_log(run(validate_command(args, checkpoint)).splitlines())["valid"][-1]
    return {key: float(record[key]) for key in ("valid_loss", "valid_nll_loss", "valid_ppl")}


def dry_run(args: argparse.Namespace, work: Path) -> int:
    """Print the run's fairseq command lines after the installed fairseq's own parsers
    have accepted them (a GPU job should not fail on a typo after its queue wait)."""
    averaged = work / "checkpoint_averaged.pt"
    commands = [
        train_command(args, work / "checkpoints", work / "train.log"),
        validate_command(args, averaged),
        generate_command(args, averaged),
    ]
    for command in commands:
        try:
            check_fairseq_command(command)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(shlex.join(command))
    import fairseq

    print(
        f"# {len(commands)} commands accepted by fairseq {fairseq.__version__}'s parsers; "
        f"then checkpoint averaging over the last {args.average_last} epochs and sacreBLEU"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--preset", choices=sorted(MODELS), default="cpu")
    p.add_argument("--data-bin", type=Path, default=Path("data/iwslt14.tokenized.de-en/data-bin"))
    p.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--eta", type=float, default=None, help="SoftAdam's eta (default: 1.0, the paper's)")
    p.add_argument(
        "--eta-schedule",
        choices=TOOLKIT_ETA_SCHEDULES,
        default="constant",
        help="SoftAdam: move eta from --eta to --eta-end over the run (default: constant)",
    )
    p.add_argument(
        "--eta-end", type=float, default=None, help="SoftAdam: eta at the end of a linear or cosine --eta-schedule"
    )
    p.add_argument("--max-update", type=int, default=None, help="override the preset's budget")
    p.add_argument("--max-tokens", type=int, default=None, help="override the preset's tokens per batch")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warmup updates (default: the preset's for AdamW and SGD, none for SoftAdam)",
    )
    p.add_argument("--average-last", type=int, default=None, help="epoch checkpoints to average (preset's default)")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder for the run's record (default: runs/results/<preset>/iwslt14; results/ holds the committed ones)",
    )
    p.add_argument("--work-dir", type=Path, default=Path("runs/iwslt14"), help="checkpoints and logs")
    p.add_argument("--force", action="store_true", help="rerun even if the record exists")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the fairseq command lines with fairseq's parsers and print them; run nothing",
    )
    args = p.parse_args(argv)
    if args.eta is not None and (args.optimizer != "softadam" or args.eta < 0):
        p.error("--eta is SoftAdam's and must be >= 0")
    eta_schedule_error = eta_schedule_cli_error(args.optimizer, args.eta_schedule, args.eta_end)
    if eta_schedule_error:
        p.error(eta_schedule_error)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    for option in ("max_update", "max_tokens"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1")
    if not args.dry_run and not (args.data_bin / "dict.de.txt").is_file():
        p.error(f"{args.data_bin} is not a fairseq data-bin (no dict.de.txt); run scripts/prepare_iwslt14.py first")
    args.average_last = args.average_last or BUDGET[args.preset]["average_last"]
    if args.average_last < 1:
        p.error("--average-last must be >= 1")

    name = f"{args.optimizer}-seed{args.seed}"
    if args.dry_run:
        return dry_run(args, args.work_dir / args.preset / name)
    args.results = args.results or default_results(args.preset, "iwslt14")
    record_path = make_record_path(args.results, args.optimizer, args.seed)
    work = args.work_dir / args.preset / name
    command = train_command(args, work / "checkpoints", work / "train.log")
    try:  # finished only if a record of these very settings exists
        finished = not args.force and finished_with_settings(
            record_path, command_settings(command), lambda record: command_settings(record["command"]), every_key=True
        )
    except RecordConflict as conflict:
        print(f"error: {conflict}", file=sys.stderr)
        return 2
    if finished:
        print(f"{record_path}: this run has finished (same settings): skipping (--force reruns)")
        return 0
    if args.force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    max_update = int(command[command.index("--max-update") + 1])
    recovered = recover_last_checkpoint(work / "checkpoints")
    if recovered:
        print(recovered)
    if finished_updates(work / "checkpoints" / "checkpoint_last.pt") < max_update:
        try:
            run(command, show_progress=True)  # resumes from work/checkpoints/checkpoint_last.pt after a crash
        except ToolFailed as failure:
            # fairseq-fixed reruns a step with non-finite gradients under its NaN detector,
            # which then crashes inside torch (StopIteration): say what happened instead.
            log = (work / "train.log").read_text().splitlines() if (work / "train.log").exists() else []
            diverged = divergence(parse_fairseq_log(log))
            if diverged is None and "gradients are Nan/Inf" not in failure.stderr:
                raise
            where = (
                f": loss {diverged['loss']} at update {diverged['num_updates']} (lr {diverged['lr']})"
                if diverged
                else " (non-finite gradients)"
            )
            print(
                f"error: training diverged{where}; no record written. Try a lower --lr. Log: {work / 'train.log'}",
                file=sys.stderr,
            )
            return 3
    else:
        print(f"training already finished in {work}: evaluating", flush=True)
    eval_started = time.time()
    log = parse_fairseq_log((work / "train.log").read_text().splitlines())
    curve = epoch_curves(log)
    checkpoints = checkpoints_to_average(work / "checkpoints", args.average_last)
    averaged = average_checkpoints(checkpoints, work / "checkpoint_averaged.pt")
    valid = validate(args, averaged)
    generation = generate_command(args, averaged)
    generated = parse_generate_output(run(generation))
    ids = sorted(generated["refs"])
    sacre = detokenized_bleu([generated["hyps"][i] for i in ids], [generated["refs"][i] for i in ids], "en")
    record = {
        "experiment": "iwslt14",
        "preset": args.preset,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "data_bin": str(args.data_bin),
        "command": command,
        "generate_command": generation,
        "epochs": curve,
        "train_curve": train_curve(log),
        "averaged_checkpoints": [c.name for c in checkpoints],
        **valid,
        "test_sentences": len(ids),
        "tokenized_bleu": generated["tokenized_bleu"],
        **sacre,
        # training wall time, summed over resumed processes (epoch_curves), then this evaluation
        "train_seconds": curve[-1].get("wall_seconds") if curve else None,
        "eval_seconds": time.time() - eval_started,
    }
    write_record(record_path, record)
    print(
        f"{name}: valid ppl {valid['valid_ppl']:.2f}, test BLEU {generated['tokenized_bleu']:.2f} (tokenized), "
        f"sacreBLEU {sacre['sacrebleu']:.2f} -> {record_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
