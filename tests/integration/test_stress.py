"""Stress: two `mixer train` at once on one machine; many train+register runs back to back."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mixer import registry

from .conftest import tiny_config

BIN = Path(sys.executable).parent


def test_two_concurrent_mixer_train_runs_both_finish_and_register(tmp_path: Path, prepared_data: Path,
                                                                   mlflow_server: str) -> None:
    """Two terminals on one machine: each `mixer train` starts its own local Ray, writes to its own
    run folder and tracks through the same MLflow server; then each evaluates and registers."""
    name = f"concurrent-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, prepared_data, **{
        "train.epochs": 2, "train.limit_train_batches": 4, "ray.num_workers": 1, "ray.cpus_per_worker": 1,
        "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": name, "mlflow.registered_model": name})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "root"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}

    def chain(run: str) -> subprocess.Popen[str]:
        folder = tmp_path / run
        outs = [f"train.models_dir={folder / 'models'}", f"eval.metrics_dir={folder / 'metrics'}",
                f"eval.plots_dir={folder / 'plots'}", f"ray.storage_path={folder / 'ray'}"]
        mixer = [str(BIN / "mixer")]
        steps = [[*mixer, "train", "--params", str(params), *outs],
                 [*mixer, "evaluate", "--params", str(params), "--weights", str(folder / "models"), *outs],
                 [*mixer, "register", "--params", str(params), "--from", str(folder / "models"), *outs]]
        script = " && ".join(" ".join(f"'{part}'" for part in step) for step in steps)
        return subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    running = {run: chain(run) for run in ("a", "b")}
    outputs = {run: proc.communicate(timeout=600)[0] for run, proc in running.items()}
    for run, proc in running.items():
        assert proc.returncode == 0, outputs[run][-3000:]
        assert "Started a local Ray instance" in outputs[run]  # its own Ray, not a shared one

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}  # each run registered once
    assert registry.version_info(cfg, "challenger").version in (1, 2)
