"""Fixtures shared by every test tier: a synthetic CIFAR-100 archive (no network) and a config for it."""

from __future__ import annotations

import os
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
    """One local Ray instance for the whole session (start-up costs ~20 s); yields its address.

    Subprocesses (`mixer train` under `dvc repro`) join it through RAY_ADDRESS instead of starting
    their own.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as the `mixer` CLI does
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
