"""The MLflow model registry: versions of the trained model, the aliases that name them, the gate.

Aliases, not the deprecated stages: `challenger` is the most recently registered candidate,
`champion` is what the nightly evaluation and serving load (`models:/<name>@champion`), and
`previous-champion` is where `rollback` goes back to. A version's tags carry its lineage (run id,
git commit, data version) and its test metrics, so the promotion gate needs no other store.

MLflow has no compare-and-set on aliases, so every read-check-write of them (register, promote,
rollback) holds an exclusive `fcntl.flock` on a lock file named after the tracking URI and the
registered model (see `lock_path`). That serializes the processes of one machine, which is how this
project runs (CLI, DVC stages, the Prefect worker, all under one user). Several machines promoting
through one shared tracking server would need a distributed lock (a row lock in the server's
database, for instance) in place of this one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mixer.config import Config
from mixer.tracking import MODEL_URI_TAG, flatten, logged_config, process_tracking_uri, redact

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)

# Run tags written by tracking.py; version tags copy the lineage ones.
LINEAGE_TAGS = ("git_commit", "git_dirty", "data_version")
# What tracking.py writes when it has no value: read back as "unknown", never compared as a version.
UNKNOWN_TAG_VALUES = ("", "unknown", "unversioned")
TEST_METRICS = ("test_top1", "test_top5", "test_loss")
SELECTION_METRIC = "best_val_top1"  # register_best ranks runs by validation, never by test accuracy

LOCK_TIMEOUT_S = 120.0  # a holder is one process doing a few HTTP calls; minutes means it is stuck
_LOCK_POLL_S = 0.05


class RegistryError(ValueError):
    """An expected failure (no such version, nothing to roll back, ...): one line saying what to do."""


@dataclass
class VersionInfo:
    version: int
    run_id: str | None
    data_version: str | None
    test_top1: float | None  # fraction of the test split, 0..1
    aliases: list[str]
    created: bool = False  # True only for the version that `register` has just made


@dataclass
class Promotion:
    changed: bool
    reason: str  # one line
    before: dict[str, VersionInfo | None]  # alias -> the version it named before the call
    after: dict[str, VersionInfo | None]

    def table(self) -> str:
        """The aliases before and after, one row each, ready to print."""
        rows = [("alias", "before", "after", "")]
        for alias in ALIASES:
            old, new = self.before.get(alias), self.after.get(alias)
            moved = (old and old.version) != (new and new.version)
            rows.append((alias, _cell(old), _cell(new), "<- changed" if moved else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]).rstrip()
                         for row in rows)


def register(cfg: Config, run_id: str, model_uri: str, metrics: Mapping[str, Any]) -> VersionInfo:
    """Make the model logged by `run_id` a version of `cfg.mlflow.registered_model`, aliased `challenger`.

    `metrics` are its test metrics, keyed as in metrics/eval.json (`top1`, `top5`, `loss`, and
    `data_version`, the data they were computed on) or as the run logs them (`test_top1`, ...).
    Idempotent: a run registered before keeps its version (missing tags are filled in, none is
    overwritten) and gets the `challenger` alias again.
    """
    client, name = _client(cfg), cfg.mlflow.registered_model
    run = _run(client, run_id)
    logged = run.data.tags.get(MODEL_URI_TAG)
    if logged and logged != model_uri:
        raise RegistryError(f"run {run_id} logged the model {logged}, not {model_uri}: "
                            f"the models folder is stale; train again or register the run's own model")
    tags = _version_tags(run, metrics)
    with _locked(cfg):
        _ensure_registered_model(client, name)
        existing = _version_of_run(client, name, run_id)
        if existing is None:
            # A models:/<model_id> source must come with its model id (the server checks the pair),
            # which also links the logged model to this version in the UI.
            # A SQL registry store resolves the models:/ source through the process-wide tracking
            # URI, not this client's: point it at our store for the call (else a SQLite store other
            # than the default ./mlflow.db reports the logged model as not found).
            with process_tracking_uri(cfg.mlflow.tracking_uri):
                mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                                 model_id=_model_id(model_uri))
        else:
            mv = existing
            for key, value in tags.items():
                if key not in mv.tags:
                    client.set_model_version_tag(name, mv.version, key, value)
            mv = client.get_model_version(name, mv.version)
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
        aliases = _aliases(client, name)
    return _info(mv, aliases, created=existing is None)


def register_best(cfg: Config, data_version: str | None) -> VersionInfo | None:
    """Register the FINISHED run of `cfg.mlflow.experiment` with the highest best_val_top1 on `data_version`.

    Only runs that logged a model (a `model_uri` tag) count; `data_version=None` means runs whose
    data was not versioned. Returns None when no run qualifies; a run registered before keeps its
    version.
    """
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    query = "attributes.status = 'FINISHED'"
    if data_version is not None:
        query += f" and tags.data_version = '{data_version}'"
    candidates = [run for run in _search_runs(client, experiment.experiment_id, query)
                  if _known(run.data.tags.get("data_version")) == data_version
                  and run.data.tags.get(MODEL_URI_TAG) and SELECTION_METRIC in run.data.metrics]
    if not candidates:
        return None
    # Ties go to the most recent run.
    best = max(candidates, key=lambda run: (run.data.metrics[SELECTION_METRIC], run.info.start_time or 0))
    metrics = {key: best.data.metrics[key] for key in TEST_METRICS if key in best.data.metrics}
    return register(cfg, best.info.run_id, best.data.tags[MODEL_URI_TAG], metrics)


def promote(cfg: Config, version: int | None = None, force: bool = False) -> Promotion:
    """Move `champion` to `version` (default: the challenger) if the gate allows it.

    The gate: a strictly higher test_top1 than the champion's, measured on the same data version.
    The first champion needs no comparison; `force` skips the gate. The replaced champion becomes
    `previous-champion`. A refusal changes nothing and says why in `reason`.
    """
    client, name = _client(cfg), cfg.mlflow.registered_model
    with _locked(cfg):
        aliases = _aliases(client, name)
        versions = _Versions(client, name)
        before = _snapshot(versions, aliases)
        target = version if version is not None else aliases.get(CHALLENGER)
        if target is None:
            raise RegistryError(f"model {name} has no {CHALLENGER}: register a model first "
                                f"(`mixer register`) or name the version to promote")
        candidate = versions.info(target, aliases)
        current = aliases.get(CHAMPION)
        if current == target:
            return Promotion(False, f"version {target} is already the {CHAMPION}", before, before)
        champion = versions.info(current, aliases) if current is not None else None
        refusal = _refusal(candidate, champion) if champion is not None else None
        if refusal and not force:
            return Promotion(False, f"{refusal}; use --force to promote anyway", before, before)
        # previous-champion first: a crash between the two writes leaves both aliases on the old
        # champion, which loses nothing; the other order could drop it from every alias.
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(current))
        client.set_registered_model_alias(name, CHAMPION, str(target))
        after = _snapshot(versions, {**aliases, CHAMPION: target,
                                     **({PREVIOUS: current} if current is not None else {})})
    if champion is None:
        reason = f"version {target} is the first {CHAMPION} (nothing to compare with)"
    elif refusal:
        reason = f"version {target} promoted with --force over version {current} (the gate said: {refusal})"
    else:
        reason = (f"version {target} test top-1 {_pct(candidate.test_top1)} beats {CHAMPION} version "
                  f"{current}'s {_pct(champion.test_top1)} on data version {_short(candidate.data_version)}")
    return Promotion(True, reason, before, after)


def rollback(cfg: Config) -> Promotion:
    """`champion` goes back to `previous-champion`, which in turn names the version rolled back from.

    So a second rollback undoes the first.
    """
    client, name = _client(cfg), cfg.mlflow.registered_model
    with _locked(cfg):
        aliases = _aliases(client, name)
        previous = aliases.get(PREVIOUS)
        if previous is None:
            raise RegistryError(f"model {name} has no {PREVIOUS}: nothing to roll back to (it needs an "
                                f"earlier promotion; to pick any version, promote it by number with --force)")
        versions = _Versions(client, name)
        before = _snapshot(versions, aliases)
        current = aliases.get(CHAMPION)
        if current == previous:
            reason = f"{CHAMPION} and {PREVIOUS} are both version {current}: nothing to roll back"
            return Promotion(False, reason, before, before)
        # champion first: a rollback is there to take the bad model out of service now.
        client.set_registered_model_alias(name, CHAMPION, str(previous))
        after_aliases = {**aliases, CHAMPION: previous}
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(current))
            after_aliases[PREVIOUS] = current
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
            del after_aliases[PREVIOUS]
        after = _snapshot(versions, after_aliases)
    undo = f"version {current} is {PREVIOUS} (roll back again to undo)" if current is not None else \
        f"no {PREVIOUS} now"
    return Promotion(True, f"rolled back: version {previous} is {CHAMPION} again, {undo}", before, after)


def lineage(cfg: Config, reference: str, workspace: Config | None = None) -> str:
    """Where a version came from (run, commit, data, metrics, params) and how to train it again.

    `reference` is a version number or an alias. With `workspace`, the params that differ from it
    are listed as `key: registered -> workspace`.
    """
    client, name = _client(cfg), cfg.mlflow.registered_model
    aliases = _aliases(client, name)
    number = _resolve(reference, aliases, name)
    mv = _Versions(client, name).get(number)
    run_id = mv.tags.get("run_id") or mv.run_id
    if not run_id:
        raise RegistryError(f"{name} version {number} has no run id: it was not registered by "
                            f"`mixer register`, so its lineage is unknown")
    run = _run(client, run_id)
    # Redacted again: runs logged before tracking.py redacted credentials may still hold them.
    tags, metrics = run.data.tags, run.data.metrics
    params = {key: redact(value) for key, value in run.data.params.items()}
    commit = _known(tags.get("git_commit")) or _known(mv.tags.get("git_commit"))
    dirty = (tags.get("git_dirty") or mv.tags.get("git_dirty")) == "true"
    data_version = _known(tags.get("data_version")) or _known(mv.tags.get("data_version"))
    held = _held(aliases, number)

    def metric(key: str, pct: bool = True) -> str:
        value = metrics.get(key, _float(mv.tags.get(key)))
        return "-" if value is None else (_pct(value) if pct else f"{value:.4f}")

    best_epoch = metrics.get("best_epoch")
    lines = [
        f"{name} version {number}" + (f" ({', '.join(held)})" if held else ""),
        f"  run          {run_id} ({run.info.run_name or '-'}, {run.info.status.lower()})",
        f"  model        {mv.source}",
        f"  git commit   {commit or 'unknown'}"
        + (" (dirty: the run had uncommitted changes)" if dirty else ""),
        f"  data version {data_version or 'unknown'}",
        f"  test         top-1 {metric('test_top1')}  top-5 {metric('test_top5')}  "
        f"loss {metric('test_loss', False)}",
        f"  validation   best top-1 {metric('best_val_top1')}  best loss {metric('best_val_loss', False)}"
        + (f"  (epoch {int(best_epoch)})" if best_epoch is not None else ""),
        f"params ({len(params)}):",
        *[f"  {key} = {params[key]}" for key in sorted(params)],
    ]
    if workspace is not None:
        # As the run's params were logged (credentials redacted), so only real differences show.
        current = {key: str(value) for key, value in flatten(logged_config(workspace)).items()}
        changed = sorted(key for key in set(params) | set(current) if params.get(key) != current.get(key))
        lines.append(f"differences from the workspace ({len(changed)}; registered -> workspace):")
        lines += [f"  {key}: {params.get(key, '(absent)')} -> {current.get(key, '(absent)')}"
                  for key in changed]
        if not changed:
            lines.append("  (none)")
    # Every param that says what is trained, so the command is exact whatever params.yaml holds at
    # that commit; locations (paths, URIs, mlflow names) belong to the machine, not the model.
    overrides = [f"{key}={shlex.quote(value)}" for key, value in sorted(params.items())
                 if not _is_location(key, value)]
    lines += [
        "reproduce:",
        f"  git checkout {commit or '<commit unknown>'}"
        + ("   # the run's tree was dirty: this is only its base commit" if dirty else ""),
        f"  dvc pull ingest   # data version {data_version or 'unknown'} from the DVC remote",
        "                    # (or rebuild it: dvc repro ingest)",
        "  mixer train " + " \\\n      ".join(overrides),
    ]
    return "\n".join(lines)


def load_uri(cfg: Config, reference: str) -> str:
    """`models:/<name>@<alias>` or `models:/<name>/<N>` for a version number or alias that exists."""
    client, name = _client(cfg), cfg.mlflow.registered_model
    aliases = _aliases(client, name)
    ref = reference.strip().removeprefix("@")
    number = _resolve(ref, aliases, name)
    if ref in aliases:
        return f"models:/{name}@{ref}"
    _Versions(client, name).get(number)  # fails with a RegistryError if the version does not exist
    return f"models:/{name}/{number}"


def version_info(cfg: Config, reference: str) -> VersionInfo:
    """The version a number or alias names, with what was recorded at registration (data, test top-1)."""
    client, name = _client(cfg), cfg.mlflow.registered_model
    aliases = _aliases(client, name)
    return _Versions(client, name).info(_resolve(reference, aliases, name), aliases)


def set_version_tags(cfg: Config, version: int, tags: Mapping[str, str]) -> None:
    """Set (overwrite) tags on a model version, e.g. the latest nightly result."""
    client, name = _client(cfg), cfg.mlflow.registered_model
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, redact(value))


def lock_path(cfg: Config) -> Path:
    """The lock file shared by every process on this machine that changes this model's aliases.

    Named after the tracking URI and the model, in the temporary folder rather than a project
    folder, so two checkouts talking to one server still take the same lock.
    """
    key = f"{cfg.mlflow.tracking_uri.rstrip('/')}\n{cfg.mlflow.registered_model}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mixer-registry-{digest}.lock"


@contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    path = lock_path(cfg)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"another process has held the registry lock {path} for over "
                                        f"{LOCK_TIMEOUT_S:.0f} s; find it (`fuser {path}`) and retry"
                                        ) from None
                time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (so does the process dying)


def _client(cfg: Config) -> MlflowClient:
    # Explicit URIs on a client of our own: never mlflow.set_tracking_uri (global state).
    return MlflowClient(tracking_uri=cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)


class _Versions:
    """Model versions of one registered model, each fetched once per call."""

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client, self.name = client, name
        self._cache: dict[int, ModelVersion] = {}

    def get(self, number: int) -> ModelVersion:
        if number not in self._cache:
            try:
                self._cache[number] = self.client.get_model_version(self.name, str(number))
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise RegistryError(f"model {self.name} has no version {number}; its versions are "
                                    f"listed on the model's page in the MLflow UI") from None
        return self._cache[number]

    def info(self, number: int, aliases: Mapping[str, int]) -> VersionInfo:
        return _info(self.get(number), aliases)


def _snapshot(versions: _Versions, aliases: Mapping[str, int]) -> dict[str, VersionInfo | None]:
    return {alias: versions.info(aliases[alias], aliases) if alias in aliases else None for alias in ALIASES}


def _info(mv: ModelVersion, aliases: Mapping[str, int], created: bool = False) -> VersionInfo:
    number = int(mv.version)
    tags = mv.tags or {}
    return VersionInfo(version=number, run_id=tags.get("run_id") or mv.run_id,
                       data_version=_known(tags.get("data_version")), test_top1=_float(tags.get("test_top1")),
                       aliases=_held(aliases, number), created=created)


def _held(aliases: Mapping[str, int], number: int) -> list[str]:
    """The aliases naming version `number`: the project's three in their order, then any others."""
    held = [alias for alias in ALIASES if aliases.get(alias) == number]
    return held + sorted(alias for alias, v in aliases.items() if v == number and alias not in ALIASES)


