"""The register step: the model in models/ with its test metrics -> a registry version @challenger.

Writes metrics/registered.json (the version), the output of the DVC `register` stage, so an
unchanged pipeline registers nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixer import data, export, registry, tracking
from mixer.atomic import atomic_write_text
from mixer.config import Config

REGISTERED_FILE = "registered.json"


def register_models(cfg: Config, models_dir: Path | None = None) -> registry.VersionInfo:
    """Register the export in `models_dir` (default: train.models_dir) with its test metrics.

    A folder trained while MLflow was unreachable (no run, or a run that never got its model) is
    logged first: a training run with its params, per-epoch history and the model itself.
    """
    folder = models_dir or cfg.train.models_dir
    summary = export.read_summary(folder)
    eval_file = cfg.eval.metrics_dir / "eval.json"
    if not eval_file.is_file():
        raise export.ExportError(f"{eval_file}: not found; run `mixer evaluate --weights {folder}` before "
                                 f"registering")
    metrics = json.loads(eval_file.read_text())
    run_id, model_uri = summary.get("mlflow_run_id"), summary.get("mlflow_model_uri")
    if not (run_id and model_uri and tracking.run_exists(cfg, run_id)):
        run_id, model_uri = log_untracked(cfg, folder, summary)
        if not summary.get("mlflow_run_id"):  # a new run: `mixer evaluate` had none to log test metrics to
            tracking.log_evaluation(cfg, run_id, metrics, [eval_file])
    info = registry.register(cfg, run_id, model_uri, metrics)
    write_registered(cfg, info)
    return info


def log_untracked(cfg: Config, folder: Path, summary: dict[str, Any]) -> tuple[str, str]:
    """Log an export that has no complete MLflow run yet; returns (run id, model URI)."""
    from mixer import serving

    export.load(folder)  # refuse a broken or tampered folder before anything is published
    run_id = summary.get("mlflow_run_id")
    if not (run_id and tracking.run_exists(cfg, run_id)):
        run_id = tracking.start_run_for_export(cfg, summary, folder)
    tracking.log_history(cfg, run_id, summary.get("history", []))
    example_images = data.load_split(cfg.data.out_dir, "val").images[:2]
    with tracking.active(cfg, run_id):
        model_uri = serving.log_model(folder, example_images)
    best = summary["history"][summary["best_epoch"] - 1]
    tracking.finish_training_run(cfg, run_id, {"best_val_top1": best["val_top1"], "best_val_loss": best["val_loss"],
                                               "best_epoch": summary["best_epoch"]}, folder, model_uri)
    export.annotate(folder, mlflow_run_id=run_id, mlflow_model_uri=model_uri)
    return run_id, model_uri


def write_registered(cfg: Config, info: registry.VersionInfo) -> None:
    record: dict[str, Any] = {"registered_model": cfg.mlflow.registered_model, "version": info.version,
                              "run_id": info.run_id, "data_version": info.data_version,
                              "test_top1": info.test_top1}
    cfg.eval.metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.eval.metrics_dir / REGISTERED_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
