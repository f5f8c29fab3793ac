"""Flow `train-mixer`: ingest (subflow) -> Ray Train -> test evaluation -> registration -> promotion gate.

Each flow run writes to `runs/<flow-run-id>/`, never to the DVC workspace outputs. Prefect retries
I/O only: training is not retried here, Ray Train restarts failed workers (ray.max_failures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect import flow, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mixer import config, publish, registry, reports, runs, training
from mixer.config import Config
from mixer.training import FitResult

from flows.ingest import ingest_cifar100

REPORT_KEY = "train-mixer-report"


@task(name="fit-on-ray", retries=0, cache_policy=NO_CACHE)
def fit(cfg: Config) -> FitResult:
    return training.fit(cfg)


@task(name="evaluate-on-test", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def evaluate(cfg: Config, models_dir: Path) -> dict[str, Any]:
    return reports.evaluate_models(cfg, models_dir)


# Registration is idempotent (a registered run keeps its version), so a retry after a lost
# connection to the tracking server does not register twice.
@task(name="register-challenger", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def register(cfg: Config, models_dir: Path) -> registry.VersionInfo:
    return publish.register_models(cfg, models_dir)


@task(name="promotion-gate", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def promote_if_better(cfg: Config, version: int) -> registry.Promotion:
    return registry.promote(cfg, version=version)


@flow(name="train-mixer", log_prints=True)
def train_mixer(overrides: dict[str, Any] | None = None, promote: bool = True,
                params: str = config.PARAMS_FILE) -> dict[str, Any]:
    """Train, evaluate and register a model with `overrides` (e.g. {"train.epochs": 5}); gate it if `promote`."""
    run_id = runtime.flow_run.id or uuid4().hex  # no id only when called outside a flow run
    cfg = runs.load_for_run(Path(params), overrides, str(run_id))
    data_version = ingest_cifar100(overrides=overrides, params=params)
    result = fit(cfg)
    metrics = evaluate(cfg, result.models_dir)
    version = register(cfg, result.models_dir)
    promotion = promote_if_better(cfg, version.version) if promote else None
    if promotion is not None:
        print(promotion.reason)
    create_markdown_artifact(runs.report_markdown(cfg, metrics, version, result.run_id, promotion),
                             key=REPORT_KEY, description=f"{cfg.mlflow.registered_model} v{version.version}")
    return {"version": version.version, "mlflow_run_id": result.run_id, "data_version": data_version,
            "test_top1": metrics["top1"], "promoted": bool(promotion and promotion.changed),
            "run_folder": str(runs.run_folder(cfg))}
