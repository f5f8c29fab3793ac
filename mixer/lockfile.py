"""dvc.lock read, and DVC's hash of a folder computed, without DVC.

For a machine that has torch and nothing else (`mixer train-offline` on a lent GPU): the data check
there is the same comparison `mixer train` makes with DVC (mixer.versioning), by hashing the folder
as DVC 3 does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from mixer.data import file_md5

LOCK_FILE = "dvc.lock"
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


def folder_version(folder: Path) -> str:
    """DVC 3's md5 of a folder ("<md5>.dir"): the md5 of the JSON list of its files' md5s and paths,
    sorted by path (tests/unit/test_lockfile.py checks it against `dvc add`)."""
    entries = [{"md5": file_md5(path), "relpath": path.relative_to(folder).as_posix()}
               for path in sorted(folder.rglob("*")) if path.is_file()]
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"

