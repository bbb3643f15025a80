"""One JSON record per finished run, shared by the IWSLT (fairseq) and PTB (Trainer)
experiments so that scripts/report.py reads both.

A record lives at ``RESULTS/<preset>/<optimizer>-seed<N>.json`` and is written only when
the run has finished (to a temporary name, then renamed): a crashed run leaves no
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


def record_path(results: Path, preset: str, optimizer: str, seed: int) -> Path:
    return Path(results) / preset / f"{optimizer}-seed{seed}.json"


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
