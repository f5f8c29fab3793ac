"""MLflow runs: params, per-epoch metrics, lineage tags, artifacts, the logged model.

One `mixer train` = one run in `cfg.mlflow.experiment`. The driver side writes everything: epochs
arrive through `mixer.progress.EpochLog` from the Ray Train controller (workers never talk to MLflow), the rest
from the `mixer` commands. Artifacts live under `cfg.mlflow.artifact_root` as plain file:// paths,
so a tracking server (started without artifact proxying) and direct SQLite clients read and write
the same files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.tracking._model_registry import utils as _registry_utils
from mlflow.tracking._tracking_service import utils as _tracking_utils

from mixer.config import Config
from mixer.epochs import EPOCH_METRICS
from mixer.redaction import REDACTED, logged_config, redact, redact_all  # noqa: F401 (their home before)

MODEL_URI_TAG = "model_uri"
# Where `mixer server` (and `mixer stack up`) serve the UI over the project's SQLite store.
DEFAULT_UI = "http://127.0.0.1:5000"
RUN_NAME_TAG = "run_name"  # train.run_name: the key for resuming, in MLflow as in Ray's storage
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting a run under another
_SUPPRESS_URL_PRINT = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def client(cfg: Config) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)


def experiment_id(cfg: Config, name: str) -> str:
    """The experiment's id, creating it with the shared file:// artifact root on first use."""
    mlflow_client = client(cfg)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=(cfg.mlflow.artifact_root / name).as_uri())
    except mlflow.exceptions.MlflowException:  # another process created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def active(cfg: Config, run_id: str) -> Iterator[None]:
    """The fluent API (log_model needs it) pointed at `run_id`, without ending the run."""
    with process_tracking_uri(cfg.mlflow.tracking_uri), _no_url_print(cfg.mlflow.tracking_uri):
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` for a block.

    For the calls that ignore a client's own URI (the fluent API, a SQL registry store resolving a
    models:/ source, downloads of models:/ URIs). Afterwards everything is as it was: MLflow's own
    globals (restored as they were, unset included, rather than pinned to what they resolved to) and
    the environment variables that setting them writes, which child processes would inherit.
    """
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_uris = (_tracking_utils._tracking_uri, _registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        _tracking_utils._tracking_uri, _registry_utils._registry_uri = saved_uris
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _terminate(cfg: Config, run_id: str, status: str) -> None:
    with _no_url_print(cfg.mlflow.tracking_uri):
        client(cfg).set_terminated(run_id, status)


@contextlib.contextmanager
def _no_url_print(uri: str) -> Iterator[None]:
    """MLflow prints "View run at <tracking URI>/..." as a run ends: not when that URI has credentials."""
    if redact(uri) == uri:
        yield
        return
    saved = os.environ.get(_SUPPRESS_URL_PRINT)
    os.environ[_SUPPRESS_URL_PRINT] = "true"  # MLflow reads it at each run end
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_SUPPRESS_URL_PRINT, None)
        else:
            os.environ[_SUPPRESS_URL_PRINT] = saved


def start_training_run(cfg: Config, data_version: str | None, device: str, parent_run_id: str | None = None) -> str:
    """A new run with the resolved params, lineage tags and the resolved params.yaml; returns its id.

    With `train.run_name`, an unfinished run of that name is continued instead (same params only).
    A sweep's trials pass the sweep's run as `parent_run_id` (MLflow shows them nested under it).
    """
    mlflow_client = client(cfg)
    experiment = experiment_id(cfg, cfg.mlflow.experiment)
    logged = logged_config(cfg)
    params = {key: str(value)[:6000] for key, value in flatten(logged).items()}
    if cfg.train.run_name:
        resumed = _resume(mlflow_client, experiment, cfg.train.run_name, params)
        if resumed:
            return resumed
    commit, dirty = git_state(cfg.root)
    tags = {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower(),
            "data_version": data_version or "unversioned", "ray_num_workers": str(cfg.ray.num_workers),
            "device": device, "preset": cfg.model.preset}
    if cfg.train.run_name:
        tags[RUN_NAME_TAG] = cfg.train.run_name
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment, tags=tags, run_name=cfg.train.run_name)
    run_id = run.info.run_id
    _log_params(mlflow_client, run_id, params)
    mlflow_client.log_text(run_id, yaml.safe_dump(logged, sort_keys=False), "params.yaml")
    return run_id


def _log_params(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start:start + 100]])


def _resume(mlflow_client: MlflowClient, experiment: str, name: str, params: Mapping[str, str]) -> str | None:
    """The id of the unfinished run called `name`, set running again; None when there is none."""
    runs = mlflow_client.search_runs([experiment], filter_string=f"tags.{RUN_NAME_TAG} = '{name}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    if run.info.status == "FINISHED":
        raise ValueError(f"train.run_name {name}: MLflow run {run.info.run_id} of that name finished already; "
                         f"choose a new name to train again")
    changed = sorted(k for k, v in params.items() if run.data.params.get(k, v) != v)
    if changed:
        first = changed[0]
        raise ValueError(f"train.run_name {name}: started with other params ({first}: "
                         f"{run.data.params[first]} -> {params[first]}); resume with the same params or pick a new name")
    mlflow_client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def finish_training_run(cfg: Config, run_id: str, summary: Mapping[str, float], models_dir: Path,
                        model_uri: str) -> None:
    mlflow_client = client(cfg)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                             for k, v in summary.items()])
    mlflow_client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    mlflow_client.log_artifact(run_id, str(models_dir / "train.json"))
    _terminate(cfg, run_id, "FINISHED")


def fail_run(cfg: Config, run_id: str) -> None:
    _terminate(cfg, run_id, "FAILED")


def start_sweep_run(cfg: Config, name: str, data_version: str | None, space: Mapping[str, Any]) -> str:
    """The parent run of a sweep: the base params, the search space and the lineage tags."""
    mlflow_client = client(cfg)
    commit, dirty = git_state(cfg.root)
    run = mlflow_client.create_run(experiment_id(cfg, cfg.mlflow.experiment), run_name=name, tags={
        "sweep": name, "git_commit": commit or "unknown", "git_dirty": str(dirty).lower(),
        "data_version": data_version or "unversioned", "preset": cfg.model.preset})
    logged = yaml.safe_dump(logged_config(cfg), sort_keys=False)
    mlflow_client.log_text(run.info.run_id, logged, "params.yaml")
    mlflow_client.log_dict(run.info.run_id, redact_all(dict(space)), "search_space.json")
    return run.info.run_id


def end_run(cfg: Config, run_id: str, status: str, metrics: Mapping[str, float] | None = None,
            tags: Mapping[str, str] | None = None) -> None:
    """Close a run (FINISHED, FAILED or KILLED) with final metrics and tags."""
    mlflow_client = client(cfg)
    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items()],
                            tags=[mlflow.entities.RunTag(k, redact(v)) for k, v in (tags or {}).items()])
    _terminate(cfg, run_id, status)


def log_evaluation(cfg: Config, run_id: str, metrics: Mapping[str, Any], files: list[Path]) -> None:
    """Test metrics (test_top1, test_top5, test_loss) and the evaluation files, on the training run."""
    mlflow_client = client(cfg)
    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(metrics[k]), stamp, 0)
                                             for k in ("top1", "top5", "loss")])
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), "evaluation")


def log_nightly_run(cfg: Config, tags: Mapping[str, str], metrics: Mapping[str, float], failed: bool) -> str:
    """One scheduled evaluation as a run in `cfg.mlflow.eval_experiment`; FAILED when the check failed.

    Tag values are redacted: a failure quotes error messages, and MLflow's quote the tracking URI.
    """
    mlflow_client = client(cfg)
    run = mlflow_client.create_run(experiment_id(cfg, cfg.mlflow.eval_experiment),
                                   tags={k: redact(v) for k, v in tags.items()},
                                   run_name=f"nightly-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
    _terminate(cfg, run.info.run_id, "FAILED" if failed else "FINISHED")
    return run.info.run_id


def last_nightly(cfg: Config, status_tag: str, status: str) -> Run | None:
    """The most recent run of the eval experiment whose `status_tag` is `status`; None when there is none."""
    mlflow_client = client(cfg)
    experiment = mlflow_client.get_experiment_by_name(cfg.mlflow.eval_experiment)
    if experiment is None:
        return None
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"tags.{status_tag} = '{status}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def run_url(cfg: Config, run_id: str) -> str:
    """The run's page in the MLflow UI (the tracking server, or `mixer server` over a SQLite store)."""
    run = client(cfg).get_run(run_id)
    return f"{ui_base(cfg)}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def ui_base(cfg: Config) -> str:
    """The UI's address without the credentials a tracking URI may carry (links end up in reports)."""
    uri = cfg.mlflow.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return DEFAULT_UI
    parts = urllib.parse.urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl().rstrip("/")


def git_state(root: Path) -> tuple[str | None, bool]:
    """(commit, whether tracked files differ from it); (None, False) outside a git repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.005}} -> {"train.lr": 0.005}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- when the tracking store is away ------------------------------------------------------------


class TrackingUnavailable(ValueError):
    """MLflow could not be used; the message says where the model is and how to register it later."""


def reachable(cfg: Config) -> bool:
    """Whether a tracking server answers its health check (a database store is always 'reachable')."""
    from mixer.stack import answers_ok

    uri = cfg.mlflow.tracking_uri
    return not uri.startswith(("http://", "https://")) or answers_ok(uri.rstrip("/") + "/health")


def start_training_run_if_reachable(cfg: Config, data_version: str | None, device: str) -> str | None:
    """start_training_run, or None (with a warning) when the tracking server does not answer.

    Training goes ahead untracked: hours of compute are not thrown away because a server is down.
    """
    if reachable(cfg):
        return start_training_run(cfg, data_version, device)
    print(f"warning: MLflow at {redact(cfg.mlflow.tracking_uri)} is unreachable; training without tracking "
          f"(the best epoch is kept in {cfg.train.models_dir} for `mixer register --from`)", flush=True)
    return None


def register_later(cfg: Config, models_dir: Path, what: str) -> str:
    """The one-line error of a run whose model could not reach MLflow."""
    return (f"MLflow at {redact(cfg.mlflow.tracking_uri)} {what}: the best epoch is saved in {models_dir}; when "
            f"MLflow is back, run `mixer evaluate --weights {models_dir}` and `mixer register --from {models_dir}`")


def end_run_quietly(cfg: Config, run_id: str, status: str) -> None:
    """Close a run on the way out of a failure; a tracking error must not hide the failure itself."""
    try:
        _terminate(cfg, run_id, status)
    except Exception as err:
        print(f"warning: could not mark MLflow run {run_id} {status} ({type(err).__name__})", flush=True)


def log_history(cfg: Config, run_id: str, history: list[Mapping[str, Any]]) -> None:
    """Log the epochs of `history` that the run does not have yet (the same points EpochLog writes)."""
    mlflow_client = client(cfg)
    logged = {m.step for m in mlflow_client.get_metric_history(run_id, "val_loss")}
    timestamp = int(time.time() * 1000)
    metrics = [Metric(name, float(row[name]), timestamp, int(row["epoch"]))
               for row in history if int(row["epoch"]) not in logged for name in EPOCH_METRICS]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 1000])


def run_exists(cfg: Config, run_id: str) -> bool:
    try:
        client(cfg).get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def start_run_for_export(cfg: Config, summary: Mapping[str, Any], folder: Path) -> str:
    """A training run for a model trained while MLflow was away: the params and lineage it recorded."""
    mlflow_client = client(cfg)
    params = {key: str(value)[:6000] for key, value in flatten(summary.get("params") or {}).items()}
    commit, dirty = git_state(cfg.root)
    tags = {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower(),
            "data_version": summary.get("data_version") or "unversioned",
            "ray_num_workers": str(summary.get("num_workers", "")), "device": str(summary.get("device", "")),
            "preset": str(summary.get("model_config", {}).get("preset", "")),
            "logged_from": redact(str(folder))}  # trained untracked, logged by `mixer register --from`
    if summary.get("run_name"):
        tags[RUN_NAME_TAG] = summary["run_name"]
    run = mlflow_client.create_run(experiment_id(cfg, cfg.mlflow.experiment), tags=tags,
                                   run_name=summary.get("run_name"))
    _log_params(mlflow_client, run.info.run_id, params)
    if summary.get("params"):
        mlflow_client.log_text(run.info.run_id, yaml.safe_dump(summary["params"], sort_keys=False), "params.yaml")
    return run.info.run_id
