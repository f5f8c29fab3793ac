"""Prepared synthetic data and small configs for the tests that train."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mixer import config, data

from .mlflow_server import CLIENT_ENV, running_server

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp: Path, data_dir: Path, **overrides: Any) -> config.Config:
    """The project's params with everything small and every output under `tmp`."""
    _copy_migrated_store(tmp / "mlflow.db")
    return config.load(REPO / "params.yaml", {
        "data.out_dir": str(data_dir),
        "train.epochs": 3,
        "train.batch_size": 64,
        "train.models_dir": str(tmp / "models"),
        "eval.batch_size": 250,
        "eval.metrics_dir": str(tmp / "metrics"),
        "eval.plots_dir": str(tmp / "plots"),
        "ray.num_workers": 2,
        "ray.cpus_per_worker": 1,
        "ray.storage_path": str(tmp / "ray_results"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp / "mlartifacts"),
        **overrides,
    })


_migrated_store: list[Path] = []  # one per session


def _copy_migrated_store(dest: Path) -> None:
    """A fresh MLflow SQLite store at `dest`, copied from one migrated once per session: creating
    one from scratch runs all of MLflow's schema migrations, seconds per test."""
    if dest.exists():
        return
    if not _migrated_store:
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
        _migrated_store.append(template)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_migrated_store[0], dest)


@pytest.fixture(scope="session")
def prepared_data(synthetic_archive: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic archive ingested once for the session."""
    archive, md5 = synthetic_archive
    out = tmp_path_factory.mktemp("prepared") / "cifar100"
    cfg = config.load(REPO / "params.yaml", {"data.url": str(archive), "data.md5": md5,
                                              "data.out_dir": str(out)})
    return data.ingest(cfg.data)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite, file:// artifacts) for the session; yields its http:// URI.

    Tests share it, so each one names its own experiment and registered model. MLflow clients in
    the session fail fast instead of retrying (CLIENT_ENV); the environment is restored afterwards.
    """
    saved = {key: os.environ.get(key) for key in CLIENT_ENV}
    os.environ.update(CLIENT_ENV)
    try:
        with running_server(tmp_path_factory.mktemp("mlflow")) as uri:
            yield uri
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