def _refusal(candidate: VersionInfo, champion: VersionInfo) -> str | None:
    """Why the gate keeps `champion`, or None when `candidate` may replace it."""
    c, k = candidate.version, champion.version
    if candidate.data_version is None or champion.data_version is None:
        missing = c if candidate.data_version is None else k
        return (f"version {missing} has no data_version tag, so the test accuracies of version {c} "
                f"and {CHAMPION} version {k} cannot be compared")
    if candidate.data_version != champion.data_version:
        return (f"version {c} was tested on data version {_short(candidate.data_version)} but {CHAMPION} "
                f"version {k} on {_short(champion.data_version)}: their test accuracies are not comparable")
    if candidate.test_top1 is None:
        return f"version {c} has no test_top1 tag (evaluate its run and register it again)"
    if champion.test_top1 is None:
        return f"{CHAMPION} version {k} has no test_top1 tag to compare with"
    if candidate.test_top1 <= champion.test_top1:
        return (f"version {c} test top-1 {_pct(candidate.test_top1)} is not above {CHAMPION} version {k}'s "
                f"{_pct(champion.test_top1)} on data version {_short(candidate.data_version)}")
    return None


def _version_tags(run: Run, metrics: Mapping[str, Any]) -> dict[str, str]:
    tags: dict[str, Any] = {"run_id": run.info.run_id}
    tags.update({key: run.data.tags[key] for key in LINEAGE_TAGS if _known(run.data.tags.get(key))})
    evaluated_on = _known(metrics.get("data_version"))
    if evaluated_on and tags.get("data_version") and evaluated_on != tags["data_version"]:
        raise RegistryError(f"run {run.info.run_id} was trained on data version {tags['data_version']} "
                            f"but its metrics come from {evaluated_on}: evaluate it on the data it was "
                            f"trained on")
    if evaluated_on and "data_version" not in tags:
        tags["data_version"] = evaluated_on
    for key in TEST_METRICS:
        value = metrics.get(key, metrics.get(key.removeprefix("test_")))
        if value is not None:
            tags[key] = repr(float(value))
    return {key: str(value) for key, value in tags.items()}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="MLP-Mixer on CIFAR-100 (mixer register)")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"no registered model {name} at {redact(client.tracking_uri)}: "
                            f"register one first (`mixer register`)") from None
    return {alias: int(version) for alias, version in model.aliases.items()}


