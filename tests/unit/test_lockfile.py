"""DVC's folder hash computed without DVC (mixer.lockfile), checked against DVC itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from mixer import lockfile

DVC = Path(sys.executable).parent / "dvc"


def test_folder_version_is_the_md5_dvc_records_for_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "prepared"
    (folder / "nested").mkdir(parents=True)
    (folder / "train.npz").write_bytes(bytes(range(256)) * 1000)
    (folder / "meta.json").write_text('{"counts": {"train": 3}}\n')
    (folder / "nested" / "b.bin").write_bytes(b"\x00" * 10)
    (folder / "A.txt").write_text("upper case sorts first\n")
    subprocess.run([str(DVC), "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    subprocess.run([str(DVC), "add", "-q", "prepared"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "prepared.dvc").read_text())["outs"][0]["md5"]

    assert lockfile.folder_version(folder) == recorded

    (folder / "meta.json").write_text('{"counts": {"train": 4}}\n')  # any change is a new version
    assert lockfile.folder_version(folder) != recorded


def test_data_version_reads_the_ingest_output_from_dvc_lock(tmp_path: Path) -> None:
    lock = {"schema": "2.0", "stages": {"ingest": {"outs": [
        {"path": "data/cifar100", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))

    assert lockfile.data_version(tmp_path, tmp_path / "data" / "cifar100") == "0123456789abcdef0123456789abcdef.dir"
    assert lockfile.data_version(tmp_path, tmp_path / "elsewhere") is None
    assert lockfile.data_version(tmp_path / "no-project", tmp_path / "data" / "cifar100") is None
