"""The model registry against a real `mlflow server`: versions, aliases, the promotion gate, lineage.

Runs are made without training: a real MLflow run with the tags, params and metrics tracking.py
writes, and a trivial pyfunc model logged in it (so these tests do not depend on serving.py).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mixer import config, registry
from mixer.config import Config
from mixer.registry import CHALLENGER, CHAMPION, PREVIOUS, Promotion, RegistryError

REPO = Path(__file__).resolve().parents[2]
DATA_A = "3b1f0c9d2e8a7f6b5c4d3e2f1a0b9c8d.dir"  # DVC folder hashes: 32 hex digits + ".dir"
DATA_B = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b.dir"
COMMIT = "3f2a1c9e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39"


class Echo(mlflow.pyfunc.PythonModel):
    """The smallest pyfunc model: the registry only needs something logged."""

    # MLflow reads these hints as the model's signature: a batch is a list of inputs.
    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None
                ) -> list[str]:
        return model_input


@dataclass
class Registry:
    cfg: Config
    client: MlflowClient
    experiment_id: str
    uri: str


@pytest.fixture
def reg(mlflow_server: str, tmp_path: Path) -> Iterator[Registry]:
    """A config with an experiment and a registered model name of its own on the shared server."""
    name = f"cifar100-mixer-{uuid.uuid4().hex[:8]}"
    cfg = make_config(mlflow_server, tmp_path, name)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    # The server does not proxy artifacts: the experiment names a folder every client can reach.
    experiment_id = client.create_experiment(name, artifact_location=cfg.mlflow.artifact_root.as_uri())
    yield Registry(cfg, client, experiment_id, mlflow_server)
    registry.lock_path(cfg).unlink(missing_ok=True)  # one lock file per test model name: tidy /tmp


def make_config(uri: str, tmp: Path, name: str, **overrides: Any) -> Config:
    return config.load(REPO / "params.yaml", {
        "mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp / "artifacts"),
        "mlflow.registered_model": name, "mlflow.experiment": name, **overrides})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def log_model(uri: str, run_id: str) -> str:
    """Log Echo in `run_id`; the tracking URI is set only for this block."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            return info.model_uri
    finally:
        mlflow.set_tracking_uri(previous)


def make_run(reg: Registry, *, best_val_top1: float, test_top1: float | None = None,
             data_version: str | None = DATA_A, model: bool = True, model_uri: str | None = None,
             status: str = "FINISHED", overrides: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """A run as tracking.py leaves it: lineage tags, flattened params, summary metrics, a model.

    Returns (run id, model uri); `model=False` logs no model but may still tag `model_uri`.
    """
    tags = {"git_commit": COMMIT, "git_dirty": "false", "ray_num_workers": "1", "device": "cpu"}
    if data_version is not None:
        tags["data_version"] = data_version
    run_id = reg.client.create_run(reg.experiment_id, tags=tags).info.run_id
    cfg = reg.cfg if not overrides else make_config(reg.uri, reg.cfg.mlflow.artifact_root.parent,
                                                    reg.cfg.mlflow.registered_model, **overrides)
    now = int(time.time() * 1000)
    metrics = {"best_val_top1": best_val_top1, "best_val_loss": 2.5, "best_epoch": 7.0}
    if test_top1 is not None:
        metrics.update(test_top1=test_top1, test_top5=test_top1 + 0.3, test_loss=2.4)
    reg.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in flatten(cfg.to_dict()).items()])
    if model:
        model_uri = log_model(reg.uri, run_id)
    if model_uri:
        reg.client.set_tag(run_id, "model_uri", model_uri)
    reg.client.set_terminated(run_id, status)
    return run_id, model_uri


def register_run(reg: Registry, test_top1: float, data_version: str | None = DATA_A) -> registry.VersionInfo:
    run_id, model_uri = make_run(reg, best_val_top1=test_top1, test_top1=test_top1, data_version=data_version)
    assert model_uri is not None
    metrics = {"top1": test_top1, "top5": test_top1 + 0.3, "loss": 2.4, "data_version": data_version}
    return registry.register(reg.cfg, run_id, model_uri, metrics)


def version_of(info: registry.VersionInfo | None) -> int | None:
    return info.version if info else None


def aliases(reg: Registry) -> dict[str, int]:
    model = reg.client.get_registered_model(reg.cfg.mlflow.registered_model)
    return {alias: int(version) for alias, version in model.aliases.items()}


