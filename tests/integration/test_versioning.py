"""The DVC ingest stage through mixer.versioning: pull/push with a remote, waiting for the repository lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixer import config, versioning
from tests.projects import BIN, make_project

HOLD_S = 6.0  # longer than DVC's own ~3 s wait, so only our retry gets through


def test_reproduce_ingest_waits_for_the_lock_and_pushes_to_the_remote(
        tmp_path: Path, synthetic_archive: tuple[Path, str]) -> None:
    archive, md5 = synthetic_archive
    root, env = make_project(tmp_path / "project", archive, md5)
    remote = tmp_path / "remote"
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "storage", str(remote)], cwd=root, env=env, check=True)
    cfg = config.load(root / "params.yaml", {"data.url": str(archive), "data.md5": md5})

    # Another dvc process holds the repository lock for HOLD_S seconds.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dvc.repo import Repo; repo = Repo('.'); repo.lock.lock(); "
        f"print('locked', flush=True); time.sleep({HOLD_S})")], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        version = versioning.reproduce_ingest(cfg)
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)

    assert waited > HOLD_S - 1.5  # it waited for the holder instead of failing
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert version == lock["stages"]["ingest"]["outs"][0]["md5"] == versioning.data_version(root, cfg.data.out_dir)
    assert sorted(p.name for p in cfg.data.out_dir.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert len(pushed) == 5  # the .dir manifest + the four files

    # Pulled back from the remote when the workspace and cache lost it: the same version, not a rebuild.
    subprocess.run(["rm", "-rf", str(cfg.data.out_dir), str(root / ".dvc" / "cache")], check=True)
    assert versioning.checkout_data(cfg) == version
    assert (cfg.data.out_dir / "test.npz").is_file()


def test_an_override_the_stage_would_ignore_is_refused(tmp_path: Path, synthetic_archive: tuple[Path, str]) -> None:
    archive, md5 = synthetic_archive
    root, _ = make_project(tmp_path / "project", archive, md5)
    cfg = config.load(root / "params.yaml", {"data.url": str(archive), "data.md5": md5, "data.split_seed": 3})
    with pytest.raises(versioning.VersioningError, match=r"^data.split_seed=3: the DVC ingest stage reads "
                                                          r"params.yaml \(0\); change it there"):
        versioning.reproduce_ingest(cfg)
    assert not (root / "dvc.lock").exists()