def _resolve(reference: str, aliases: Mapping[str, int], name: str) -> int:
    ref = reference.strip().removeprefix("@")
    if re.fullmatch(r"v?\d+", ref):  # MLflow reserves v<N> as alias names, so it can only mean version N
        return int(ref.removeprefix("v"))
    if ref not in aliases:
        known = ", ".join(sorted(aliases)) or "none"
        raise RegistryError(f"model {name} has no alias {ref!r} (aliases: {known}); "
                            f"give a version number or one of those")
    return aliases[ref]


def _run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"no run {run_id} at {redact(client.tracking_uri)}: is MLFLOW_TRACKING_URI "
                            f"the server the model was trained with?") from None


def _search_runs(client: MlflowClient, experiment_id: str, query: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs([experiment_id], query, ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _model_id(model_uri: str) -> str | None:
    """`models:/m-...` (a logged model) -> its id; registry URIs and runs:/ URIs have none."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest and "/" not in rest and "@" not in rest else None


def _is_location(key: str, value: str) -> bool:
    # Where inputs and outputs live, not what is trained: absolute paths, URIs, MLflow names.
    return key == "root" or key.startswith("mlflow.") or "://" in value or os.path.isabs(value)


def _known(value: Any) -> str | None:
    return None if value is None or str(value) in UNKNOWN_TAG_VALUES else str(value)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _short(data_version: str | None) -> str:
    # DVC folder hashes are 32 hex digits + ".dir"; 12 digits tell versions apart in a table.
    return "-" if data_version is None else data_version[:12]


def _cell(info: VersionInfo | None) -> str:
    if info is None:
        return "-"
    return f"v{info.version}  {_pct(info.test_top1):>7}  data {_short(info.data_version)}"
