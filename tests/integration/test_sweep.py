"""`mixer sweep` on the two-node test cluster: 4 trials, 2 at a time, ASHA, MLflow child runs, the best registered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import ray
from mixer import export, registry, sweep

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")

GOOD_LR = 3e-3
# One learning rate that learns and three that barely move: ASHA must stop the weak ones after
# the first epoch once the good trial has set the bar. Reduction factor 4 (only the best quarter
# of the rung goes on) because the three weak losses differ only in the fourth decimal: with 2, a
# weak trial that reports after another weak one can sit just above the median and carry on.
SPACE = {"train.lr": {"grid": [GOOD_LR, 1e-6, 2e-6, 3e-6]}}


def test_a_sweep_stops_weak_trials_and_registers_the_best(tmp_path: Path, prepared_data: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data, **{
        "train.epochs": 2, "train.limit_train_batches": 6, "train.limit_eval_batches": 1, "ray.num_workers": 1,
        "sweep.num_samples": 1, "sweep.max_concurrent_trials": 2, "sweep.grace_period": 1,
        "sweep.reduction_factor": 4, "sweep.space": SPACE, "mlflow.registered_model": "sweep-model"})

    result = sweep.run(cfg, out_dir=tmp_path / "sweeps", name="s1")

    client = MlflowClient(cfg.mlflow.tracking_uri)
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4 and {run.info.status for run in children} == {"FINISHED"}
    lrs = sorted(float(run.data.params["train.lr"]) for run in children)
    assert lrs == sorted(SPACE["train.lr"]["grid"])
    for run in children:  # each epoch logged once, 1..n
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == list(range(1, int(run.data.tags["epochs_run"]) + 1))
    stopped = [run for run in children if run.data.tags["asha_stopped"] == "true"]
    assert len(stopped) >= 2 and all(run.data.tags["epochs_run"] == "1" for run in stopped)
    # Two trials ran at the same time (one Train worker per node).
    spans = sorted((run.info.start_time, run.info.end_time) for run in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))

    best = next(run for run in children if run.info.run_id == result.version.run_id)
    assert float(best.data.params["train.lr"]) == GOOD_LR and best.data.tags["best_trial"] == "true"
    assert int(client.get_model_version_by_alias("sweep-model", registry.CHALLENGER).version) == result.version.version
    assert result.version.test_top1 is not None and "test_top1" in best.data.metrics
    assert export.load(result.models_dir).summary["mlflow_run_id"] == best.info.run_id
    assert client.get_run(result.parent_run_id).data.tags["registered_version"] == str(result.version.version)

    # Stopped trials took their Train workers with them: every CPU is free again.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_space_value_that_makes_a_bad_config_fails_before_any_trial(tmp_path: Path, prepared_data: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data, **{"sweep.space": {"model.dropout": {"choice": [0.1, 1.5]}}})
    with pytest.raises(ValueError, match=r"model.dropout: must be in \[0, 1\), got 1.5"):
        sweep.run(cfg, out_dir=tmp_path / "sweeps")
    assert MlflowClient(cfg.mlflow.tracking_uri).search_runs(  # refused before any run was recorded
        [e.experiment_id for e in MlflowClient(cfg.mlflow.tracking_uri).search_experiments()]) == []
