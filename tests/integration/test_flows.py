"""The Prefect flows under `prefect_test_harness`, on a git + DVC copy of the project, real Ray and MLflow.

One trained champion (the train-mixer flow itself) serves the nightly checks; each check then moves
the registry or the data to what it guards against and puts the champion back.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.evaluate import evaluate_mixer
from flows.ingest import fetch_archive
from flows.train import REPORT_KEY, train_mixer
from mixer import config, data, export, publish, registry, reports, runs, serving, tracking, versioning
from mixer.model import build_model
from tests.projects import make_project


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class Trained:
    root: Path
    overrides: dict[str, Any]  # what every flow call of the module passes (archive, tracking store)
    result: dict[str, Any]
    state: Any

    @property
    def params(self) -> str:
        return str(self.root / "params.yaml")

    def cfg(self, **extra: Any) -> config.Config:
        return config.load(self.params, {**self.overrides, **extra})


@pytest.fixture(scope="module")
def trained(harness: None, ray_session: str, synthetic_archive: tuple[Path, str],
            tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The train-mixer flow, run once: ingest subflow, 1 epoch on Ray, evaluation, registration, gate."""
    archive, md5 = synthetic_archive
    tmp = tmp_path_factory.mktemp("flows")
    root, _ = make_project(tmp / "project", archive, md5)
    overrides = {"data.url": str(archive), "data.md5": md5, "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                 "mlflow.artifact_root": str(tmp / "mlartifacts")}
    state = train_mixer(overrides={**overrides, "train.epochs": 1}, params=str(root / "params.yaml"),
                        return_state=True)
    return Trained(root, overrides, state.result(raise_on_failure=False), state)


def test_train_flow_writes_its_run_folder_registers_and_reports(trained: Trained) -> None:
    assert trained.state.is_completed(), trained.state.message
    result = trained.result
    folder = Path(result["run_folder"])
    assert folder.parent == trained.root / "runs"
    assert (folder / "models" / "model.pt").is_file() and (folder / "metrics" / "eval.json").is_file()
    assert not (trained.root / "models").exists() and not (trained.root / "metrics").exists()  # DVC's outs

    lock = yaml.safe_load((trained.root / "dvc.lock").read_text())  # the ingest subflow ran the DVC stage
    assert result["data_version"] == lock["stages"]["ingest"]["outs"][0]["md5"]
    cfg = trained.cfg()
    champion = registry.version_info(cfg, registry.CHAMPION)
    assert champion.version == result["version"] == 1 and result["promoted"]  # the first champion
    assert set(champion.aliases) == {registry.CHAMPION, registry.CHALLENGER}
    assert champion.data_version == result["data_version"]
    assert champion.test_top1 == pytest.approx(result["test_top1"]) and result["test_top1"] > 0.1

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    report = artifacts[0].data
    assert f"| test top-1 | {result['test_top1']:.2%} |" in report
    assert f"/runs/{result['mlflow_run_id']})" in report and f"/#/models/{cfg.mlflow.registered_model}/versions/1)" in report


def test_nightly_flow_passes_and_records_the_check(trained: Trained) -> None:
    state = evaluate_mixer(overrides=trained.overrides, params=trained.params, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["version"] == 1 and result["top1"] == pytest.approx(result["registered_top1"])
    cfg = trained.cfg()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "cifar100-mixer-eval"
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_version"] == "1" and run.data.tags["data_version"] == trained.result["data_version"]
    assert run.data.metrics["test_top1"] == pytest.approx(result["top1"])
    tags = client.get_model_version(cfg.mlflow.registered_model, "1").tags
    assert tags["nightly_status"] == "passed" and float(tags["nightly_top1"]) == pytest.approx(result["top1"])


def _register_untrained(trained: Trained, name: str) -> int:
    """A real but untrained model logged, evaluated and registered the way the pipeline does it."""
    cfg = runs.load_for_run(trained.params, trained.overrides, name)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would predict the uniform distribution
    meta = data.load_meta(cfg.data.out_dir)
    run_id = tracking.start_training_run(cfg, versioning.data_version(cfg.root, cfg.data.out_dir), "cpu")
    row = {"epoch": 1, "train_loss": 4.6, "train_top1": 0.01, "val_loss": 4.6, "val_top1": 0.01, "val_top5": 0.05,
           "lr": 0.005, "epoch_seconds": 1.0}
    export.save(cfg.train.models_dir, model.state_dict(), cfg.model, meta["mean"], meta["std"], info={
        "best_epoch": 1, "history": [row], "class_names": meta["fine_label_names"], "mlflow_run_id": run_id})
    with tracking.active(cfg, run_id):
        model_uri = serving.log_model(cfg.train.models_dir, np.zeros((2, 32, 32, 3), dtype=np.uint8))
    export.annotate(cfg.train.models_dir, mlflow_model_uri=model_uri)
    tracking.finish_training_run(cfg, run_id, {"best_val_top1": 0.01}, cfg.train.models_dir, model_uri)
    reports.evaluate_models(cfg, cfg.train.models_dir)
    return publish.register_models(cfg, cfg.train.models_dir).version


@pytest.fixture
def champion_back(trained: Trained) -> Iterator[None]:
    """Whatever a test does to the champion alias, version 1 is the champion afterwards."""
    yield
    registry.promote(trained.cfg(), version=1, force=True)


def test_nightly_fails_when_the_champion_moved_to_a_worse_version(trained: Trained, champion_back: None) -> None:
    worse = _register_untrained(trained, "worse")
    registry.promote(trained.cfg(), version=worse, force=True)  # e.g. a forced promotion by mistake

    state = evaluate_mixer(overrides=trained.overrides, params=trained.params, return_state=True)

    assert state.is_failed()
    assert f"champion moved from version 1 (top-1 {trained.result['test_top1']:.2%}" in state.message
    assert f"to version {worse}" in state.message
    failed = MlflowClient(trained.cfg().mlflow.tracking_uri).get_model_version(
        trained.cfg().mlflow.registered_model, str(worse)).tags
    assert failed["nightly_status"] == "failed"


def test_nightly_fails_on_a_data_version_newer_than_the_registration(trained: Trained, tmp_path: Path) -> None:
    # The same project where a new data version was produced (as `dvc pull` of a newer dvc.lock would).
    root = tmp_path / "newer"
    shutil.copytree(trained.root, root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["split_seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    newer = versioning.reproduce_ingest(config.load(root / "params.yaml", trained.overrides))
    assert newer != trained.result["data_version"]

    state = evaluate_mixer(overrides=trained.overrides, params=str(root / "params.yaml"), return_state=True)

    assert state.is_failed()
    assert "data version changed since registration" in state.message
    assert f"tested on {trained.result['data_version'][:12]}, the workspace data (dvc.lock) is {newer[:12]}" \
        in state.message


def test_nightly_fails_when_a_dependency_upgrade_changes_the_outputs(trained: Trained, tmp_path: Path) -> None:
    # The closest real thing to an upgrade: the installed loader package replaced by a version whose
    # preprocessing feeds channels in BGR order (what a switch of image library does), then the real
    # check in a fresh process on the unchanged champion artifact.
    upgraded = tmp_path / "upgraded"
    shutil.copytree(Path(serving.__file__).parent, upgraded / "mixer", ignore=shutil.ignore_patterns("__pycache__"))
    augment = upgraded / "mixer" / "augment.py"
    source = augment.read_text()
    assert "x = images.permute(0, 3, 1, 2)" in source
    augment.write_text(source.replace("x = images.permute(0, 3, 1, 2)", "x = images.flip(-1).permute(0, 3, 1, 2)"))
    script = ("import json, sys; from mixer import config, nightly; "
              "nightly.check_champion(config.load(sys.argv[1], json.loads(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", script, trained.params, json.dumps(trained.overrides)],
                          cwd=upgraded, env={**os.environ, "PYTHONPATH": str(upgraded)},
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 1
    assert "NightlyCheckFailed: cifar100-mixer version 1 test top-1" in done.stderr
    assert f"below the {trained.result['test_top1']:.2%} recorded at registration" in done.stderr


def test_nightly_fails_when_the_artifact_no_longer_loads(trained: Trained, champion_back: None) -> None:
    broken = _register_untrained(trained, "broken")
    cfg = trained.cfg()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    source = client.get_model_version(cfg.mlflow.registered_model, str(broken)).source  # models:/m-...
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    weights = next(Path(location.removeprefix("file://")).rglob(export.WEIGHTS_FILE))
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated upload / disk fault
    registry.promote(cfg, version=broken, force=True)

    state = evaluate_mixer(overrides=trained.overrides, params=trained.params, return_state=True)

    assert state.is_failed()
    assert f"cifar100-mixer version {broken} (champion) no longer loads (ExportError:" in state.message


class Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_failed_check_without_champion_notifies_the_block(trained: Trained) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        CustomWebhookNotificationBlock(name="mixer", url=f"http://127.0.0.1:{server.server_port}/hook",
                                       json_data={"text": "{{subject}}: {{body}}"}).save("ml-alerts", overwrite=True)
        empty = f"cifar100-mixer-{uuid.uuid4().hex[:8]}"  # a registered model nobody promoted
        overrides = {**trained.overrides, "mlflow.registered_model": empty, "eval.notify_block": "ml-alerts"}

        state = evaluate_mixer(overrides=overrides, params=trained.params, return_state=True)
    finally:
        server.shutdown()

    assert state.is_failed()
    assert f"no champion to check: no registered model {empty}" in state.message
    assert len(Receiver.bodies) == 1
    text = Receiver.bodies[0]["text"]
    assert text.startswith(f"evaluate-mixer failed: {empty}: ") and "no champion to check" in text


def test_fetch_retries_network_errors_only(harness: None, synthetic_archive: tuple[Path, str], tmp_path: Path) -> None:
    archive, md5 = synthetic_archive
    failures = {"left": 2}
    requests: list[str] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            if failures["left"]:
                failures["left"] -= 1
                self.send_error(503)
                return
            body = archive.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/cifar-100-python.tar.gz"
    fetch = fetch_archive.with_options(retry_delay_seconds=0)
    try:
        cfg = config.load(_project_params(), {"data.url": url, "data.md5": md5, "data.download_dir": str(tmp_path / "a")})
        assert Path(fetch(cfg)).read_bytes() == archive.read_bytes()
        assert len(requests) == 3  # two 503s retried

        requests.clear()
        failures["left"] = 10
        with pytest.raises(data.DownloadError, match=r"^download .*: failed \(HTTP Error 503.*check the network"):
            fetch(config.load(_project_params(), {"data.url": url, "data.md5": md5,
                                               "data.download_dir": str(tmp_path / "b")}))
        assert len(requests) == 4  # 1 + 3 retries, then the clear error

        requests.clear()
        failures["left"] = 0
        with pytest.raises(data.DataError, match="does not match data.md5"):
            fetch(config.load(_project_params(), {"data.url": url, "data.md5": "0" * 32,
                                               "data.download_dir": str(tmp_path / "c")}))
        assert len(requests) == 1  # a wrong md5 is not retried
    finally:
        server.shutdown()


def _project_params() -> Path:
    return Path(__file__).resolve().parents[2] / "params.yaml"
