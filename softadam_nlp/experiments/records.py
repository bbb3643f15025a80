"""One JSON record per finished run, shared by the IWSLT (fairseq) and PTB (Trainer)
experiments so that scripts/report.py reads both.

A record lives at `RESULTS/<optimizer>-seed<N>.json`, where RESULTS defaults to
`runs/results/<preset>/<experiment>` (default_results; `runs/` is not committed, so a new
run never writes over or into the committed evidence under `results/`, which is written
only when a command names it with --results) and a sweep gives each setting its own
folder. It is written only when the run has finished (to a temporary name, then
renamed): a crashed run leaves no record, so a rerun never mistakes it for a result.

A record counts as the run only when its settings are the run's
(`finished_with_settings`): a record with other settings at the target stops the run
with a message that says what differs, never taken for it and never overwritten.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]


def default_results(preset: str, experiment: str) -> Path:
    """Where a new run's record goes unless --results says otherwise: runs/results/cpu/ptb, ...
    (not the committed results/, which only a command that names it writes to)."""
    return REPO / "runs" / "results" / preset / experiment


class RecordConflict(ValueError):
    """A record at the target holds a run with other settings."""


def finished_with_settings(
    path: Path, settings: dict[str, Any], recorded: Callable[[dict], dict[str, Any]], every_key: bool = False
) -> bool:
    """Whether ``path`` holds the finished run of these ``settings``.

    False when there is no record. True when there is one and ``recorded(record)`` (its
    settings, in the same form) agrees with ``settings``: on every key both have (records
    written before a setting existed lack it), or with ``every_key`` on every key either
    has (a command's options, where an option left out is a setting too). Otherwise
    raises RecordConflict naming each difference and how to write elsewhere."""
    if not path.exists():
        return False
    theirs = recorded(json.loads(path.read_text()))
    keys = (
        list(settings) + [k for k in theirs if k not in settings] if every_key else [k for k in settings if k in theirs]
    )
    differences = [
        f"{key}: {theirs.get(key)!r} in the record, {settings.get(key)!r} now"
        for key in keys
        if theirs.get(key) != settings.get(key)
    ]
    if not differences:
        return True
    raise RecordConflict(
        f"{path} holds a run with other settings ({'; '.join(differences)}). Pass --results DIR to write this "
        "run's record elsewhere, or --force to replace that one."
    )


def record_path(results: Path, optimizer: str, seed: int) -> Path:
    return Path(results) / f"{optimizer}-seed{seed}.json"


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write atomically, adding the date and the machine unless the record has them."""
    record = {**record, "date": record.get("date") or utc_now(), "machine": record.get("machine") or machine_info()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # only a finished run has a record
    return path
