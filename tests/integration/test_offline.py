"""`mixer train-offline` and `mixer bench --device` on a machine with torch alone (a lent GPU has no
Ray, MLflow, DVC or Prefect): run with those packages made unimportable, then logged and registered
where MLflow is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from mixer import config, export, lockfile, publish, reports

REPO = Path(__file__).resolve().parents[2]

# sitecustomize runs first in every interpreter whose path holds it: Ray, MLflow, DVC and Prefect
# are then absent, as on the GPU machine.
TORCH_ALONE = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ray", "mlflow", "dvc", "prefect"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on this machine)", name=name)

sys.meta_path.insert(0, Absent())
"""
TINY = ["train.batch_size=64", "train.limit_train_batches=4", "eval.batch_size=250", "ray.cpus_per_worker=1"]


@pytest.fixture
def torch_alone(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes cannot import Ray, MLflow, DVC or Prefect."""
    site = tmp_path / "torch-alone"
    site.mkdir()
    (site / "sitecustomize.py").write_text(TORCH_ALONE)
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable}


def mixer_with_torch_alone(env: dict[str, str], project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixer.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


def test_ray_mlflow_dvc_and_prefect_are_absent_there(torch_alone: dict[str, str]) -> None:
    probe = "import importlib.util as u; print(u.find_spec('mixer') is not None); import ray"
    result = subprocess.run([sys.executable, "-c", probe], env=torch_alone, capture_output=True, text=True)
    assert result.stdout == "True\n" and "No module named 'ray' (not on this machine)" in result.stderr


@pytest.fixture
def project(tmp_path: Path, prepared_data: Path) -> Path:
    """A DVC project: params.yaml and dvc.yaml, the prepared data at data/cifar100 and a dvc.lock
    that records its version (as hashed by mixer.lockfile: DVC agrees when MLflow's side checks it)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, root / name)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q", "--no-scm"], cwd=root, check=True)
    shutil.copytree(prepared_data, root / "data" / "cifar100")
    write_lock(root, lockfile.folder_version(root / "data" / "cifar100"))
    return root


def write_lock(root: Path, md5: str) -> None:
    """The project's dvc.lock with `md5` as the version of data/cifar100."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    (out,) = lock["stages"]["ingest"]["outs"]
    out.update(md5=md5)
    for key in ("size", "nfiles"):
        out.pop(key, None)
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def test_offline_training_needs_torch_alone_resumes_and_registers_where_mlflow_is(
        torch_alone: dict[str, str], project: Path, mlflow_server: str) -> None:
    command = ["train-offline", "--checkpoints", "ck", "train.epochs=3", "train.run_name=gpu-box", *TINY]
    # Interrupted (Ctrl-C) as soon as epoch 1 is printed: it is checkpointed by then.
    interrupted = subprocess.Popen([sys.executable, "-m", "mixer.cli", *command], cwd=project, env=torch_alone,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert interrupted.stdout is not None
    for line in interrupted.stdout:
        if line.startswith("epoch   1/3"):
            interrupted.send_signal(signal.SIGINT)
            break
    assert interrupted.wait(timeout=120) == 130, interrupted.stderr.read() if interrupted.stderr else ""
    resumed = mixer_with_torch_alone(torch_alone, project, *command)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resuming)" in resumed.stdout and "epoch   3/3" in resumed.stdout and "epoch   1/3" not in resumed.stdout
    other = mixer_with_torch_alone(torch_alone, project, *command, "train.lr=0.001")
    assert other.returncode == 2 and "ck: these checkpoints are of a run with other params (train.lr: 0.005 -> 0.001)" \
        in other.stderr and other.stderr.count("\n") == 1
    straight = mixer_with_torch_alone(torch_alone, project, "train-offline", "--checkpoints", "ck-straight",
                                      "train.epochs=3", "train.models_dir=models-straight", *TINY)
    assert straight.returncode == 0, straight.stderr

    summary = export.read_summary(project / "models")
    without_time = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in summary["history"]]
    straight_summary = export.read_summary(project / "models-straight")
    assert without_time == [{k: v for k, v in row.items() if k != "epoch_seconds"}
                            for row in straight_summary["history"]]  # resuming changed nothing
    assert [row["epoch"] for row in without_time] == [1, 2, 3]
    best = min(summary["history"], key=lambda row: row["val_loss"])["epoch"]
    assert summary["best_epoch"] == best and summary["epochs_run"] == 3
    assert summary["mlflow_run_id"] is None and summary["run_name"] == "gpu-box"
    assert summary["data_version"] == lockfile.folder_version(project / "data" / "cifar100")
    assert summary["device"] == "cpu" and summary["num_workers"] == 1
    model = export.load(project / "models").model  # the plain module: no wrapper prefixes
    best_checkpoint = torch.load(project / "ck" / "best.pt", weights_only=True)
    assert best_checkpoint["state"]["epoch"] == best
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best_checkpoint["model"].items())

    # Where MLflow is: evaluate, then register the folder (a run is created for it).
    cfg = config.load(project / "params.yaml", {"mlflow.tracking_uri": mlflow_server,
                                                "mlflow.experiment": "offline",
                                                "mlflow.registered_model": "offline-mixer",
                                                "mlflow.artifact_root": str(project / "mlartifacts"),
                                                "eval.batch_size": 250})
    metrics = reports.evaluate_models(cfg, project / "models")
    version = publish.register_models(cfg, project / "models")
    assert version.created and version.aliases == ["challenger"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["data_version"] == summary["data_version"]
    assert run.data.tags["device"] == "cpu" and run.data.params["train.epochs"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]
    assert run.data.metrics["test_top1"] == pytest.approx(metrics["top1"])


def test_offline_training_refuses_data_that_dvc_lock_does_not_record(torch_alone: dict[str, str], project: Path) -> None:
    write_lock(project, "0123456789abcdef0123456789abcdef.dir")
    result = mixer_with_torch_alone(torch_alone, project, "train-offline", "train.epochs=1", *TINY)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "records 0123456789abcdef0123456789abcdef.dir" in result.stderr
    assert not (project / "models").exists()


def test_the_gpu_session_script_ingests_benchmarks_and_trains_in_its_budget(
        torch_alone: dict[str, str], tmp_path: Path, synthetic_archive: tuple[Path, str]) -> None:
    # The script a lent GPU runs (benchmarks/gpu-session.sh), small and on this CPU; `cpu:0` takes
    # the paths `cuda` takes.
    archive, md5 = synthetic_archive
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    out = tmp_path / "out"
    env = {**torch_alone, "OUT": str(out), "DEVICE": "cpu:0", "ARCHIVE": str(archive), "ARCHIVE_MD5": md5,
           "BUDGET_S": "600", "BENCH_EPOCHS": "2", "BENCH_BATCHES": "2", "MAX_EPOCHS": "2", "TMPDIR": str(tmp_path),
           # No compiling (a minute on 2 cores) and no bf16 (emulated, slow, on AVX2-only CPUs).
           "EXTRA": " ".join([*TINY, "train.compile=false", "train.precision=fp32"])}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu-session.sh")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    log = (out / "log.txt").read_text()
    assert "== done in" in log and "\n2 epochs\n" in log
    for preset in ("seed", "nano"):
        bench = json.loads((out / f"bench-{preset}.json").read_text())
        assert bench["preset"] == preset and bench["device"] == "cpu:0" and bench["pipeline_over_plain"] > 0
    summary = export.read_summary(out / "best-nano-gpu")
    assert summary["epochs_run"] == 2 and summary["model_config"]["preset"] == "nano"
    assert summary["params"]["train"]["schedule"] == "cosine" and summary["params"]["train"]["precision"] == "fp32"
    export.load(out / "best-nano-gpu")
