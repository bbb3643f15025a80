"""Pieces of a fairseq translation experiment: logs, checkpoint averaging, BLEU.

Used by scripts/run_iwslt14.py; each piece works on files fairseq writes, so it can be
tested without training.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch


def fairseq_tool(name: str) -> str:
    """A fairseq console script: beside this Python (a venv not on PATH), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


FAIRSEQ_PARSERS = {  # console script -> the fairseq.options parser it builds
    "fairseq-train": "get_training_parser",
    "fairseq-validate": "get_validation_parser",
    "fairseq-generate": "get_generation_parser",
}


def check_fairseq_command(command: Sequence[str]) -> None:
    """Parse a fairseq-train/-validate/-generate command line with the installed fairseq's
    own parser (architecture, task, optimizer and --user-dir options included); raise
    ValueError with fairseq's message if it is rejected. Nothing is run or read."""
    from fairseq import options

    tool = Path(command[0]).name
    if tool not in FAIRSEQ_PARSERS:
        raise ValueError(f"no fairseq parser known for {tool!r} (one of {sorted(FAIRSEQ_PARSERS)})")
    parser = getattr(options, FAIRSEQ_PARSERS[tool])()
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            options.parse_args_and_arch(parser, list(command[1:]))
    except SystemExit:
        error = messages.getvalue().strip().splitlines()
        raise ValueError(f"{tool} rejects the command: {error[-1] if error else 'unknown error'}") from None


# Options for a fairseq-train run cut short to be timed: no checkpoints, no validation,
# and no background prefetch thread. fairseq's prefetch (`--data-buffer-size`, default
# 10) runs in a daemon thread; when the process exits right after its last update, that
# thread can still be freeing a batch's tensors as the interpreter finalizes, and
# CPython 3.11 then ends it by an unwind that torch's C++ frames turn into
# `terminate called without an active exception` (SIGABRT, now and then; a core dump
# shows the thread in THPVariable_dealloc -> take_gil -> pthread_exit). A run
# that saves and validates at its end leaves the thread blocked on a full queue, safe.
TIMED_RUN_OPTIONS = ("--no-save", "--disable-validation", "--data-buffer-size", "0")


# fairseq_cli/train.py logs this once as each fairseq-train process starts.
_PROCESS_START = re.compile(r"\btraining on \d+ devices")


def parse_fairseq_log(lines: Iterable[str]) -> dict[str, list[dict]]:
    """Per-epoch `train` and `valid` records from `--log-format json` output.

    Reads both the console form (`... | train | {json}`) and the bare JSON lines of a
    `--log-file`; a record is an epoch's train or valid summary by its keys. A log that
    resumed runs append to holds several fairseq processes: each record gets
    `"process"`, the number of the process that logged it (0, 1, ...; counted from
    fairseq-train's "training on N devices" start line).
    """
    records: dict[str, list[dict]] = {"train": [], "valid": [], "train_inner": []}
    process = -1
    for line in lines:
        if _PROCESS_START.search(line):
            process += 1
            continue
        start = line.find('{"')
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        record["process"] = max(process, 0)
        if "train_loss" in record:
            records["train"].append(record)
        elif "valid_loss" in record:
            records["valid"].append(record)
        elif "loss" in record and "num_updates" in record:  # every --log-interval updates
            records["train_inner"].append(record)
    return records


def progress_line(line: str) -> str | None:
    """One short line for a fairseq `--log-format json` console line worth showing while
    training runs (every --log-interval updates and each epoch's summaries), else None."""
    start = line.find('{"')
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    if "train_loss" in record:
        return (
            f"epoch {record['epoch']} done: update {record.get('train_num_updates')}, train loss "
            f"{record['train_loss']}, ppl {record.get('train_ppl')}, {record.get('train_wall')} s"
        )
    if "valid_loss" in record:
        return f"epoch {record['epoch']} valid: loss {record['valid_loss']}, ppl {record.get('valid_ppl')}"
    if "loss" in record and "num_updates" in record:
        return (
            f"epoch {record.get('epoch')} update {record['num_updates']}: loss {record['loss']}, "
            f"ppl {record.get('ppl')}, lr {record.get('lr')}, {record.get('wall')} s"
        )
    return None


