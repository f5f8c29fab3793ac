"""What a config must satisfy on a Ray cluster, checked against the session's two-node cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

import ray
from mixer import cluster, training
from ray._private.services import find_gcs_addresses
from ray._private.utils import read_ray_address, write_ray_address

from .conftest import tiny_config
from .mlflow_server import free_port

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


@pytest.fixture
def another_ray_on_this_machine() -> Iterator[None]:
    """A second Ray head on this machine (0 CPUs), as a second `mixer train` would start one.

    `ray start` records itself as the machine's current Ray (/tmp/ray/ray_current_cluster) and its
    shutdown removes the record: the session cluster's is put back afterwards.
    """
    recorded = read_ray_address()
    before = _gcs_addresses()
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={free_port()}", "--num-cpus=0",
                             "--include-dashboard=false", f"--dashboard-port={free_port()}",
                             f"--dashboard-agent-listen-port={free_port()}",
                             "--block", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # stop at once, not in 30 s
    try:
        deadline = time.monotonic() + 90
        while not _gcs_addresses() - before:
            assert head.poll() is None and time.monotonic() < deadline, "the second Ray did not start"
            time.sleep(0.5)
        yield
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        head.wait(timeout=90)
        if recorded:
            write_ray_address(recorded)


def _gcs_addresses() -> frozenset[str]:
    find_gcs_addresses.cache_clear()  # Ray caches what it found
    return find_gcs_addresses()


@ray.remote(num_cpus=0)
def node_ids_seen_by_the_state_api() -> set[str]:
    """What the State API (as Ray Train's placement-group cleaner calls it) sees from a worker."""
    from ray.util.state import list_nodes

    return {node.node_id for node in list_nodes()}


def test_workers_reach_their_own_cluster_with_another_ray_on_the_machine(another_ray_on_this_machine: None) -> None:
    # Without the job's pinned address the State API picks a Ray of its own: "Found multiple active
    # Ray instances", or the one `ray start` recorded last (here: the other one, which refuses it).
    assert ray.get(node_ids_seen_by_the_state_api.remote()) == {node["NodeID"] for node in ray.nodes()}
