"""Joining (or starting) the Ray cluster a run uses, and checking it can place the configured workers.

Imports Ray but not torch, so `mixer train` starts Ray while another thread imports the training
code (mixer/cli.py): on 2 cores the two overlap by ~4 s.
"""

from __future__ import annotations

import os

import ray
from mixer import cluster
from mixer.config import Config

# Ray Train extras that a Ray started by this process has no use for, each a process or a poll on
# every run: the preemption watcher serves clusters of preemptible (spot) nodes.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Every worker process of a job started here learns its own cluster's address as it starts. Without
# it, a State API call in a worker looks for *the* Ray on this machine and fails with "Found multiple
# active Ray instances" when there are two (a second `mixer train`, a test cluster): Ray Train's
# placement-group cleaner is such a caller, its thread dies, and a controller killed later (a sweep
# trial stopped by ASHA) would keep its workers' CPUs for good.
JOB_RUNTIME_ENV = {"worker_process_setup_hook": "mixer.ray_cluster.pin_cluster_address"}


def pin_cluster_address() -> None:
    """worker_process_setup_hook: RAY_ADDRESS = the cluster this worker belongs to."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def connect(cfg: Config) -> None:
    """Join ray.address (or RAY_ADDRESS), else start Ray on this machine; check the cluster fits the config.

    A Ray started here runs its dashboard (on 127.0.0.1), although it costs ~4 s of start-up on 2
    cores: Ray Train's placement-group cleaner, one per Train run, reads the State API the dashboard
    serves, and without it logs a warning every second of training.
    """
    cluster.check_before_connect(cfg)
    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, log_to_driver=True, runtime_env=JOB_RUNTIME_ENV)
        else:
            for key, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(key, value)
            ray.init(log_to_driver=True, include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env=JOB_RUNTIME_ENV)
    if cfg.ray.address:  # a cluster of several hosts needs shared storage and a tracking server
        cluster.check_nodes(cfg, [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]])
    check_resources(cfg)


def check_resources(cfg: Config) -> None:
    """Fail at start, not after a silent wait for workers that no node can ever place."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    r = cfg.ray
    if r.use_gpu and sum(node.get("GPU", 0) for node in nodes) == 0:
        raise cluster.ClusterError("ray.use_gpu is true but the Ray cluster has no GPUs; set ray.use_gpu=false "
                                   "or add GPU nodes")
    placeable = sum(_fits(node, r.cpus_per_worker, r.gpus_per_worker if r.use_gpu else 0) for node in nodes)
    if placeable < r.num_workers:
        sizes = ", ".join(f"{node.get('CPU', 0):g} CPU/{node.get('GPU', 0):g} GPU" for node in nodes)
        raise cluster.ClusterError(
            f"ray.num_workers={r.num_workers} workers of {r.cpus_per_worker:g} CPUs"
            f"{f' and {r.gpus_per_worker:g} GPUs' if r.use_gpu else ''} each do not fit the Ray cluster's "
            f"nodes ({sizes}): at most {placeable} fit; lower ray.num_workers or ray.cpus_per_worker")


def _fits(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of this size one node holds."""
    counts = [int(node.get("CPU", 0) // cpus)]
    if gpus:
        counts.append(int(node.get("GPU", 0) // gpus))
    return min(counts)
