"""Flow `evaluate-mixer` (deployment `evaluate-mixer/nightly`): the champion on the test split -> MLflow.

Ends Failed, with the check's one-line reason, when the champion is missing, no longer loads, was
registered on other data or lost accuracy; a failure is also sent to the Prefect notification block
named by `eval.notify_block`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.flows import Flow
from prefect.logging.loggers import flow_run_logger
from prefect.states import State

from mixer import config, nightly, versioning
from mixer.config import Config

from flows.notify import load_notification_block

REPORT_KEY = "evaluate-mixer-report"


@task(name="dvc-checkout-data", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def checkout_data(cfg: Config) -> str:
    return versioning.checkout_data(cfg)


# No retries: a failed check fails the same way again, and each attempt records an MLflow run.
@task(name="check-champion", cache_policy=NO_CACHE)
def check_champion(cfg: Config) -> nightly.NightlyResult:
    return nightly.check_champion(cfg)


def notify_failure(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_failure hook: tell the configured notification block why the check failed."""
    parameters = flow_run.parameters or {}
    cfg = config.load(Path(parameters.get("params") or config.PARAMS_FILE), parameters.get("overrides"))
    if cfg.eval.notify_block is None:
        return
    load_notification_block(cfg.eval.notify_block).notify(
        body=f"{flow_run.name}: {state.message}", subject=f"{flow.name} failed: {cfg.mlflow.registered_model}")
    flow_run_logger(flow_run, flow).info("sent the failure to notification block %s", cfg.eval.notify_block)


@flow(name="evaluate-mixer", on_failure=[notify_failure])
def evaluate_mixer(overrides: dict[str, Any] | None = None, params: str = config.PARAMS_FILE) -> dict[str, Any]:
    """Check `models:/cifar100-mixer@champion` on the test split of the data version in dvc.lock."""
    cfg = config.load(Path(params), overrides)
    checkout_data(cfg)
    result = check_champion(cfg)
    create_markdown_artifact(
        "# evaluate-mixer\n\n| champion | test top-1 | registered top-1 | data version |\n| --- | --- | --- | --- |\n"
        f"| v{result.version} | {result.top1:.2%} | "
        f"{'-' if result.registered_top1 is None else f'{result.registered_top1:.2%}'} | {result.data_version} |\n",
        key=REPORT_KEY)
    return result.to_dict()