def divergence(records: dict[str, list[dict]]) -> dict | None:
    """The first logged training interval whose loss or perplexity is not finite
    (`{"num_updates", "loss", "lr"}`), or None. fairseq-fixed's NaN detector then
    crashes with a StopIteration from inside torch instead of saying so."""
    for record in records.get("train_inner", []):
        if not all(math.isfinite(float(record.get(key, 0))) for key in ("loss", "ppl")):
            return {"num_updates": int(record["num_updates"]), "loss": record["loss"], "lr": record.get("lr")}
    return None


def train_curve(records: dict[str, list[dict]]) -> list[dict]:
    """[{step, loss}, ...] every --log-interval updates (fairseq's loss is in bits per
    token); a resumed run's repeated intervals keep their last value."""
    points = {int(r["num_updates"]): float(r["loss"]) for r in records.get("train_inner", [])}
    return [{"step": step, "loss": points[step]} for step in sorted(points)]


def epoch_curves(records: dict[str, list[dict]]) -> list[dict]:
    """[{epoch, train_loss, train_ppl, valid_loss, valid_ppl}, ...] with floats (fairseq logs strings).

    A log appended to by a resumed run can repeat an epoch; its last record wins. fairseq
    saves an epoch's checkpoint before it logs the epoch's training summary, so a run
    killed in between resumes after that epoch without ever logging it: such an epoch
    keeps its validation figures and has no train_* or wall_seconds.

    `wall_seconds` is the training time up to the end of the epoch, summed over the
    processes of a resumed run (see `_cumulative_wall`).
    """
    valid = {int(r["epoch"]): r for r in records["valid"]}
    train = {int(r["epoch"]): r for r in records["train"]}
    wall = _cumulative_wall(records["train"])
    curve = []
    for epoch in sorted(train.keys() | valid.keys()):
        if epoch in train:
            r = train[epoch]
            row = {
                "epoch": epoch,
                "num_updates": int(r["train_num_updates"]),
                "wall_seconds": wall[epoch],
                "train_loss": float(r["train_loss"]),
                "train_ppl": float(r["train_ppl"]),
            }
        else:
            row = {"epoch": epoch}
            if "valid_num_updates" in valid[epoch]:
                row["num_updates"] = int(valid[epoch]["valid_num_updates"])
        if epoch in valid:
            row["valid_loss"] = float(valid[epoch]["valid_loss"])
            row["valid_ppl"] = float(valid[epoch]["valid_ppl"])
        curve.append(row)
    return curve


def _cumulative_wall(train_summaries: list[dict]) -> dict[int, float]:
    """Epoch -> seconds of training up to its end, across resumes.

    fairseq's `train_wall` counts from the start of its process, so it starts again
    from 0 when a run resumes. The resumed process continues from the checkpoint of the
    epoch before its first one, so its clock is added to that epoch's total. Work lost
    to a kill (the unfinished epoch) is not counted; neither is an epoch whose summary
    a kill cut off, so the figure is then a lower bound.
    """
    total: dict[int, float] = {}
    previous = None  # (process, epoch, train_wall) of the summary before, in log order
    offset = 0.0
    for summary in train_summaries:
        process, epoch = summary.get("process", 0), int(summary["epoch"])
        seconds = float(summary.get("train_wall", "nan"))
        # A new process by its start line, or (in a log without them) by its clock going
        # back. fairseq 0.12 writes each summary to its --log-file several times over.
        if previous is not None and (process != previous[0] or seconds < previous[2]):
            offset = total.get(epoch - 1, total[previous[1]] if epoch > previous[1] else 0.0)
        total[epoch] = offset + seconds
        previous = (process, epoch, seconds)
    return total


def epoch_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """checkpointN.pt files in epoch order."""
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.glob("checkpoint*.pt")
        if (m := re.fullmatch(r"checkpoint(\d+)\.pt", p.name))
    ]
    return [p for _, p in sorted(found)]


def checkpoints_to_average(checkpoint_dir: Path, last: int) -> list[Path]:
    """The `last` newest checkpoints of a run: its epoch checkpoints, plus
    checkpoint_last.pt when training stopped mid-epoch (--max-update), since fairseq then
    writes no epoch checkpoint for the final updates and averaging would leave them out."""
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    found = epoch_checkpoints(checkpoint_dir)
    final = checkpoint_dir / "checkpoint_last.pt"
    if final.exists() and (not found or finished_updates(final) > finished_updates(found[-1])):
        found.append(final)
    return found[-last:]


