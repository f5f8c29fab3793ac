"""Stress: two `mixer train` at once on one machine; many train+register runs back to back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mixer import registry

from .conftest import tiny_config

BIN = Path(sys.executable).parent


@pytest.mark.stress
def test_two_concurrent_mixer_train_runs_both_finish_and_register(tmp_path: Path, prepared_data: Path,
                                                                   mlflow_server: str) -> None:
    """Two terminals on one machine: each `mixer train` starts its own local Ray, writes to its own
    run folder and tracks through the same MLflow server; then each folder is evaluated and registered."""
    from mixer import config, publish, reports

    name = f"concurrent-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, prepared_data, **{
        "train.epochs": 2, "train.limit_train_batches": 4, "ray.num_workers": 1, "ray.cpus_per_worker": 1,
        "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": name, "mlflow.registered_model": name})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "root"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}

    def outputs(run: str) -> dict[str, str]:
        folder = tmp_path / run
        return {"train.models_dir": str(folder / "models"), "eval.metrics_dir": str(folder / "metrics"),
                "eval.plots_dir": str(folder / "plots"), "ray.storage_path": str(folder / "ray")}

    ray_tmps: list[str] = []

    def train(run: str) -> subprocess.Popen[str]:
        # Its own Ray temp folder: `ray.init()` would otherwise join the session's test cluster, which
        # it finds through /tmp/ray. Short: Ray's socket paths must stay under 108 characters.
        ray_tmp = tempfile.mkdtemp(prefix=f"r{run}", dir="/tmp")
        ray_tmps.append(ray_tmp)
        return subprocess.Popen([str(BIN / "mixer"), "train", "--params", str(params),
                                 *(f"{k}={v}" for k, v in outputs(run).items())],
                                env={**env, "RAY_TMPDIR": ray_tmp}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    running = {run: train(run) for run in ("a", "b")}
    logs = {run: proc.communicate(timeout=600)[0] for run, proc in running.items()}
    for folder in ray_tmps:  # each Ray has shut down with its driver
        shutil.rmtree(folder, ignore_errors=True)
    for run, proc in running.items():
        assert proc.returncode == 0, logs[run][-3000:]
        assert "Started a local Ray instance" in logs[run]  # its own Ray, not a shared one
    versions = []
    for run in ("a", "b"):
        run_cfg = config.replace(cfg, outputs(run))
        reports.evaluate_models(run_cfg)
        versions.append(publish.register_models(run_cfg).version)

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(versions) == [1, 2]
    registered = client.search_model_versions(f"name = '{name}'")
    assert {v.run_id for v in registered} == {r.info.run_id for r in runs}  # each run registered once
    assert registry.version_info(cfg, "challenger").version == versions[-1]


SOAK_RUNS = 20


@pytest.mark.stress
@pytest.mark.timeout(1800)  # ~35 s per run on 2 cores: the default 600 s stopped it after 17 runs
@pytest.mark.usefixtures("ray_session")
def test_back_to_back_train_and_register_runs_against_one_server(tmp_path: Path, prepared_data: Path,
                                                                 mlflow_server: str) -> None:
    """Twenty tiny train + evaluate + register cycles on one MLflow server and one Ray cluster:
    twenty versions, every run FINISHED, and Ray holds no CPUs afterwards (no leaked placement groups)."""
    import ray

    from mixer import config, publish, reports, training

    name = f"soak-{uuid.uuid4().hex[:8]}"
    base = tiny_config(tmp_path, prepared_data, **{
        "train.epochs": 1, "train.limit_train_batches": 2, "train.limit_eval_batches": 1, "ray.num_workers": 1,
        "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": name, "mlflow.registered_model": name})
    training.connect(base)
    inputs = training.load_inputs(base)
    total_cpus = ray.cluster_resources()["CPU"]
    versions = []
    for i in range(SOAK_RUNS):
        folder = tmp_path / f"run-{i}"
        cfg = config.replace(base, {"train.models_dir": str(folder / "models"),
                                    "eval.metrics_dir": str(folder / "metrics"), "eval.plots_dir": str(folder / "plots")})
        training.fit(cfg, inputs=inputs)
        reports.evaluate_models(cfg)
        versions.append(publish.register_models(cfg).version)

    assert versions == list(range(1, SOAK_RUNS + 1))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    assert len(runs) == SOAK_RUNS and {r.info.status for r in runs} == {"FINISHED"}
    registered = client.search_model_versions(f"name = '{name}'", max_results=100)
    assert len({v.run_id for v in registered}) == SOAK_RUNS
    assert registry.version_info(base, "challenger").version == SOAK_RUNS
    assert ray.available_resources().get("CPU", 0) == total_cpus
