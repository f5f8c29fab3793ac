"""Loading a model never runs code from it; servers listen on loopback; logged text carries no secrets."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from mixer import config, export, serving, stack, tracking
from mixer.cli import main
from mixer.config import MODEL_PRESETS, ModelConfig
from mixer.model import build_model
from tests.integration.mlflow_server import server_command

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
LOOPBACK = "127.0.0.1"


class Planted:
    """Unpickling this creates `path` (via builtins.open): a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.path), "w")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = build_model(ModelConfig(preset="seed", **MODEL_PRESETS["seed"]))
    out = tmp_path / "models"
    export.save(out, model.state_dict(), model.cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), info={})
    return out


def _payloads(sentinel: Path) -> dict[str, bytes]:
    """model.pt replaced by a torch file with a planted object, or by a raw (legacy-format) pickle."""
    torch_file = sentinel.parent / "planted.pt"
    torch.save({"state_dict": {"stem.weight": torch.zeros(1)}, "model_config": Planted(sentinel),
                "mean": [0.5] * 3, "std": [0.25] * 3}, torch_file)
    return {"torch.save": torch_file.read_bytes(), "raw pickle": pickle.dumps(Planted(sentinel), protocol=2)}


def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path: Path) -> None:
    """The control: the files of the next test are live, so their refusal means something."""
    sentinel = tmp_path / "ran"
    payload = _payloads(sentinel)["raw pickle"]
    pickle.loads(payload).close()  # what torch.load(weights_only=False) would do to it
    assert sentinel.exists()


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_a_model_file_carrying_code_is_refused_and_never_run(folder: Path, tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "ran"
    (folder / export.WEIGHTS_FILE).write_bytes(_payloads(sentinel)[kind])
    for load in (export.load, lambda f: serving._load_pyfunc(str(f))):
        with pytest.raises(export.ExportError) as err:
            load(folder)
        message = str(err.value)
        assert message.startswith(f"{folder / export.WEIGHTS_FILE}: refused: it holds more than tensors")
        assert "(a reference to io.open), so loading it could run code; do not use this file" in message
        assert "\n" not in message
    assert not sentinel.exists()


def test_the_cli_shows_a_refused_model_in_one_line(folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "ran"
    (folder / export.WEIGHTS_FILE).write_bytes(_payloads(sentinel)["torch.save"])
    metrics = tmp_path / "metrics"
    code = main(["evaluate", "--weights", str(folder), f"eval.metrics_dir={metrics}",
                 "--params", str(PARAMS)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"mixer evaluate: error: {folder / export.WEIGHTS_FILE}: refused: ")
    assert not sentinel.exists() and not metrics.exists()  # nothing written


# Servers: every launcher binds to loopback unless told otherwise.

def _host(argv: list[str]) -> str:
    return argv[argv.index("--host") + 1]


def test_stack_servers_bind_to_loopback() -> None:
    cfg = config.load(PARAMS)
    assert _host(stack.prefect_server_command(4200)) == LOOPBACK
    assert _host(stack.mlflow_server_command(cfg, 5000)) == LOOPBACK


def test_mixer_server_binds_to_loopback_unless_told(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(config.ENV_TRACKING_URI, raising=False)  # `mixer server` serves the SQLite store
    launched: list[list[str]] = []
    monkeypatch.setattr("mixer.cli.os.execv", lambda path, argv: launched.append(argv))
    assert main(["server", "--params", str(PARAMS)]) == 0
    assert main(["server", "--host", "0.0.0.0", "--params", str(PARAMS)]) == 0
    assert [_host(argv) for argv in launched] == [LOOPBACK, "0.0.0.0"]
    capsys.readouterr()


def test_the_test_mlflow_server_binds_to_loopback(tmp_path: Path) -> None:
    assert _host(server_command(tmp_path, 5000)) == LOOPBACK


def test_mlflow_models_serve_defaults_to_loopback() -> None:
    """README runs `mlflow models serve` without --host: MLflow's own default must be loopback."""
    import mlflow.models.cli

    (host,) = [p for p in mlflow.models.cli.serve.params if p.name == "host"]
    assert host.default == LOOPBACK


# Secrets: what MLflow records from the config is redacted.

@pytest.mark.parametrize("text, redacted", [
    ("http://alice:pw-1@mlflow.internal:5000", "http://***@mlflow.internal:5000"),
    ("https://tok3n@mlflow.internal", "https://***@mlflow.internal"),
    ("ray://bob:pw-2@head:10001", "ray://***@head:10001"),
    ("s3://AKIAEXAMPLE:sk-3@bucket/ray", "s3://***@bucket/ray"),
    ("https://mirror/c.tar.gz?token=t-4&v=1", "https://mirror/c.tar.gz?token=***&v=1"),
    ("https://b.s3/o?X-Amz-Credential=AK&X-Amz-Signature=5ig",
     "https://b.s3/o?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("API request to http://a:pw-5@h:9/api/2.0/x failed", "API request to http://***@h:9/api/2.0/x failed"),
    ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ("user@example.com wrote /a/b@c", "user@example.com wrote /a/b@c"),
])
def test_redact_removes_url_credentials(text: str, redacted: str) -> None:
    assert tracking.redact(text) == redacted


def test_logged_config_and_ui_links_carry_no_credentials() -> None:
    cfg = config.load(PARAMS, {"mlflow.tracking_uri": "https://alice:pw-6@mlflow.internal:5000/",
                               "data.url": "https://mirror/c.tar.gz?token=t-7"})
    logged = tracking.logged_config(cfg)
    assert logged["mlflow"]["tracking_uri"] == "https://***@mlflow.internal:5000/"
    assert logged["data"]["url"] == "https://mirror/c.tar.gz?token=***"
    assert tracking.ui_base(cfg) == "https://mlflow.internal:5000"