def test_register_creates_a_tagged_challenger_once(reg: Registry) -> None:
    run_id, model_uri = make_run(reg, best_val_top1=0.40, test_top1=0.41)
    assert model_uri is not None and model_uri.startswith("models:/m-")
    metrics = {"top1": 0.41, "top5": 0.71, "loss": 2.4, "data_version": DATA_A}

    first = registry.register(reg.cfg, run_id, model_uri, metrics)

    assert (first.version, first.created, first.run_id, first.aliases) == (1, True, run_id, [CHALLENGER])
    assert (first.data_version, first.test_top1) == (DATA_A, 0.41)
    mv = reg.client.get_model_version(reg.cfg.mlflow.registered_model, "1")
    assert mv.source == model_uri and mv.run_id == run_id
    expected = {"run_id": run_id, "data_version": DATA_A, "git_commit": COMMIT,
                "test_top1": "0.41", "test_top5": "0.71", "test_loss": "2.4"}
    assert {key: mv.tags.get(key) for key in expected} == expected

    again = registry.register(reg.cfg, run_id, model_uri, metrics)

    assert (again.version, again.created, again.aliases) == (1, False, [CHALLENGER])
    assert len(reg.client.search_model_versions(f"name = '{reg.cfg.mlflow.registered_model}'")) == 1
    assert registry.load_uri(reg.cfg, "challenger") == f"models:/{reg.cfg.mlflow.registered_model}@challenger"
    assert registry.load_uri(reg.cfg, "1") == f"models:/{reg.cfg.mlflow.registered_model}/1"
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        registry.load_uri(reg.cfg, "champion")


def test_register_refuses_metrics_of_other_data(reg: Registry) -> None:
    run_id, model_uri = make_run(reg, best_val_top1=0.40, test_top1=0.41)
    assert model_uri is not None
    with pytest.raises(RegistryError, match="evaluate it on the data it was trained on"):
        registry.register(reg.cfg, run_id, model_uri, {"top1": 0.41, "data_version": DATA_B})


def test_the_gate_compares_test_top1_on_the_same_data(reg: Registry) -> None:
    v1 = register_run(reg, 0.43)
    first = registry.promote(reg.cfg)
    assert first.changed and "first champion" in first.reason
    assert aliases(reg) == {CHAMPION: 1, CHALLENGER: 1}

    v2 = register_run(reg, 0.412)
    worse = registry.promote(reg.cfg)
    assert not worse.changed
    assert worse.reason == (f"version 2 test top-1 41.20% is not above champion version 1's 43.00% on data "
                            f"version {DATA_A[:12]}; use --force to promote anyway")
    assert aliases(reg) == {CHAMPION: 1, CHALLENGER: 2}
    assert worse.after == worse.before

    v3 = register_run(reg, 0.45)
    better = registry.promote(reg.cfg)
    assert better.changed and "beats" in better.reason
    assert aliases(reg) == {CHAMPION: 3, CHALLENGER: 3, PREVIOUS: 1}
    assert better.before[CHAMPION] is not None and better.before[CHAMPION].version == v1.version
    assert better.after[CHAMPION] is not None and better.after[CHAMPION].version == v3.version
    table = better.table()
    assert "champion" in table and "v1" in table and "v3" in table and "<- changed" in table

    other_data = register_run(reg, 0.60, data_version=DATA_B)
    refused = registry.promote(reg.cfg, version=other_data.version)
    assert not refused.changed and "not comparable" in refused.reason and "--force" in refused.reason
    assert aliases(reg)[CHAMPION] == 3

    forced = registry.promote(reg.cfg, version=v2.version, force=True)
    assert forced.changed and "--force" in forced.reason
    assert aliases(reg) == {CHAMPION: 2, CHALLENGER: 4, PREVIOUS: 3}

    same = registry.promote(reg.cfg, version=2)
    assert not same.changed and same.reason == "version 2 is already the champion"


def test_rollback_swaps_champion_and_previous(reg: Registry) -> None:
    register_run(reg, 0.40)
    registry.promote(reg.cfg)
    with pytest.raises(RegistryError, match="no previous-champion: nothing to roll back") as err:
        registry.rollback(reg.cfg)
    assert "\n" not in str(err.value)

    register_run(reg, 0.50)
    registry.promote(reg.cfg)
    assert aliases(reg) == {CHAMPION: 2, CHALLENGER: 2, PREVIOUS: 1}

    back = registry.rollback(reg.cfg)
    assert back.changed
    assert aliases(reg) == {CHAMPION: 1, CHALLENGER: 2, PREVIOUS: 2}
    assert registry.rollback(reg.cfg).changed  # a rollback undoes a rollback
    assert aliases(reg) == {CHAMPION: 2, CHALLENGER: 2, PREVIOUS: 1}


def test_register_best_picks_the_best_validation_run_of_the_data_version(reg: Registry) -> None:
    assert registry.register_best(reg.cfg, DATA_A) is None  # no runs yet
    _, spare_uri = make_run(reg, best_val_top1=0.30)  # a logged model the distractors point at
    best_id, _ = make_run(reg, best_val_top1=0.50, test_top1=0.48)
    make_run(reg, best_val_top1=0.90, model=False, model_uri=spare_uri, data_version=DATA_B)  # other data
    make_run(reg, best_val_top1=0.95, model=False)  # never logged a model
    make_run(reg, best_val_top1=0.99, model=False, model_uri=spare_uri, status="FAILED")

    chosen = registry.register_best(reg.cfg, DATA_A)

    assert chosen is not None and chosen.created and chosen.run_id == best_id and chosen.test_top1 == 0.48
    again = registry.register_best(reg.cfg, DATA_A)
    assert again is not None and (again.version, again.created) == (chosen.version, False)
    assert registry.register_best(reg.cfg, "f" * 32 + ".dir") is None
    # tracking.py tags a run trained on data DVC did not version "unversioned": data_version=None finds it.
    unversioned_id, _ = make_run(reg, best_val_top1=0.20, model=False, model_uri=spare_uri,
                                 data_version="unversioned")
    unversioned = registry.register_best(reg.cfg, None)
    assert unversioned is not None
    assert (unversioned.run_id, unversioned.data_version) == (unversioned_id, None)


