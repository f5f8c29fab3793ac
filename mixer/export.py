"""The exported model: `models/` = weights + model config + normalization stats + training summary.

`model.pt` holds only tensors, numbers and strings, so `torch.load(weights_only=True)` reads it and
loading never executes code from the file. `train.json` is the human-readable summary (best epoch,
per-epoch history) that evaluation turns into curves.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixer.atomic import atomic_dir, atomic_write_text
from mixer.config import ModelConfig
from mixer.model import MlpMixer, build_model

WEIGHTS_FILE = "model.pt"
SUMMARY_FILE = "train.json"


class ExportError(ValueError):
    """A models/ folder that is missing, incomplete or does not match its config."""


@dataclass(frozen=True)
class Exported:
    model: MlpMixer  # in eval mode, on the CPU
    config: ModelConfig
    mean: tuple[float, float, float]  # per channel, pixel/255 units
    std: tuple[float, float, float]
    summary: dict[str, Any]


def save(folder: Path, state_dict: Mapping[str, torch.Tensor], config: ModelConfig, mean: Sequence[float],
         std: Sequence[float], info: Mapping[str, Any]) -> None:
    """Write the folder atomically: a crash leaves the previous export, never half of a new one."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "model_config": dataclasses.asdict(config),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    with atomic_dir(folder) as tmp:
        torch.save(payload, tmp / WEIGHTS_FILE)
        summary = {"model_config": payload["model_config"], "mean": payload["mean"], "std": payload["std"], **info}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(folder: Path) -> dict[str, Any]:
    """train.json alone (no weights loaded)."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no exported model; run `mixer train` (or `dvc repro train`) first")
    return json.loads(path.read_text())


def annotate(folder: Path, **fields: Any) -> None:
    """Add fields to the summary (e.g. the MLflow model URI, known only after the export)."""
    summary = {**read_summary(folder), **fields}
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def load(folder: Path) -> Exported:
    """Rebuild the model from `folder` (written by `save`)."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights}: no exported model; run `mixer train` (or `dvc repro train`) first")
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=True)
        config = ModelConfig(**payload["model_config"])
    except Exception as err:  # any unreadable or foreign file: say which one and stop
        raise ExportError(f"{weights}: not a mixer model export ({type(err).__name__}: {err})") from None
    model = build_model(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ExportError(f"{weights}: weights do not match their model config ({first})") from None
    summary_file = folder / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Exported(model=model.eval(), config=config, mean=tuple(payload["mean"]), std=tuple(payload["std"]),
                    summary=summary)
