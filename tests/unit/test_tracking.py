"""Tracking when the server is away: training is never stopped by MLflow."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mixer import config, epochs, progress, tracking

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture
def nobody() -> str:
    """An http:// URI on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_dead_server_is_not_reachable_and_a_database_always_is(nobody: str) -> None:
    assert not tracking.reachable(config.load(PARAMS, {"mlflow.tracking_uri": nobody}))
    assert tracking.reachable(config.load(PARAMS, {"mlflow.tracking_uri": "sqlite:///x.db"}))


def test_epoch_logging_survives_a_server_that_went_away(nobody: str, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    log = progress.EpochLog(nobody, "0123456789abcdef")
    epoch = {name: 0.5 for name in epochs.EPOCH_METRICS}
    log({**epoch, "epoch": 1})  # raises nothing: the training it runs beside goes on
    log({**epoch, "epoch": 2})
    assert log.lost
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "training continues" in warnings[0]  # said once, not per epoch


def test_the_register_later_message_is_one_line_without_credentials() -> None:
    cfg = config.load(PARAMS, {"mlflow.tracking_uri": "http://alice:secret@127.0.0.1:5999"})
    message = tracking.register_later(cfg, Path("models"), "was unreachable")
    assert "\n" not in message and "secret" not in message
    assert message.endswith("run `mixer evaluate --weights models` and `mixer register --from models`")


def test_a_finished_run_name_is_refused_and_an_unfinished_one_continues(tmp_path: Path) -> None:
    cfg = config.load(PARAMS, {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "mlflow.artifact_root": str(tmp_path / "art"), "train.run_name": "long-run"})
    run_id = tracking.start_training_run(cfg, None, "cpu")
    assert tracking.start_training_run(cfg, None, "cpu") == run_id  # unfinished: the same run continues
    with pytest.raises(ValueError, match="other params"):
        tracking.start_training_run(config.replace(cfg, {"train.lr": 0.1}), None, "cpu")
    tracking.client(cfg).set_terminated(run_id, "FINISHED")
    with pytest.raises(ValueError, match="finished already; choose a new name"):
        tracking.start_training_run(cfg, None, "cpu")