def test_lineage_shows_commit_data_params_and_their_diff(reg: Registry) -> None:
    run_id, model_uri = make_run(reg, best_val_top1=0.40, test_top1=0.41,
                                 overrides={"train.lr": 1.0e-3, "model.preset": "nano"})
    assert model_uri is not None
    registry.register(reg.cfg, run_id, model_uri, {"top1": 0.41})
    registry.promote(reg.cfg)

    text = registry.lineage(reg.cfg, "champion", workspace=reg.cfg)

    assert text == registry.lineage(reg.cfg, "1", workspace=reg.cfg)
    assert "version 1 (champion, challenger)" in text and run_id in text
    assert f"git commit   {COMMIT}" in text and f"data version {DATA_A}" in text
    assert "test         top-1 41.00%" in text and "best top-1 40.00%" in text
    assert "train.lr: 0.001 -> 0.005" in text and "model.preset: nano -> seed" in text
    assert "model.num_blocks: 8 -> 4" in text  # nano's preset value, resolved in the params
    assert "train.epochs:" not in text  # equal values are not differences
    assert f"git checkout {COMMIT}" in text and "dvc pull" in text
    command = text[text.index("mixer train"):]
    assert "train.lr=0.001" in command and "model.preset=nano" in command
    assert "mlflow." not in command and "models_dir" not in command  # locations are not overrides
    with pytest.raises(RegistryError, match="no alias 'previous-champion'"):
        registry.lineage(reg.cfg, "previous-champion")
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.lineage(reg.cfg, "7")


def test_the_rest_api_shows_what_the_registry_wrote(reg: Registry) -> None:
    first = register_run(reg, 0.40)
    registry.promote(reg.cfg)
    name = reg.cfg.mlflow.registered_model

    query = urllib.parse.urlencode({"name": name, "alias": CHAMPION})
    url = f"{reg.uri}/api/2.0/mlflow/registered-models/alias?{query}"
    with urllib.request.urlopen(url, timeout=20) as response:
        version = json.load(response)["model_version"]
    assert version["version"] == str(first.version) and version["run_id"] == first.run_id
    assert set(version["aliases"]) == {CHAMPION, CHALLENGER}

    search = {"experiment_ids": [reg.experiment_id], "filter": f"tags.data_version = '{DATA_A}'"}
    body = json.dumps(search).encode()
    request = urllib.request.Request(f"{reg.uri}/api/2.0/mlflow/runs/search", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        runs = json.load(response)["runs"]
    assert [run["info"]["run_id"] for run in runs] == [first.run_id]


def test_ten_concurrent_promotions_end_consistent(reg: Registry) -> None:
    # Ten versions with increasing test accuracy; they share one logged model (aliases are under test here).
    _, model_uri = make_run(reg, best_val_top1=0.30)
    assert model_uri is not None
    for i in range(10):
        run_id, _ = make_run(reg, best_val_top1=0.30 + i / 100, model=False, model_uri=model_uri)
        registry.register(reg.cfg, run_id, model_uri, {"top1": 0.30 + i / 100, "data_version": DATA_A})

    # Threads, not processes: each call opens the lock file itself, and flock locks belong to the open
    # file, so threads contend exactly as separate `mixer promote` processes do (without ten ~4 s imports).
    start = threading.Barrier(10)

    def contend(version: int) -> Promotion:
        start.wait(timeout=60)
        return registry.promote(reg.cfg, version=version)

    with ThreadPoolExecutor(max_workers=10) as pool:
        outcomes = list(pool.map(contend, range(1, 11)))

    final = aliases(reg)
    assert final[CHAMPION] == 10
    for version in final.values():  # every alias names a real version
        reg.client.get_model_version(reg.cfg.mlflow.registered_model, str(version))
    # The promotions that won form one chain: each started from the champion the previous one left.
    won = [o for o in outcomes if o.changed]
    steps = {version_of(o.before[CHAMPION]): version_of(o.after[CHAMPION]) for o in won}
    assert len(steps) == len(won), "two promotions replaced the same champion"
    chain, current = [], None
    while current in steps:
        current = steps[current]
        chain.append(current)
    assert len(chain) == len(won) and chain[-1] == 10
    assert chain == sorted(chain)  # the gate held: each step raised test top-1
    assert final.get(PREVIOUS) == (chain[-2] if len(chain) > 1 else None)
