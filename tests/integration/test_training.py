"""Ray Train on a two-node cluster: one worker per node, data only from the object store, DDP keeps
ranks identical, the loss falls, runs repeat, killed workers resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ray
from mixer import config, export, training
from ray.train import UserCallback

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


class ReportsToFile(UserCallback):
    """Every worker's report, one JSON line per epoch (the callback runs in Ray's controller process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")


@dataclass(frozen=True)
class Uninterrupted:
    cfg: config.Config
    result: training.FitResult
    reports: list[list[dict[str, Any]]]  # per epoch, every worker's report


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, prepared_data: Path) -> Uninterrupted:
    """A 2-worker training on the two-node cluster that nothing disturbs, from object-store data only."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    data_dir = tmp_path / "data" / "cifar100"
    shutil.copytree(prepared_data, data_dir)
    cfg = tiny_config(tmp_path, data_dir, **{"train.epochs": 4})
    reports = tmp_path / "reports.jsonl"
    training.connect(cfg)
    inputs = training.load_inputs(cfg)
    # From here on no process can read the prepared data from disk: workers must train on the
    # arrays the driver put in the object store.
    data_dir.rename(tmp_path / "moved-away")
    result = training.fit(cfg, callbacks=[ReportsToFile(reports)], inputs=inputs)
    return Uninterrupted(cfg, result, [json.loads(line) for line in reports.read_text().splitlines()])


def test_two_workers_on_two_nodes_stay_identical_and_learn(uninterrupted: Uninterrupted) -> None:
    cfg, result, epochs = uninterrupted.cfg, uninterrupted.result, uninterrupted.reports
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    assert len(epochs) == 4 and all(len(workers) == 2 for workers in epochs)
    for rank0, rank1 in epochs:
        assert rank0["node_id"] != rank1["node_id"]  # one worker per node
        assert rank0["weights_checksum"] == rank1["weights_checksum"]  # DDP: the same weights everywhere
        assert rank0["val_loss"] == rank1["val_loss"]  # validation is summed across ranks
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] * 0.8
    assert result.history[-1]["val_top1"] > 0.2  # chance is 0.01

    exported = export.load(cfg.train.models_dir)
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == min(row["val_loss"] for row in result.history)
    assert exported.summary["best_epoch"] == result.best_epoch
    # Plain torch reads the weights without running code from the file.
    payload = torch.load(cfg.train.models_dir / export.WEIGHTS_FILE, weights_only=True)
    assert set(payload["state_dict"]) == set(exported.model.state_dict())


def test_a_run_started_from_an_export_trains_on_from_its_weights_on_both_nodes(
        tmp_path: Path, prepared_data: Path, uninterrupted: Uninterrupted) -> None:
    from mlflow import MlflowClient

    source = uninterrupted.result
    cfg = tiny_config(tmp_path, prepared_data, **{
        "train.init_from": str(uninterrupted.cfg.train.models_dir), "train.epochs": 1,
        "train.limit_train_batches": 1, "train.lr": 1.0e-9})  # one step that barely moves the weights
    reports = tmp_path / "reports.jsonl"

    result = training.fit(cfg, callbacks=[ReportsToFile(reports)])

    # Both ranks start from the exported weights (not random ones), so epoch 1 validates as the
    # source's best epoch did, and DDP keeps them identical.
    [[rank0, rank1]] = [json.loads(line) for line in reports.read_text().splitlines()]
    assert rank0["weights_checksum"] == rank1["weights_checksum"]
    assert result.history[0]["val_top1"] == pytest.approx(source.best["val_top1"], abs=0.01)
    # The lineage: the export and the MLflow run say where the weights came from.
    origin = export.load(cfg.train.models_dir).summary["init_from"]
    assert origin == {"folder": str(uninterrupted.cfg.train.models_dir), "mlflow_run_id": source.run_id,
                      "run_name": export.read_summary(uninterrupted.cfg.train.models_dir)["run_name"],
                      "epochs_run": 4, "best_epoch": source.best_epoch}
    params = MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id).data.params
    assert params["train.init_from"] == str(uninterrupted.cfg.train.models_dir)


def _without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


class KillAWorkerAfter(UserCallback):
    """Kills one training worker process (SIGKILL) right after the given epoch is reported."""

    def __init__(self, epoch: int, marker: Path) -> None:
        self.epoch = epoch
        self.marker = marker  # the callback object is restored with the controller: kill only once

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import os
        import signal

        from ray.util.state import list_actors

        if metrics[0]["epoch"] != self.epoch or self.marker.exists():
            return
        # This cluster's live workers only (State API), never another Ray's on the same machine.
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert workers, "no Ray Train worker process found"
        pid = max(worker.pid for worker in workers)
        self.marker.write_text(str(pid))
        os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_resumes_from_the_checkpoint_in_the_same_mlflow_run(
        tmp_path: Path, prepared_data: Path, uninterrupted: Uninterrupted) -> None:
    from mlflow import MlflowClient

    cfg = tiny_config(tmp_path, prepared_data, **{"train.epochs": 4, "ray.max_failures": 1})
    killed = tmp_path / "killed"
    result = training.fit(cfg, callbacks=[KillAWorkerAfter(2, killed)])

    assert killed.exists()  # a worker really died
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    # Resumed from the epoch-2 checkpoint, it replays exactly what the same params and seed gave
    # without the failure (so reruns are deterministic too).
    assert _without_timings(result.history) == _without_timings(uninterrupted.result.history)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [1, 2, 3, 4]


def test_ctrl_c_and_sigterm_leave_a_run_that_resumes_where_it_stopped(tmp_path: Path, prepared_data: Path,
                                                                     ray_session: str) -> None:
    """Ctrl-C `mixer train` after epoch 2, SIGTERM the resumed run after epoch 4, then finish it."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    cfg = tiny_config(tmp_path, prepared_data, **{"train.epochs": 6, "train.limit_train_batches": 5,
                                                  "ray.num_workers": 1})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "root"}))
    command = [str(Path(sys.executable).parent / "mixer"), "train", "--params", str(params)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}  # params decide
    env["RAY_ADDRESS"] = ray_session
    client = MlflowClient(cfg.mlflow.tracking_uri)

    def interrupt(argv: list[str], after: str, sig: int) -> str:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            if after in line:
                proc.send_signal(sig)
                break
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, stderr[-3000:]
        [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
        assert run.info.status == "KILLED"  # a clean status, not a run left RUNNING
        return stderr

    # No name given: the interruption names the run and says how to resume it, in one line.
    stderr = interrupt(command, "epoch   2/6", signal.SIGINT)
    [line] = [line for line in stderr.splitlines() if line.startswith("mixer train: interrupted")]
    name = re.search(r"train\.run_name=(\S+) to resume", line).group(1)
    resume = [*command, f"train.run_name={name}"]
    interrupt(resume, "epoch   4/6", signal.SIGTERM)

    finished = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    output = finished.stdout + finished.stderr
    assert "epoch   6/6" in output and "epoch   4/6" not in output  # resumed, not started over

    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1, 2, 3, 4, 5, 6]
    assert export.read_summary(cfg.train.models_dir)["epochs_run"] == 6

