"""A 2-worker Ray Train run tracked on a real MLflow server: one run, every epoch once, lineage tags.

And what a run records (params, tags, artifacts, links) never carries a credential.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mixer import config, export, registry, tracking

from .conftest import REPO, tiny_config


@pytest.mark.usefixtures("ray_session")
def test_train_evaluate_register_promote_predict(tmp_path: Path, prepared_data: Path, mlflow_server: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The `mixer` commands end to end on one server: a 2-worker run tracked as one MLflow run with
    every epoch once, evaluation attached to it, and the champion answering `mixer predict`."""
    from PIL import Image

    from mixer import data
    from mixer.cli import main

    name = f"flow-{tmp_path.name}"
    overrides = {"mlflow.tracking_uri": mlflow_server, "mlflow.experiment": name,
                 "mlflow.registered_model": name, "train.epochs": 3, "ray.num_workers": 2}
    cfg = tiny_config(tmp_path, prepared_data, **overrides)
    argv = [f"{key}={value}" for key, value in {
        "data.out_dir": cfg.data.out_dir, "train.models_dir": cfg.train.models_dir,
        "eval.metrics_dir": cfg.eval.metrics_dir, "eval.plots_dir": cfg.eval.plots_dir,
        "eval.batch_size": 250, "ray.storage_path": cfg.ray.storage_path, "train.batch_size": 64,
        "ray.cpus_per_worker": 1, **overrides}.items()]
    params = ["--params", str(cfg.root / "params.yaml")]

    for command in ("train", "evaluate"):
        assert main([command, *argv, *params]) == 0, command
    _assert_one_tracked_run_with_its_evaluation(cfg, mlflow_server)
    for command in ("register", "promote"):
        assert main([command, *argv, *params]) == 0, command
    out = capsys.readouterr().out
    assert "champion" in out and "version 1" in out

    test = data.load_split(prepared_data, "test")
    picture = tmp_path / "picture.png"
    Image.fromarray(test.images[0]).resize((64, 64)).save(picture)  # any size: resized to 32x32
    assert main(["predict", str(picture), *argv, *params]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{picture}: ") and line.count("%") == 5


def _assert_one_tracked_run_with_its_evaluation(cfg: config.Config, mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    summary = export.read_summary(cfg.train.models_dir)
    # The run id travels with models/ so evaluation and registration find the same run.
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # exactly one run
    run = runs[0]
    assert run.info.status == "FINISHED"
    for name in tracking.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["ray.num_workers"] == "2"
    tags = run.data.tags
    assert tags["ray_num_workers"] == "2" and tags["device"] == "cpu" and tags["git_dirty"] in ("true", "false")
    assert len(tags["git_commit"]) == 40 and tags["model_uri"] == summary["mlflow_model_uri"]
    assert {"test_top1", "test_top5", "test_loss", "best_val_top1"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"params.yaml", "train.json", "evaluation"} <= artifacts
    evaluation = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"training_curves.png", "confusion_matrix.png", "per_class_accuracy.csv"} <= evaluation

    # What the UI shows comes from the REST API.
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp.experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert [r["info"]["run_id"] for r in json.load(response)["runs"]] == [run.info.run_id]


def test_no_secret_reaches_params_tags_artifacts_or_links(tmp_path: Path, mlflow_server: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Credentials in the environment and inside URIs of the config stay out of what MLflow records."""
    environment = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    secrets = {name: f"{name.lower()}-s3cr3t-{tmp_path.name[-6:]}"
               for name in (*environment, "uri_password", "data_token", "ray_password")}
    for name in environment:
        monkeypatch.setenv(name, secrets[name])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # the test server ignores credentials
    # The tracking URI comes from the environment, the way users point the project at a shared server.
    host = mlflow_server.removeprefix("http://")
    monkeypatch.setenv(config.ENV_TRACKING_URI, f"http://alice:{secrets['uri_password']}@{host}")
    experiment = f"secrets-{tmp_path.name}"
    cfg = config.load(REPO / "params.yaml", {
        "mlflow.artifact_root": str(tmp_path / "artifacts"), "mlflow.experiment": experiment,
        "mlflow.eval_experiment": f"{experiment}-eval", "mlflow.registered_model": experiment,
        "data.url": f"https://mirror.example/cifar-100-python.tar.gz?token={secrets['data_token']}",
        "ray.address": f"ray://bob:{secrets['ray_password']}@head.example:10001"})
    assert secrets["uri_password"] in cfg.mlflow.tracking_uri  # the config does carry it

    run_id = tracking.start_training_run(cfg, data_version=None, device="cpu")
    with tracking.active(cfg, run_id):  # the fluent API, as log_model uses it; MLflow prints a link on exit
        pass
    error = f"API request to {cfg.mlflow.tracking_uri}/api/2.0/mlflow/runs/get failed"  # as MLflow words it
    tracking.end_run(cfg, run_id, "FAILED", tags={"failure": error})
    nightly_id = tracking.log_nightly_run(cfg, {"failure": error}, {}, failed=True)
    with pytest.raises(registry.RegistryError) as err:
        registry.version_info(cfg, registry.CHAMPION)  # no registered model: the error names the server

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == f"http://***@{host}"
    assert run.data.params["data.url"].endswith("?token=***") and run.data.tags["failure"].startswith(
        f"API request to http://***@{host}/")
    recorded = [*run.data.params.values(), *run.data.tags.values(), *client.get_run(nightly_id).data.tags.values(),
                tracking.run_url(cfg, run_id), str(err.value)]
    artifacts = [path.read_text() for path in (tmp_path / "artifacts").rglob("*") if path.is_file()]
    assert any("***@" in text for text in artifacts)  # params.yaml was logged, redacted
    out, errors = capfd.readouterr()
    for name, secret in secrets.items():
        for text in (*recorded, *artifacts, out, errors):
            assert secret not in text, name
