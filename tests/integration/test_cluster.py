"""What a config must satisfy on a Ray cluster, checked against the session's two-node cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from mixer import cluster, training

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_use_gpu_on_a_cluster_without_gpus_fails_at_start(tmp_path: Path, prepared_data: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data, **{"ray.use_gpu": True, "ray.gpus_per_worker": 1})
    with pytest.raises(cluster.ClusterError, match="ray.use_gpu is true but the Ray cluster has no GPUs"):
        training.fit(cfg)
    assert MlflowClient(cfg.mlflow.tracking_uri).search_runs(  # refused before any run was recorded
        [e.experiment_id for e in MlflowClient(cfg.mlflow.tracking_uri).search_experiments()]) == []


def test_workers_larger_than_any_node_fail_at_start(tmp_path: Path, prepared_data: Path) -> None:
    # 2 CPUs in total, but 1 per node: a 2-CPU worker fits nowhere (Ray would wait forever).
    cfg = tiny_config(tmp_path, prepared_data, **{"ray.num_workers": 1, "ray.cpus_per_worker": 2})
    with pytest.raises(cluster.ClusterError, match=r"at most 0 fit; lower ray.num_workers or ray.cpus_per_worker"):
        training.connect(cfg)
    cfg = tiny_config(tmp_path, prepared_data, **{"ray.num_workers": 4})
    with pytest.raises(cluster.ClusterError, match="ray.num_workers=4 workers of 1 CPUs each do not fit .* at most 2 fit"):
        training.connect(cfg)