def average_checkpoints(paths: Sequence[Path], output: Path) -> Path:
    """Average the model parameters of `paths` (as fairseq's average_checkpoints.py does)
    into `output`; everything else is taken from the last checkpoint."""
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    state = None
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name, value in state["model"].items():
            value = value.double() if value.is_floating_point() else value
            if name not in total:
                total[name] = value.clone()
            elif value.is_floating_point():
                total[name] += value
    assert state is not None
    reference = state["model"]
    state["model"] = {
        name: (value / len(paths)).to(reference[name].dtype) if value.is_floating_point() else value
        for name, value in total.items()
    }
    tmp = output.with_name(output.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(output)
    return output


_BLEU4 = re.compile(r"BLEU4? = ([0-9.]+)")


def parse_generate_output(text: str) -> dict:
    """Hypotheses and references (by sentence id) and fairseq's tokenized BLEU."""
    hyps, refs = {}, {}
    for line in text.splitlines():
        if line.startswith("H-"):
            tag, _, hyp = line.split("\t", 2)
            hyps[int(tag[2:])] = hyp
        elif line.startswith("T-"):
            tag, ref = line.split("\t", 1)
            refs[int(tag[2:])] = ref
    match = _BLEU4.findall(text)
    return {"hyps": hyps, "refs": refs, "tokenized_bleu": float(match[-1]) if match else math.nan}


def detokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str) -> dict:
    """sacreBLEU on Moses-detokenized text, with its signature."""
    import sacrebleu
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(
        [detok.detokenize(h.split()) for h in hyps], [[detok.detokenize(r.split()) for r in refs]]
    )
    return {"sacrebleu": score.score, "signature": str(metric.get_signature())}


def _updates_if_complete(checkpoint: Path) -> Optional[int]:
    """Updates done according to `checkpoint`, or None when it does not load."""
    try:
        return finished_updates(checkpoint)
    except Exception:  # truncated or corrupt: whatever torch's reader raises
        return None


def recover_last_checkpoint(checkpoint_dir: Path) -> Optional[str]:
    """Make `checkpoint_last.pt` the newest complete checkpoint again after a crash.

    At the end of an epoch fairseq writes checkpointN.pt atomically (a .tmp file, then a
    rename), then copies it onto checkpoint_best.pt and checkpoint_last.pt in place. A run
    killed in between leaves checkpoint_last.pt missing (first epoch), one epoch old, or
    truncated, and fairseq resumes from checkpoint_last.pt only: it would start over,
    repeat an epoch, or fail. So checkpoint_last.pt is replaced (by a copy and a rename)
    with the newest epoch checkpoint that loads when that one is further on, and a
    truncated checkpoint_last.pt with no complete epoch checkpoint to replace it is
    removed, so that training starts over. Returns what was done, or None when
    checkpoint_last.pt was already the newest complete checkpoint (or there is none).
    """
    last = checkpoint_dir / "checkpoint_last.pt"
    last_updates = _updates_if_complete(last) if last.exists() else None
    for candidate in reversed(epoch_checkpoints(checkpoint_dir)):
        updates = _updates_if_complete(candidate)
        if updates is None:
            continue
        if last_updates is not None and last_updates >= updates:
            return None
        if not last.exists():
            why = "was missing (a crash before fairseq copied the epoch checkpoint)"
        elif last_updates is None:
            why = "was incomplete (a crash while it was written)"
        else:
            why = f"was {updates - last_updates} updates behind (a crash before fairseq copied the epoch checkpoint)"
        tmp = last.with_name(last.name + ".tmp")
        shutil.copyfile(candidate, tmp)
        tmp.replace(last)
        return f"{last} {why}: resuming from {candidate.name}"
    if last.exists() and last_updates is None:
        last.unlink()
        return f"{last} was incomplete and no complete epoch checkpoint is left: training starts over"
    return None


def finished_updates(checkpoint: Path) -> int:
    """Updates done according to a fairseq checkpoint (0 if there is none)."""
    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int(state["optimizer_history"][-1]["num_updates"])
