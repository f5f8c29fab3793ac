"""The rules for clusters of several hosts, on configs alone (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixer import cluster, config

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **overrides: object) -> config.Config:
    return config.load(REPO / "params.yaml", {"ray.storage_path": str(tmp_path / "ray"),
                                              "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                              **overrides})


def test_a_single_host_cluster_may_use_local_storage_and_sqlite(tmp_path: Path) -> None:
    cluster.check_nodes(_config(tmp_path, **{"ray.address": "127.0.0.1:6379"}), ["10.0.0.5", "10.0.0.5"])


def test_several_hosts_refuse_local_storage(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"ray.address": "10.0.0.5:6379"})
    with pytest.raises(cluster.ClusterError, match=r"ray.storage_path: .* the Ray cluster spans 2 hosts"):
        cluster.check_nodes(cfg, ["10.0.0.5", "10.0.0.6"])


def test_several_hosts_refuse_sqlite_even_with_shared_storage(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"ray.address": "10.0.0.5:6379", "ray.storage_path": "s3://bucket/ray"})
    with pytest.raises(cluster.ClusterError, match=r"mlflow.tracking_uri: sqlite:.* start an MLflow server"):
        cluster.check_nodes(cfg, ["10.0.0.5", "10.0.0.6"])


def test_several_hosts_accept_a_uri_and_a_tracking_server(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"ray.storage_path": "gs://bucket/ray", "mlflow.tracking_uri": "http://10.0.0.5:5000"})
    cluster.check_nodes(cfg, ["10.0.0.5", "10.0.0.6"])


def test_ray_client_addresses_are_checked_before_connecting(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"ray.address": "ray://10.0.0.5:10001"})
    with pytest.raises(cluster.ClusterError, match="runs this driver's work remotely"):
        cluster.check_before_connect(cfg)
    cluster.check_before_connect(_config(tmp_path, **{"ray.address": "10.0.0.5:6379"}))  # checked on connect


def test_filesystem_type_finds_the_mount_of_a_path_not_yet_created(tmp_path: Path) -> None:
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/self/mounts").read_text().splitlines()}
    assert cluster.filesystem_type(Path("/")) == mounts["/"]
    assert cluster.filesystem_type(tmp_path / "not" / "yet") == cluster.filesystem_type(tmp_path)
    assert cluster.filesystem_type(Path("/proc/self")) == "proc"


def test_mixer_train_refuses_a_ray_client_cluster_with_local_storage_in_one_line(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing answers there, so a connection attempt
    # would hang; the refusal must come first.
    done = subprocess.run([sys.executable, "-m", "mixer.cli", "train", "ray.address=ray://192.0.2.1:10001",
                           f"ray.storage_path={tmp_path / 'ray'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixer train: error: ray.storage_path:"), lines
