"""A logged, registered model loads by alias with pickle disallowed, and `mlflow models serve` answers;
a tampered copy in the artifact store is refused by both loaders, without running anything from it.

The tracking store is a SQLite file in the test's folder (MLflow 3 rejects a plain file store); no
tracking server is needed: the loading subprocess and `mlflow models serve` read the same file.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from mixer import export, serving
from mixer.config import MODEL_PRESETS, ModelConfig
from mixer.model import build_model

from .mlflow_server import free_port, stop, wait_healthy

REGISTERED = "cifar100-mixer"
CHAMPION_URI = f"models:/{REGISTERED}@champion"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Clients fail fast instead of retrying for minutes (the default: 7 retries, 120 s per request).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
SERVE_START_TIMEOUT_S = 60.0  # `mlflow models serve` imports mlflow twice (CLI, then uvicorn) and torch


class Echo(mlflow.pyfunc.PythonModel):
    """A pyfunc model that MLflow stores with cloudpickle (what the mixer model never is)."""

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None
                ) -> list[str]:
        return model_input


class Planted:
    """Unpickling this creates `path` (via builtins.open): a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.path), "w")


@dataclass(frozen=True)
class Champion:
    tracking_uri: str
    experiment_id: str
    artifacts: Path  # the experiment's artifact folder (file://): what a tampering would edit
    version: str
    images: np.ndarray  # (2, 32, 32, 3) uint8
    expected: np.ndarray  # (2, 100) float32, the exported model's own probabilities


