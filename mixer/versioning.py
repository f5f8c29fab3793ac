"""The door to DVC: which version of the data a result was computed on.

The data version is the hash DVC recorded for the prepared data folder in dvc.lock, so two results
with the same version saw byte-identical arrays.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from dvc.dvcfile import LOCK_FILE

INGEST_STAGE = "ingest"


def data_version(root: Path, data_dir: Path) -> str | None:
    """The DVC hash of `data_dir` from `root`/dvc.lock, or None when DVC has not recorded it."""
    lock_file = root / LOCK_FILE
    if not lock_file.is_file():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    stage = (lock.get("stages") or {}).get(INGEST_STAGE) or {}
    wanted = data_dir.resolve()
    for out in stage.get("outs") or []:
        if (root / out.get("path", "")).resolve() == wanted:
            return out.get("md5")
    return None
