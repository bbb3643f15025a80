"""One JSON record per finished run, shared by the IWSLT (fairseq) and PTB (Trainer)
experiments so that scripts/report.py reads both.

A record lives at `RESULTS/<optimizer>-seed<N>.json`, where RESULTS defaults to
`results/<preset>/<experiment>` (default_results) and a sweep gives each setting its own
folder. It is written only when the run has finished (to a temporary name, then renamed): a crashed run leaves no
record, so a rerun never mistakes it for a result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def default_results(preset: str, experiment: str) -> Path:
    """Where a run's record goes unless --results says otherwise: results/cpu/ptb, ..."""
    return REPO / "results" / preset / experiment


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
