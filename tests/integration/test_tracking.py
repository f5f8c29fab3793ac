"""A 2-worker Ray Train run tracked on a real MLflow server: one run, every epoch once, lineage tags."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mixer import export, reports, tracking, training

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_one_run_with_every_epoch_once_then_evaluation_attaches(tmp_path: Path, prepared_data: Path,
                                                                mlflow_server: str) -> None:
    experiment = f"track-{tmp_path.name}"
    cfg = tiny_config(tmp_path, prepared_data, **{"mlflow.tracking_uri": mlflow_server,
                                                  "mlflow.experiment": experiment})
    result = training.fit(cfg)
    reports.evaluate_models(cfg)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # exactly one run
    run = runs[0]
    assert run.info.status == "FINISHED"
    for name in tracking.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["ray.num_workers"] == "2"
    tags = run.data.tags
    assert tags["ray_num_workers"] == "2" and tags["device"] == "cpu" and tags["git_dirty"] in ("true", "false")
    assert len(tags["git_commit"]) == 40 and tags["model_uri"] == result.model_uri
    assert {"test_top1", "test_top5", "test_loss", "best_val_top1"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"params.yaml", "train.json", "evaluation"} <= artifacts
    evaluation = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"training_curves.png", "confusion_matrix.png", "per_class_accuracy.csv"} <= evaluation
    # The run id travels with models/ so evaluation and registration find the same run.
    assert export.read_summary(cfg.train.models_dir)["mlflow_run_id"] == run.info.run_id

    # What the UI shows comes from the REST API.
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp.experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert [r["info"]["run_id"] for r in json.load(response)["runs"]] == [run.info.run_id]


def test_train_evaluate_register_promote_predict(tmp_path: Path, prepared_data: Path, mlflow_server: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The `mixer` commands end to end on one server: the champion answers `mixer predict`."""
    from PIL import Image

    from mixer import data
    from mixer.cli import main

    name = f"flow-{tmp_path.name}"
    overrides = {"mlflow.tracking_uri": mlflow_server, "mlflow.experiment": name,
                 "mlflow.registered_model": name, "train.epochs": 2, "ray.num_workers": 1}
    cfg = tiny_config(tmp_path, prepared_data, **overrides)
    argv = [f"{key}={value}" for key, value in {
        "data.out_dir": cfg.data.out_dir, "train.models_dir": cfg.train.models_dir,
        "eval.metrics_dir": cfg.eval.metrics_dir, "eval.plots_dir": cfg.eval.plots_dir,
        "eval.batch_size": 250, "ray.storage_path": cfg.ray.storage_path, "train.batch_size": 64,
        "ray.cpus_per_worker": 1, **overrides}.items()]
    params = ["--params", str(cfg.root / "params.yaml")]

    for command in ("train", "evaluate", "register", "promote"):
        assert main([command, *argv, *params]) == 0, command
    out = capsys.readouterr().out
    assert "champion" in out and "version 1" in out

    test = data.load_split(prepared_data, "test")
    picture = tmp_path / "picture.png"
    Image.fromarray(test.images[0]).resize((64, 64)).save(picture)  # any size: resized to 32x32
    assert main(["predict", str(picture), *argv, *params]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{picture}: ") and line.count("%") == 5
