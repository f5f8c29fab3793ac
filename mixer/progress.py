"""What the Ray Train controller does with each epoch rank 0 reports: hand it to the handlers of
mixer.epochs (print it, stop on divergence) and log it to MLflow.

The controller process unpickles these callbacks as it starts, on the way to the first training
step, so this module imports neither torch nor MLflow (on 2 cores each costs seconds there):
`EpochLog` imports MLflow at the first epoch, while the workers go on training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.train import UserCallback

from mixer.epochs import EPOCH_METRICS


class OnEpoch(UserCallback):
    """Hands rank 0's report of each epoch to plain callables, on the Ray Train controller.

    The controller runs beside the driver, so MLflow logging here needs no route from the workers
    to the tracking store.
    """  # Ray-specific

    def __init__(self, *handlers: Callable[[dict[str, Any]], None]) -> None:
        self.handlers = handlers

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        for handler in self.handlers:
            handler(metrics[0])


class EpochLog:
    """Logs each reported epoch to an MLflow run once, at step = epoch, even when Ray restarts workers.

    A restarted worker group resumes from the last checkpoint and reports again the epochs after
    it; those already in MLflow are skipped, so the run keeps one point per epoch.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.last_logged: int | None = None  # read from MLflow on first use (the run may be resumed)
        self.lost = False  # MLflow failed once: stop trying (each try would wait out its HTTP retries)

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        if self.lost:
            return
        try:
            self._log(metrics)
        except Exception as err:  # the server went away: training goes on, fit() backfills at the end
            self.lost = True
            print(f"warning: MLflow stopped answering ({type(err).__name__}); training continues, and the "
                  f"epochs are logged when it is back (or by `mixer register --from`)", flush=True)

    def _log(self, metrics: Mapping[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        mlflow_client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.last_logged is None:
            history = mlflow_client.get_metric_history(self.run_id, "val_loss")
            self.last_logged = max((m.step for m in history), default=0)
        epoch = int(metrics["epoch"])
        if epoch <= self.last_logged:
            return
        timestamp = int(time.time() * 1000)
        mlflow_client.log_batch(self.run_id, metrics=[
            Metric(name, float(metrics[name]), timestamp, epoch) for name in EPOCH_METRICS])
        self.last_logged = epoch