@pytest.fixture
def champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Champion]:
    """A tiny export logged in a run, registered as `cifar100-mixer` and aliased `champion`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name, value in {**CLIENT_ENV, "MLFLOW_TRACKING_URI": uri}.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="seed", **MODEL_PRESETS["seed"]))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would predict the uniform distribution
    folder = tmp_path / "models"
    export.save(folder, model.state_dict(), model.cfg, MEAN, STD,
                info={"class_names": [f"fine_{i:02d}" for i in range(100)]})
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)

    # Another test of the session may have set a process-wide URI; use ours, then put that one back.
    with _use_tracking_uri(uri):
        artifacts = (tmp_path / "artifacts").as_uri()
        experiment = mlflow.create_experiment("serving", artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment):
            model_uri = serving.log_model(folder, images)
        version = mlflow.register_model(model_uri, REGISTERED).version
        MlflowClient().set_registered_model_alias(REGISTERED, "champion", version)
        expected = serving._load_pyfunc(str(folder)).predict(images)
        yield Champion(uri, experiment, tmp_path / "artifacts", str(version), images, expected)


def test_champion_loads_by_alias_without_pickle(champion: Champion) -> None:
    script = ("import json, sys, numpy as np, mlflow\n"
              "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
              "images = np.array(json.loads(sys.argv[2]), dtype=np.uint8)\n"
              "print(json.dumps({'impl': type(model._model_impl).__name__,"
              " 'probs': model.predict(images).tolist()}))\n")
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_TRACKING_URI": champion.tracking_uri,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", script, CHAMPION_URI, json.dumps(champion.images.tolist())],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["impl"] == "MixerModel"
    probs = np.array(answer["probs"])
    assert probs.shape == (2, 100)
    np.testing.assert_allclose(probs, champion.expected, rtol=1e-5, atol=1e-6)

    # In this process, by alias and by version: the same model, the names from train.json.
    for uri in (CHAMPION_URI, f"models:/{REGISTERED}/{champion.version}"):
        loaded = serving.load(uri)
        np.testing.assert_allclose(loaded.predict(champion.images), champion.expected, rtol=1e-5, atol=1e-6)
        assert loaded.class_names[:2] == ["fine_00", "fine_01"]

    requirements = Path(mlflow.artifacts.download_artifacts(f"{CHAMPION_URI}/requirements.txt")).read_text()
    assert set(requirements.split()) == set(serving.pip_requirements())

    # Nothing in the logged model is unpickled or imported from the model itself: the installed
    # loader module reads model.pt with weights_only=True, and no code travels with the model.
    mlmodel = Model.load(mlflow.artifacts.download_artifacts(f"{CHAMPION_URI}/MLmodel"))
    flavor = mlmodel.flavors["python_function"]
    assert flavor["loader_module"] == "mixer.serving" and not flavor.get("code")
    assert not {"python_model", "cloudpickle_version", "model_code_path"} & set(flavor)
    stored = [p.name for p in (champion.artifacts).rglob("*") if p.is_file()]
    assert not [name for name in stored if name.endswith((".pkl", ".pickle", ".joblib"))], stored


def test_load_refuses_a_model_that_is_not_ours(champion: Champion, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "other.json"
    data.write_text("{}")
    with mlflow.start_run(experiment_id=champion.experiment_id):
        other = mlflow.pyfunc.log_model(name="other", loader_module="json", data_path=str(data),
                                        pip_requirements=[]).model_uri
        pickled = mlflow.pyfunc.log_model(name="pickled", python_model=Echo(), pip_requirements=[]).model_uri
    with pytest.raises(ValueError, match="not a mixer model .*'json'"):
        serving.load(other)
    with pytest.raises(ValueError, match="not a mixer model .*mlflow.pyfunc.model"):
        serving.load(pickled)

    # MLflow's own loader honours MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: a cloudpickled
    # python_model, here replaced by a pickle that runs code, is refused before it is unpickled.
    sentinel = tmp_path / "ran"
    (pkl,) = [p for p in champion.artifacts.rglob("python_model.pkl")]
    pkl.write_bytes(pickle.dumps(Planted(sentinel)))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pyfunc.load_model(pickled)
    assert not sentinel.exists()


def test_a_tampered_logged_model_is_refused_by_both_loaders(champion: Champion, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    (stored,) = champion.artifacts.rglob(export.WEIGHTS_FILE)  # the registered copy in the artifact store
    good = stored.read_bytes()

    # model.pt replaced by a file that runs code when unpickled.
    sentinel = tmp_path / "ran"
    torch.save({"state_dict": {}, "model_config": Planted(sentinel), "mean": [0.5] * 3, "std": [0.25] * 3},
               stored)
    with pytest.raises(export.ExportError) as err:
        serving.load(CHAMPION_URI)
    assert str(err.value).startswith(f"{CHAMPION_URI} (model.pt): refused: it holds more than tensors")
    assert str(err.value).endswith(export.REPLACE_LOGGED) and "\n" not in str(err.value)
    with pytest.raises(export.ExportError, match="refused: it holds more than tensors"):
        mlflow.pyfunc.load_model(CHAMPION_URI)
    assert not sentinel.exists()

    # model.pt whose config no longer matches its weights.
    stored.write_bytes(good)
    payload = torch.load(stored, weights_only=True)
    torch.save({**payload, "model_config": {**payload["model_config"], "hidden_dim": 192}}, stored)
    with pytest.raises(export.ExportError) as err:
        serving.load(CHAMPION_URI)
    assert str(err.value) == (f"{CHAMPION_URI} (model.pt): weights do not match their model config "
                              f"(hidden_dim=192 but the weights have 128); {export.REPLACE_LOGGED}")
    with pytest.raises(export.ExportError, match=r"hidden_dim=192 but the weights have 128"):
        mlflow.pyfunc.load_model(CHAMPION_URI)


def test_models_serve_answers_invocations(champion: Champion, tmp_path: Path) -> None:
    port = free_port()
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_TRACKING_URI": champion.tracking_uri,
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}  # the CLI execs `uvicorn`
    command = [str(venv_bin / "mlflow"), "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        # A session of its own: the CLI forks bash -> uvicorn, and killpg reaches all of them.
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/ping", server, log, timeout_s=SERVE_START_TIMEOUT_S)
        request = urllib.request.Request(f"{base}/invocations", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"inputs": champion.images.tolist()}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.array(json.load(response)["predictions"])
        assert predictions.shape == (2, 100)
        assert predictions.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
        np.testing.assert_allclose(predictions, champion.expected, rtol=1e-4, atol=1e-6)

        bad = urllib.request.Request(f"{base}/invocations", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"inputs": champion.images[:, :16].tolist()}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 400  # a wrong shape is the client's error, caught by the signature
    finally:
        stop(server)
