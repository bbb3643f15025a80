"""Finding the checkpoint a crashed Trainer run can resume from.

Trainer writes a checkpoint folder file by file (model, optimizer, scheduler, RNG
states) and `trainer_state.json` last, with no atomic rename, so a run killed while
saving leaves a `checkpoint-N` folder that looks newest but cannot be resumed from;
`transformers.trainer_utils.get_last_checkpoint` would still pick it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"


def _is_complete(checkpoint: Path) -> bool:
    """Whether Trainer finished writing `checkpoint`: its last file exists and parses."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: Path) -> tuple[Optional[Path], list[Path]]:
    """The newest complete `checkpoint-N` folder of `output_dir` (None if there is none),
    and the incomplete folders newer than it, which this removes: nothing can resume from
    them, and left in place Trainer's rotation (save_total_limit) would count them and
    could delete the complete one instead."""
    if not output_dir.is_dir():
        return None, []
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    folders = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    removed = []
    for _, folder in reversed(folders):
        if _is_complete(folder):
            return folder, removed
        shutil.rmtree(folder)
        removed.append(folder)
    return None, removed
