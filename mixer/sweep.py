"""`mixer sweep`: a Ray Tune search over params, each trial a Ray Train run, ASHA stopping weak trials.

The driver loads the data once into the object store, opens a parent MLflow run and starts a Tuner.
Each trial is a small Tune function (training.run_sweep_trial) that launches its own TorchTrainer
(the Ray Train V2 pattern) and forwards every epoch to Tune, so ASHA can stop it between epochs. A Tune
callback on the driver mirrors each trial into an MLflow child run: as for `mixer train`, nothing on
the cluster talks to MLflow. At the end, the best trial by validation loss (never by the test set) is
exported, evaluated on the test split once, and registered as a version of the model @challenger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler

from mixer import config, publish, registry, reports, tracking, training
from mixer.epochs import EPOCH_METRICS
from mixer.progress import EpochLog
from mixer.config import Config

METRIC, MODE = "val_loss", "min"  # what ASHA and the final choice rank trials by
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes: a trial's driver process imports torch and Ray Train


@dataclass(frozen=True)
class SweepResult:
    name: str
    parent_run_id: str
    trials: list[dict[str, Any]]  # per trial: id, overrides, run_id, epochs, best val_loss / val_top1, status
    best_trial: str
    models_dir: Path  # the best trial's exported model
    version: registry.VersionInfo


def search_space(space: Mapping[str, Mapping[str, list[Any]]]) -> dict[str, Any]:
    """params.yaml's space as Tune domains, e.g. {"train.lr": {"loguniform": [1e-3, 1e-2]}} -> tune.loguniform."""
    domains = {
        "grid": lambda values: ray.tune.grid_search(values),
        "choice": lambda values: ray.tune.choice(values),
        "uniform": lambda values: ray.tune.uniform(*values),
        "loguniform": lambda values: ray.tune.loguniform(*values),
        "randint": lambda values: ray.tune.randint(values[0], values[1] + 1),  # both ends included
    }
    return {key: domains[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def check_space(base: Config) -> None:
    """Every value the space can produce must make a valid config: fail before any trial starts."""
    for key, spec in base.sweep.space.items():
        for kind, values in spec.items():
            for value in values:
                config.replace(base, {key: int(value) if kind == "randint" else value})


def run(cfg: Config, out_dir: Path, name: str | None = None) -> SweepResult:
    """Search, then export, evaluate and register the best trial; outputs go under `out_dir`/<name>/."""
    name = name or training.unique_name("sweep")
    check_space(cfg)
    training.connect(cfg)
    inputs = training.load_inputs(cfg)
    parent = tracking.start_sweep_run(cfg, name, inputs.data_version, cfg.sweep.space)
    trial_runs = TrialRuns(cfg, name, parent, inputs.data_version)
    try:
        results = _tune(cfg, name, inputs, trial_runs)
        best_id, best_row, history = _best(results)
        best_cfg = training.trial_config(cfg, name, best_id, trial_runs.overrides[best_id])
        folder = out_dir / name
        best_cfg = config.replace(best_cfg, {"train.models_dir": str(folder / "models"),
                                             "eval.metrics_dir": str(folder / "metrics"),
                                             "eval.plots_dir": str(folder / "plots")})
        best_state = training.read_checkpoint(_checkpoint(cfg, best_row[CHECKPOINT_PATH_KEY]))
        best_run = trial_runs.run_ids[best_id]
        model_uri = training.export_best(best_cfg, inputs, best_state, history, best_run, best_cfg.train.models_dir)
        tracking.end_run(cfg, best_run, "FINISHED", tags={tracking.MODEL_URI_TAG: model_uri, "best_trial": "true"})
        reports.evaluate_models(best_cfg)  # the test split, once, for the chosen trial only
        version = publish.register_models(best_cfg)
        tracking.end_run(cfg, parent, "FINISHED", metrics={"best_val_loss": best_row[METRIC],
                                                           "best_val_top1": best_row["val_top1"]},
                         tags={"best_trial": best_id, "best_run_id": best_run, "registered_version": str(version.version)})
    except BaseException:
        tracking.end_run(cfg, parent, "FAILED")
        raise
    return SweepResult(name, parent, trial_runs.summary(), best_id, best_cfg.train.models_dir, version)


def _tune(cfg: Config, name: str, inputs: training.TrainingInputs, trial_runs: TrialRuns) -> ray.tune.ResultGrid:
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                              grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
                              reduction_factor=cfg.sweep.reduction_factor)
    # The trial function only drives its Train run: it needs memory but no CPU of its own, so a
    # trial's CPU footprint is its workers' (ray.num_workers x ray.cpus_per_worker). Ray wants some
    # resource in every request; memory is the honest one.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(training.run_sweep_trial, base=cfg,
                                                                 sweep_name=name, inputs=inputs),
                                        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"overrides": search_space(cfg.sweep.space)},
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler,
                                        num_samples=cfg.sweep.num_samples,
                                        max_concurrent_trials=cfg.sweep.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name=name, storage_path=cfg.ray.storage_path, callbacks=[trial_runs],
                                      verbose=0),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if len(errors) == len(results):
        raise RuntimeError(f"sweep {name}: every trial failed; the first: {errors[0]}")
    return results


