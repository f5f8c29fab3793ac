"""train.init_from: which exported models a run may start from, refused in one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixer import config, export
from mixer.model import build_model

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def exported_nano(folder: Path) -> dict[str, torch.Tensor]:
    cfg = config.load(PARAMS, {"model.preset": "nano"})
    torch.manual_seed(1)
    weights = build_model(cfg.model).state_dict()
    export.save(folder, weights, cfg.model, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25],
                info={"best_epoch": 3, "epochs_run": 5, "mlflow_run_id": "abc123", "run_name": "first"})
    return weights


def test_the_weights_and_their_origin_are_read_for_the_same_network(tmp_path: Path) -> None:
    weights = exported_nano(tmp_path / "first")
    # Dropout may differ: it changes how the weights train, not their shapes.
    cfg = config.load(PARAMS, {"model.preset": "nano", "model.dropout": 0.3, "train.init_from": str(tmp_path / "first")})

    initial = export.read_initial_weights(cfg)

    assert initial is not None and initial.state_dict.keys() == weights.keys()
    assert all(torch.equal(initial.state_dict[k], weights[k]) for k in weights)
    assert initial.origin == {"folder": str(tmp_path / "first"), "mlflow_run_id": "abc123", "run_name": "first",
                              "epochs_run": 5, "best_epoch": 3}
    assert export.read_initial_weights(config.load(PARAMS)) is None  # the default: random weights


def test_another_network_is_refused_in_one_line_naming_what_differs(tmp_path: Path) -> None:
    exported_nano(tmp_path / "first")
    cfg = config.load(PARAMS, {"train.init_from": str(tmp_path / "first")})  # the seed preset

    with pytest.raises(config.ConfigError) as refused:
        export.read_initial_weights(cfg)

    message = str(refused.value)
    assert message.startswith("train.init_from: ") and "\n" not in message
    assert "num_blocks=8" in message and "num_blocks=4" in message and "set model.preset=nano" in message


def test_a_folder_without_an_export_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = config.load(PARAMS, {"train.init_from": str(tmp_path / "nothing")})

    with pytest.raises(config.ConfigError, match=r"^train\.init_from: .*nothing/model\.pt: no exported model"):
        export.read_initial_weights(cfg)
