"""Faults during training lose nothing: a nan loss, a full disk, an unreachable MLflow server.

Each run goes through `training.fit` on the shared two-node cluster, as `mixer train` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from mixer import config, epochs, export, publish, reports, serving, training, tracking
from ray.train import UserCallback

from .conftest import tiny_config
from .mlflow_server import free_port

pytestmark = pytest.mark.usefixtures("ray_session")

SMALL = {"train.limit_train_batches": 4, "ray.num_workers": 1}


def _runs(cfg: config.Config) -> list[Any]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_nan_loss_fails_the_run_and_exports_nothing(tmp_path: Path, prepared_data: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data, **SMALL, **{"train.lr": 1.0e30})

    with pytest.raises(epochs.TrainingDiverged, match=r"training diverged: train loss nan.*epoch 1.*lower train.lr"):
        training.fit(cfg)

    assert not cfg.train.models_dir.exists()  # nothing to evaluate or register
    [run] = _runs(cfg)
    assert run.info.status == "FAILED"
    # The bad epoch is in MLflow for the post-mortem, as nan.
    [point] = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert point.step == 1 and point.value != point.value


class FillTheDiskAfter(UserCallback):
    """After the given epoch is reported, fills the filesystem of `folder` up to a few kilobytes."""

    def __init__(self, epoch: int, folder: Path) -> None:
        self.epoch, self.folder = epoch, folder

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics[0]["epoch"] == self.epoch:
            free = shutil.disk_usage(self.folder).free
            with (self.folder / "filler").open("wb") as f:
                f.write(b"\0" * max(free - 64 * 1024, 0))  # room for Ray's small bookkeeping files only


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: a disk that really fills up (ENOSPC), without touching the machine's own."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(
        tmp_path: Path, prepared_data: Path, small_disk: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data, **SMALL, **{
        "train.epochs": 4, "train.run_name": "full-disk", "ray.storage_path": str(small_disk / "ray"),
        "ray.max_failures": 0})
    cfg.train.models_dir.mkdir(parents=True)
    (cfg.train.models_dir / "earlier.txt").write_text("an earlier export")

    with pytest.raises(training.CheckpointWriteError,
                       match=r"no space left on the device.*train.run_name=full-disk to resume"):
        training.fit(cfg, callbacks=[FillTheDiskAfter(2, small_disk)])

    assert _runs(cfg)[0].info.status == "FAILED"
    assert (cfg.train.models_dir / "earlier.txt").read_text() == "an earlier export"  # nothing replaced
    # The last checkpoint Ray registered is whole: torch reads it, weights and all. (The epoch that
    # hit the full disk may have left a partial copy beside it; Ray never registered it.)
    epochs = []
    for folder in (small_disk / "ray" / "full-disk").glob("checkpoint_*/"):
        try:
            epochs.append(torch.load(folder / training.CHECKPOINT_FILE, weights_only=True)["state"]["epoch"])
        except (OSError, RuntimeError):  # the partial copy
            continue
    # Epoch 2 or, when Ray had freed epoch 1's space meanwhile, epoch 3.
    assert max(epochs) in (2, 3)

    # Resuming from it by name is what the Ctrl-C test in test_training.py exercises.


def test_an_unreachable_mlflow_keeps_the_model_for_register_from(
        tmp_path: Path, prepared_data: Path, mlflow_server: str) -> None:
    name = f"offline-{uuid.uuid4().hex[:8]}"
    nobody = f"http://127.0.0.1:{free_port()}"  # no server listens there
    cfg = tiny_config(tmp_path, prepared_data, **SMALL, **{
        "train.epochs": 2, "mlflow.tracking_uri": nobody, "mlflow.experiment": name,
        "mlflow.registered_model": name})

    with pytest.raises(tracking.TrackingUnavailable) as raised:
        training.fit(cfg)
    message = str(raised.value)
    assert "\n" not in message and nobody in message and "unreachable" in message
    assert f"mixer register --from {cfg.train.models_dir}" in message

    saved = export.read_summary(cfg.train.models_dir)  # the best epoch, kept locally
    assert saved["mlflow_run_id"] is None and [row["epoch"] for row in saved["history"]] == [1, 2]
    export.load(cfg.train.models_dir)

    # The server is back (here: another URI); evaluate, then register the folder.
    online = config.replace(cfg, {"mlflow.tracking_uri": mlflow_server})
    metrics = reports.evaluate_models(online, cfg.train.models_dir)
    version = publish.register_models(online, cfg.train.models_dir)

    assert version.created and version.aliases == ["challenger"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.RUN_NAME_TAG] == saved["run_name"]
    assert run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert run.data.metrics["test_top1"] == pytest.approx(metrics["top1"])
    model = serving.load(json.loads((cfg.train.models_dir / export.SUMMARY_FILE).read_text())["mlflow_model_uri"],
                         mlflow_server)
    assert model.predict(prepared_images(prepared_data)).shape == (2, 100)
    # Registering again changes nothing.
    assert publish.register_models(online, cfg.train.models_dir).version == version.version


def prepared_images(prepared_data: Path) -> Any:
    from mixer import data

    return data.load_split(prepared_data, "val").images[:2]
