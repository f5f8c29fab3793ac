"""Flow `ingest-cifar100`: fetch the archive (retried on network errors), then the DVC `ingest` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from mixer import config, data, versioning
from mixer.config import Config

FETCH_RETRIES = 3
FETCH_RETRY_DELAYS_S = [10, 30, 60]  # a flaky mirror or proxy usually recovers within a minute


def _network_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only a failed download: a wrong md5 or URL fails the same way every time."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, data.DownloadError)


@task(name="fetch-archive", retries=FETCH_RETRIES, retry_delay_seconds=FETCH_RETRY_DELAYS_S,
      retry_condition_fn=_network_error, cache_policy=NO_CACHE)
def fetch_archive(cfg: Config) -> str:
    """The md5-verified archive, downloaded once into data.download_dir (the stage then reuses it)."""
    return str(data.fetch(cfg.data))


# No Prefect retries: DVC waits for its repository lock itself (see versioning), and a failing stage
# command fails the same way again.
@task(name="dvc-repro-ingest", cache_policy=NO_CACHE)
def reproduce_ingest(cfg: Config) -> str:
    return versioning.reproduce_ingest(cfg)


@flow(name="ingest-cifar100", log_prints=True)
def ingest_cifar100(overrides: dict[str, Any] | None = None, params: str = config.PARAMS_FILE) -> str:
    """Fetch CIFAR-100 and reproduce the DVC `ingest` stage; returns the data version (DVC hash)."""
    cfg = config.load(Path(params), overrides)
    fetch_archive(cfg)
    version = reproduce_ingest(cfg)
    print(f"data version {version} in {cfg.data.out_dir}")
    return version
