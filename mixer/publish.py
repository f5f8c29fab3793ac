"""The register step: the model in models/ with its test metrics -> a registry version @challenger.

Writes metrics/registered.json (the version), the output of the DVC `register` stage, so an
unchanged pipeline registers nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixer import export, registry
from mixer.atomic import atomic_write_text
from mixer.config import Config

REGISTERED_FILE = "registered.json"


def register_models(cfg: Config, models_dir: Path | None = None) -> registry.VersionInfo:
    folder = models_dir or cfg.train.models_dir
    summary = export.read_summary(folder)
    run_id, model_uri = summary.get("mlflow_run_id"), summary.get("mlflow_model_uri")
    if not run_id or not model_uri:
        raise export.ExportError(f"{folder}: no MLflow run recorded; train it with `mixer train` first")
    eval_file = cfg.eval.metrics_dir / "eval.json"
    if not eval_file.is_file():
        raise export.ExportError(f"{eval_file}: not found; run `mixer evaluate` before registering")
    info = registry.register(cfg, run_id, model_uri, json.loads(eval_file.read_text()))
    write_registered(cfg, info)
    return info


def write_registered(cfg: Config, info: registry.VersionInfo) -> None:
    record: dict[str, Any] = {"registered_model": cfg.mlflow.registered_model, "version": info.version,
                              "run_id": info.run_id, "data_version": info.data_version,
                              "test_top1": info.test_top1}
    cfg.eval.metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.eval.metrics_dir / REGISTERED_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