def _best(results: ray.tune.ResultGrid) -> tuple[str, dict[str, Any], list[dict[str, float]]]:
    """The trial and epoch with the lowest val loss over every reported epoch, and that trial's history."""
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="all")
    frame = best.metrics_dataframe.drop_duplicates("epoch", keep="last").sort_values("epoch")
    row = frame.loc[frame[METRIC].idxmin()].to_dict()
    history = [{key: float(r[key]) for key in ("epoch", *EPOCH_METRICS)} | {"epoch": int(r["epoch"])}
               for r in frame.to_dict("records")]
    return best.metrics["trial_id"], row, history


def _checkpoint(cfg: Config, path: str) -> ray.train.Checkpoint:
    """A Train checkpoint reported to Tune by path, on the sweep's storage (a local folder or a URI)."""
    if "://" in cfg.ray.storage_path:
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(cfg.ray.storage_path)
        return ray.train.Checkpoint(path, filesystem=filesystem)
    return ray.train.Checkpoint(path)


class TrialRuns(ray.tune.Callback):
    """Each trial as an MLflow child run of the sweep, written by the driver from Tune's results."""

    def __init__(self, cfg: Config, name: str, parent_run_id: str, data_version: str | None) -> None:
        self.cfg, self.name, self.parent, self.data_version = cfg, name, parent_run_id, data_version
        self.overrides: dict[str, dict[str, Any]] = {}
        self.run_ids: dict[str, str] = {}
        self.logs: dict[str, EpochLog] = {}
        self.best: dict[str, dict[str, float]] = {}
        self.status: dict[str, str] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        overrides = dict(trial.config["overrides"])
        cfg = training.trial_config(self.cfg, self.name, trial.trial_id, overrides)
        device = "cuda" if cfg.ray.use_gpu else "cpu"
        run_id = tracking.start_training_run(cfg, self.data_version, device, parent_run_id=self.parent)
        self.overrides[trial.trial_id], self.run_ids[trial.trial_id] = overrides, run_id
        self.logs[trial.trial_id] = EpochLog(cfg.mlflow.tracking_uri, run_id)
        self.status[trial.trial_id] = "RUNNING"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self.logs[trial.trial_id](result)
        best = self.best.get(trial.trial_id)
        if best is None or result[METRIC] < best[METRIC]:
            self.best[trial.trial_id] = {key: float(result[key]) for key in ("epoch", METRIC, "val_top1")}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0))
        stopped = epochs < self.cfg.train.epochs and not (trial.last_result or {}).get("early_stopped")
        self.status[trial.trial_id] = "STOPPED_BY_ASHA" if stopped else "FINISHED"
        self._end(trial, "FINISHED", {"asha_stopped": str(stopped).lower(), "epochs_run": str(epochs)})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "FAILED"
        self._end(trial, "FAILED", {})

    def _end(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        best = self.best.get(trial.trial_id, {})
        metrics = {f"best_{k}": v for k, v in best.items() if k != "epoch"}
        if best:
            metrics["best_epoch"] = best["epoch"]
        tracking.end_run(self.cfg, self.run_ids[trial.trial_id], status, metrics, tags)

    def summary(self) -> list[dict[str, Any]]:
        return [{"trial": trial_id, "overrides": self.overrides[trial_id], "run_id": run_id,
                 "status": self.status.get(trial_id), **self.best.get(trial_id, {})}
                for trial_id, run_id in self.run_ids.items()]
