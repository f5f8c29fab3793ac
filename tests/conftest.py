"""Fixtures shared by every test tier: a synthetic CIFAR-100 archive (no network) and a config for it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixer.config import DataConfig
from tests.synthetic import make_archive


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(path, md5) of a small learnable archive in the official layout, built once per session."""
    path = tmp_path_factory.mktemp("archive") / "cifar-100-python.tar.gz"
    return path, make_archive(path)


@pytest.fixture
def data_config(synthetic_archive: tuple[Path, str], tmp_path: Path) -> DataConfig:
    """Ingest settings for the synthetic archive, every output under this test's tmp_path."""
    path, md5 = synthetic_archive
    return DataConfig(url=str(path), md5=md5, download_dir=tmp_path / "downloads",
                      out_dir=tmp_path / "data" / "cifar100", val_fraction=0.1, split_seed=0)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One two-node Ray cluster on this machine for the whole session; yields its address.

    A head and a second node with 1 CPU each (`ray.cluster_utils.Cluster`: real raylets, real
    object transfers between them), so every 2-worker training in the tests runs one worker per
    node. Start-up costs ~20 s, hence one per session. Subprocesses (`mixer train` under
    `dvc repro`) join it through RAY_ADDRESS instead of starting their own. The head runs the
    dashboard because Ray Train's placement-group cleaner needs its State API: without it, a Train
    run whose controller is killed (a trial stopped by ASHA) keeps its workers' CPUs forever.
    """
    import ray
    from mixer.ray_cluster import JOB_RUNTIME_ENV
    from ray.cluster_utils import Cluster

    with socket.socket() as probe:  # a free port: 8265 may be taken by another Ray on this machine
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, runtime_env=JOB_RUNTIME_ENV)  # as connect() does
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
