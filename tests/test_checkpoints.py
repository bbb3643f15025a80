"""softadam_nlp.experiments.checkpoints: which Trainer checkpoint a crashed run resumes from."""

from __future__ import annotations

import json
from pathlib import Path

from softadam_nlp.experiments.checkpoints import last_complete_checkpoint


def make(output_dir: Path, step: int, state: str | None) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x" * 10)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_the_newest_complete_checkpoint_wins_and_incomplete_newer_ones_are_removed(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "missing") == (None, [])
    complete = json.dumps({"global_step": 10})
    make(tmp_path, 10, complete)
    make(tmp_path, 9, complete)  # numeric order, not name order: 10 is newer than 9
    assert last_complete_checkpoint(tmp_path) == (tmp_path / "checkpoint-10", [])
    unfinished = make(tmp_path, 30, None)  # killed before trainer_state.json
    cut = make(tmp_path, 20, complete[:5])  # killed while writing it
    (tmp_path / "checkpoint-40-notes").mkdir()  # not a checkpoint folder: left alone
    newest, removed = last_complete_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoint-10" and removed == [unfinished, cut]
    assert not unfinished.exists() and not cut.exists() and (tmp_path / "checkpoint-40-notes").exists()


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    make(tmp_path, 5, None)
    assert last_complete_checkpoint(tmp_path) == (None, [tmp_path / "checkpoint-5"])
