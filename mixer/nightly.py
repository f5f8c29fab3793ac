"""The nightly check: the champion, loaded the way serving loads it, on the DVC-versioned test split.

Each check is one MLflow run in `cfg.mlflow.eval_experiment` (tags: model version, data versions,
status) and leaves its result as tags on the model version. It fails, with one line saying why, when
- there is no champion,
- the champion no longer loads (artifact deleted or corrupted, loader broken),
- the data changed since the champion was registered (its registered top-1 is then not comparable),
- its top-1 fell more than `eval.max_drop` below the top-1 recorded at registration (same artifact,
  other outputs: a dependency upgrade, a changed preprocessing, modified weights),
- the champion alias moved to a version whose top-1 is more than `eval.max_drop` below the last
  champion that passed (a forced promotion or a rollback to a worse model).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from mixer import data, registry, reports, serving, tracking, versioning
from mixer.config import Config

STATUS_TAG = "nightly_status"  # on the eval run: passed / failed
PASSED, FAILED = "passed", "failed"


class NightlyCheckFailed(ValueError):
    """The champion failed its check; the message is one line saying why and what to do."""


@dataclass
class NightlyResult:
    version: int
    top1: float  # fractions of the test split
    top5: float
    loss: float
    registered_top1: float | None
    data_version: str | None  # of the workspace data evaluated
    registered_data_version: str | None
    run_id: str  # the MLflow run in the eval experiment
    failure: str | None = None  # None when the check passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_champion(cfg: Config) -> NightlyResult:
    """Evaluate the champion and record the result; raises NightlyCheckFailed after recording a failure."""
    name = cfg.mlflow.registered_model
    data_version = versioning.check_data_matches_lock(cfg.root, cfg.data.out_dir)
    try:
        champion = registry.version_info(cfg, registry.CHAMPION)
    except registry.RegistryError as err:
        failure = f"no {registry.CHAMPION} to check: {err}"
        _record_failure_without_metrics(cfg, failure, data_version)
        raise NightlyCheckFailed(failure) from None
    try:
        model = serving.load(registry.load_uri(cfg, registry.CHAMPION), cfg.mlflow.tracking_uri)
    except Exception as err:  # whatever broke the load (missing file, foreign bytes, loader error)
        failure = (f"{name} version {champion.version} ({registry.CHAMPION}) no longer loads "
                   f"({type(err).__name__}: {tracking.redact(' '.join(str(err).split()))}); roll back (`mixer rollback`) "
                   f"or promote another version")
        _record_failure_without_metrics(cfg, failure, data_version, champion.version)
        raise NightlyCheckFailed(failure) from None

    test = data.load_split(cfg.data.out_dir, "test")
    exported = model.exported
    # The same function and settings as the evaluation at registration, so the numbers are comparable.
    result = reports.score_test_split(cfg, exported, test)
    failure = _failure(cfg, champion, result.top1, data_version)
    tags = {"model_name": name, "model_version": str(champion.version), "data_version": data_version or "unversioned",
            "registered_data_version": champion.data_version or "unknown", STATUS_TAG: FAILED if failure else PASSED}
    if failure:
        tags["failure"] = failure[:5000]
    metrics = {"test_top1": result.top1, "test_top5": result.top5, "test_loss": result.loss}
    if champion.test_top1 is not None:
        metrics["registered_top1"] = champion.test_top1
        metrics["top1_drop"] = champion.test_top1 - result.top1
    run_id = tracking.log_nightly_run(cfg, tags, metrics, failed=failure is not None)
    registry.set_version_tags(cfg, champion.version, {
        "nightly_top1": repr(result.top1), "nightly_status": FAILED if failure else PASSED,
        "nightly_run_id": run_id, "nightly_data_version": data_version or "unversioned",
        "nightly_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if failure:
        raise NightlyCheckFailed(failure)
    return NightlyResult(champion.version, result.top1, result.top5, result.loss, champion.test_top1,
                         data_version, champion.data_version, run_id)


def _failure(cfg: Config, champion: registry.VersionInfo, top1: float, data_version: str | None) -> str | None:
    """Why the champion fails, or None; the most basic reason first (a changed data version makes
    the registered top-1 meaningless, so no drop is computed against it)."""
    name, v, max_drop = cfg.mlflow.registered_model, champion.version, cfg.eval.max_drop
    if champion.data_version is not None and data_version != champion.data_version:
        return (f"data version changed since registration: {name} version {v} was tested on "
                f"{_short(champion.data_version)}, the workspace data (dvc.lock) is {_short(data_version)}; "
                f"its registered top-1 is not comparable: retrain and promote on the new data, or "
                f"`git checkout` the old dvc.lock and `dvc checkout`")
    if champion.test_top1 is None:
        return f"{name} version {v} has no test_top1 recorded at registration; register it with `mixer register`"
    drop = champion.test_top1 - top1
    if drop > max_drop:
        return (f"{name} version {v} test top-1 {top1:.2%} is {drop:.2%} below the {champion.test_top1:.2%} "
                f"recorded at registration (eval.max_drop {max_drop:.2%}) on the same data: the same artifact "
                f"now gives other outputs (a dependency upgrade or changed weights)")
    last = tracking.last_nightly(cfg, STATUS_TAG, PASSED)
    if last is not None and last.data.tags.get("model_version") != str(v):
        previous, previous_top1 = last.data.tags.get("model_version"), last.data.metrics.get("test_top1")
        if previous_top1 is not None and previous_top1 - top1 > max_drop:
            return (f"{registry.CHAMPION} moved from version {previous} (top-1 {previous_top1:.2%} at its last "
                    f"passing check) to version {v} (top-1 {top1:.2%}), {previous_top1 - top1:.2%} worse "
                    f"(eval.max_drop {max_drop:.2%}); `mixer promote --version {previous} --force` to go back")
    return None


def _record_failure_without_metrics(cfg: Config, failure: str, data_version: str | None,
                                    version: int | None = None) -> None:
    tags = {"model_name": cfg.mlflow.registered_model, "data_version": data_version or "unversioned",
            STATUS_TAG: FAILED, "failure": failure[:5000]}
    if version is not None:
        tags["model_version"] = str(version)
    tracking.log_nightly_run(cfg, tags, {}, failed=True)
    if version is not None:
        registry.set_version_tags(cfg, version, {"nightly_status": FAILED,
                                                 "nightly_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _short(data_version: str | None) -> str:
    return "none" if data_version is None else data_version[:12]
