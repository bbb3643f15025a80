"""Corpus loaders for the experiments: each verifies its files before use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DATA_DIR_ENV = "SOFTADAM_DATA_DIR"
# Where the build machines keep shared corpora, beside the repository. Only a checkout
# looks there: an installed copy (site-packages) has no repository around it.
_CHECKOUT = Path(__file__).resolve().parents[2]
SHARED_DATA = _CHECKOUT.parent / "shared" / "data" if (_CHECKOUT / "setup.py").is_file() else None


def data_roots(data_dir: Optional[os.PathLike] = None) -> list[Path]:
    """Folders that may hold local corpora, in the order they are searched: `data_dir`
    (a --data-dir), then $SOFTADAM_DATA_DIR, then ../shared/data beside the repository
    (only when no --data-dir is given, so an explicit folder is never silently replaced)."""
    roots = [data_dir, os.environ.get(DATA_DIR_ENV), None if data_dir else SHARED_DATA]
    return [Path(root) for root in roots if root]
