"""Orchestrated runs: each one works in `runs/<run-id>/`, and reports its result as Markdown.

A Prefect flow run and a `dvc repro` never overwrite each other: the DVC workspace outputs
(`models/`, `metrics/`, `plots/`) belong to DVC; a flow run writes its models, metrics, plots and Ray
checkpoints under its own folder instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixer import config, registry, tracking
from mixer.config import Config

RUNS_DIR = "runs"
# The keys a run folder sets; an override of them would defeat the separation from DVC's outputs.
RUN_FOLDER_KEYS = {"train.models_dir": "models", "eval.metrics_dir": "metrics", "eval.plots_dir": "plots"}
STORAGE_KEY = "ray.storage_path"


def load_for_run(params: Path | str | None, overrides: Mapping[str, Any] | None, run_id: str) -> Config:
    """The config of one orchestrated run: params.yaml + overrides, outputs under runs/<run_id>/."""
    overrides = dict(overrides or {})
    taken = sorted(set(overrides) & set(RUN_FOLDER_KEYS))
    if taken:
        raise config.ConfigError(f"{taken[0]}: set by the flow (each run writes to {RUNS_DIR}/<flow-run-id>/), "
                                 f"not an override")
    if not run_id or any(not (c.isalnum() or c in "-_") for c in run_id):
        raise config.ConfigError(f"run id {run_id!r}: expected letters, digits, - and _ only")
    base = config.load(params, overrides)
    folder = base.root / RUNS_DIR / run_id
    paths = {key: str(folder / name) for key, name in RUN_FOLDER_KEYS.items()}
    # Checkpoints follow the run too, unless they go to shared storage a cluster can reach.
    if STORAGE_KEY not in overrides and "://" not in base.ray.storage_path:
        paths[STORAGE_KEY] = str(folder / "ray_results")
    return config.load(params, {**overrides, **paths})


def run_folder(cfg: Config) -> Path:
    """runs/<run-id>/ of a config made by `load_for_run`."""
    return cfg.train.models_dir.parent


def report_markdown(cfg: Config, metrics: Mapping[str, Any], version: registry.VersionInfo, run_id: str,
                    promotion: registry.Promotion | None) -> str:
    """The run's result for a Prefect artifact: metrics table, MLflow run and model-version links, gate."""
    name = cfg.mlflow.registered_model
    version_url = f"{tracking.ui_base(cfg)}/#/models/{name}/versions/{version.version}"
    rows = [("test top-1", f"{metrics['top1']:.2%}"), ("test top-5", f"{metrics['top5']:.2%}"),
            ("test loss", f"{metrics['loss']:.4f}"), ("test images", str(metrics.get("count", "-"))),
            ("best epoch", str(metrics.get("best_epoch", "-"))),
            ("data version", str(metrics.get("data_version") or "unversioned"))]
    lines = ["# train-mixer", "", "| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
             f"- MLflow run: [{run_id}]({tracking.run_url(cfg, run_id)})",
             f"- Model version: [{name} v{version.version}]({version_url}) "
             f"(aliases: {', '.join(version.aliases) or '-'})",
             f"- Outputs: `{run_folder(cfg)}`"]
    if promotion is None:
        lines.append("- Promotion gate: not run (promote=false)")
    else:
        lines += [f"- Promotion gate: {promotion.reason}", "", "```", promotion.table(), "```"]
    return "\n".join(lines) + "\n"
