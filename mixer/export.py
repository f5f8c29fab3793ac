"""The exported model: `models/` = weights + model config + normalization stats + training summary.

`model.pt` holds only tensors, numbers and strings, so `torch.load(weights_only=True)` reads it and
loading never executes code from the file: a pickle that names any other Python callable is refused.
`train.json` is the human-readable summary (best epoch, per-epoch history) that evaluation turns into
curves; it repeats the model config and the normalization stats, and `load` checks that the two files
agree, so neither can be edited (or replaced) alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixer import config
from mixer.atomic import atomic_dir, atomic_write_text
from mixer.config import ModelConfig
from mixer.model import MlpMixer, build_model
from mixer.redaction import logged_config

WEIGHTS_FILE = "model.pt"
SUMMARY_FILE = "train.json"
PAYLOAD_KEYS = ("state_dict", "model_config", "mean", "std")
RE_EXPORT = "re-export it with `mixer train` (or `dvc repro train`)"
# A logged copy (an MLflow model) cannot be re-exported in place: another version has to serve.
REPLACE_LOGGED = "load another version (`mixer rollback` if it is the champion) and register a fresh export"
# The config fields a state dict reveals through its tensor shapes, in the order an error names them.
SHAPE_FIELDS = ("hidden_dim", "num_blocks", "patch_size", "tokens_mlp_dim", "channels_mlp_dim", "num_classes",
                "in_channels", "image_size")


class ExportError(ValueError):
    """A models/ folder that is missing, incomplete, unsafe or does not match its config: one line."""


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
        summary = {"model_config": payload["model_config"], "mean": payload["mean"], "std": payload["std"],
                   **info}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def training_info(cfg: config.Config, best_state: Mapping[str, Any], history: list[dict[str, float]],
                  meta: Mapping[str, Any], data_version: str | None, run_id: str | None,
                  init_origin: Mapping[str, Any] | None, device: str, num_workers: int) -> dict[str, Any]:
    """What train.json records beside the weights of a training run's best epoch: the same for
    `mixer train` and `mixer train-offline`, so `mixer register --from` takes either."""
    return {"best_epoch": best_state["state"]["epoch"], "epochs_run": len(history), "history": history,
            "num_workers": num_workers, "device": device, "precision": cfg.train.precision,
            "class_names": meta["fine_label_names"], "data_version": data_version, "mlflow_run_id": run_id,
            "run_name": cfg.train.run_name, "init_from": init_origin, "params": logged_config(cfg)}


@dataclass(frozen=True)
class InitialWeights:
    """train.init_from, read and checked before training: the weights a run starts from, and their origin."""

    state_dict: dict[str, torch.Tensor]
    origin: dict[str, Any]  # the folder, and the MLflow run, run name and epochs that trained the weights


def read_initial_weights(cfg: config.Config) -> InitialWeights | None:
    """The exported model train.init_from names, if any; refused (one line) unless model.* builds the
    same network. Dropout may differ: it changes training, not the weights' shapes."""
    folder = cfg.train.init_from
    if folder is None:
        return None
    try:
        exported = load(folder)
    except ExportError as err:
        raise config.ConfigError(f"train.init_from: {err}") from None
    different = [name for name in SHAPE_FIELDS if getattr(exported.config, name) != getattr(cfg.model, name)]
    if different:
        theirs = ", ".join(f"{name}={getattr(exported.config, name)}" for name in different)
        ours = ", ".join(f"{name}={getattr(cfg.model, name)}" for name in different)
        raise config.ConfigError(f"train.init_from: {folder} holds a {exported.config.preset} model with {theirs}, "
                                 f"but model.* builds {ours}; set model.preset={exported.config.preset} (and the "
                                 f"same model fields) to start from it")
    summary = exported.summary
    origin = {"folder": str(folder), "mlflow_run_id": summary.get("mlflow_run_id"),
              "run_name": summary.get("run_name"), "epochs_run": summary.get("epochs_run"),
              "best_epoch": summary.get("best_epoch")}
    return InitialWeights(state_dict=exported.model.state_dict(), origin=origin)


def read_summary(folder: Path) -> dict[str, Any]:
    """train.json alone (no weights loaded)."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no exported model; run `mixer train` (or `dvc repro train`) first")
    return _summary(_Files(folder, None))


def annotate(folder: Path, **fields: Any) -> None:
    """Add fields to the summary (e.g. the MLflow model URI, known only after the export)."""
    summary = {**read_summary(folder), **fields}
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def load(folder: Path, source: str | None = None) -> Exported:
    """Rebuild the model from `folder` (written by `save`); any fault is one ExportError line.

    `source` names the folder in errors when it is a downloaded copy (an MLflow model URI); its
    path otherwise.
    """
    files = _Files(folder, source)
    if not (folder / WEIGHTS_FILE).is_file():
        if source is None:
            raise ExportError(f"{folder / WEIGHTS_FILE}: no exported model; run `mixer train` (or `dvc repro "
                              f"train`) first")
        raise files.error(WEIGHTS_FILE, "missing")
    payload = _payload(files)
    model_config = _model_config(files, payload["model_config"])
    mean, std = (_stats(files, key, payload[key], model_config.in_channels) for key in ("mean", "std"))
    state = payload["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise files.error(WEIGHTS_FILE, "not a mixer model export (state_dict is not a mapping of tensors)")
    model = build_model(model_config)
    mismatch = _mismatch(model, state, model_config)
    if mismatch:
        raise files.error(WEIGHTS_FILE, f"weights do not match their model config ({mismatch})")
    model.load_state_dict(state)
    summary = _summary(files)
    in_weights = {"model_config": dataclasses.asdict(model_config), "mean": list(mean), "std": list(std)}
    disagreement = _disagreement(summary, in_weights)
    if disagreement:
        raise files.error(SUMMARY_FILE, f"does not match {WEIGHTS_FILE} ({disagreement})")
    return Exported(model=model.eval(), config=model_config, mean=mean, std=std, summary=summary)


@dataclass(frozen=True)
class _Files:
    """How errors name the files of one export, and what they tell the user to do about it."""

    folder: Path
    source: str | None  # an MLflow model URI when the folder is a downloaded copy

    def error(self, name: str, problem: str) -> ExportError:
        where = str(self.folder / name) if self.source is None else f"{self.source} ({name})"
        return ExportError(f"{where}: {problem}; {RE_EXPORT if self.source is None else REPLACE_LOGGED}")


def _payload(files: _Files) -> dict[str, Any]:
    path = files.folder / WEIGHTS_FILE
    if path.stat().st_size == 0:
        raise files.error(WEIGHTS_FILE, "empty file (an interrupted copy?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never executes code from the file
    except pickle.UnpicklingError as err:  # what weights_only raises for anything but tensors and plain data
        reason = _refusal(err)
        raise files.error(WEIGHTS_FILE, f"refused: it holds more than tensors and plain data ({reason}), so "
                                        f"loading it could run code; do not use this file") from None
    except Exception as err:  # truncated, not a torch file at all: torch raises nearly anything
        first = _one_line(err).split(". ")[0]  # torch goes on for several sentences
        raise files.error(WEIGHTS_FILE, f"not a readable model file ({type(err).__name__}: {first})"
                          ) from None
    missing = [key for key in PAYLOAD_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise files.error(WEIGHTS_FILE, f"not a mixer model export (no {missing[0]})")
    return payload


def _refusal(err: pickle.UnpicklingError) -> str:
    """What torch's long weights_only message says was refused, in a few words."""
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text)  # e.g. "Unsupported global: GLOBAL posix.system"
    if named:
        return f"a reference to {named.group(1)}"
    operand = re.search(r"Unsupported operand \d+", text)
    return operand.group(0) if operand else "refused by the weights-only unpickler"


def _model_config(files: _Files, raw: Any) -> ModelConfig:
    try:
        return config._build(ModelConfig, raw, "model_config.", files.folder)  # the checks of params.yaml
    except config.ConfigError as err:
        raise files.error(WEIGHTS_FILE, f"invalid model config ({err})") from None


def _stats(files: _Files, key: str, raw: Any, channels: int) -> tuple[float, float, float]:
    ok = (isinstance(raw, list) and len(raw) == channels
          and all(isinstance(v, float) and math.isfinite(v) and (key == "mean" or v > 0) for v in raw))
    if not ok:
        rule = f"{channels} finite numbers{', each > 0' if key == 'std' else ''}"
        raise files.error(WEIGHTS_FILE, f"invalid normalization stats ({key}: {rule}, got {raw!r:.80})")
    return tuple(raw)  # type: ignore[return-value]  # one per channel: three for RGB


def _summary(files: _Files) -> dict[str, Any]:
    path = files.folder / SUMMARY_FILE
    if not path.is_file():
        raise files.error(SUMMARY_FILE, "missing (the export is incomplete)")
    try:
        summary = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise files.error(SUMMARY_FILE, f"not valid JSON ({_one_line(err)})") from None
    if not isinstance(summary, dict):
        raise files.error(SUMMARY_FILE, f"expected a JSON object, got {type(summary).__name__}")
    return summary


def _mismatch(model: MlpMixer, state: Mapping[str, torch.Tensor], model_config: ModelConfig) -> str | None:
    """What differs between the config's model and the saved tensors, in config terms if possible."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    saved = {key: tuple(t.shape) for key, t in state.items()}
    if saved == expected:
        return None
    implied = _implied_config(saved)
    for name in SHAPE_FIELDS:
        if name in implied and implied[name] != getattr(model_config, name):
            return f"{name}={getattr(model_config, name)} but the weights have {implied[name]}"
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or extra:
        parts = [f"{label} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
                 for label, keys in (("no tensor", missing), ("unexpected tensor", extra)) if keys]
        return "; ".join(parts)
    key = next(key for key in expected if saved[key] != expected[key])
    return f"{key} has shape {saved[key]}, the config needs {expected[key]}"


def _implied_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The config fields that the tensor shapes of an MlpMixer state dict give away."""
    implied: dict[str, int] = {}
    stem = shapes.get("stem.weight")  # (hidden_dim, in_channels, patch, patch)
    if stem is not None and len(stem) == 4:
        implied.update(hidden_dim=stem[0], in_channels=stem[1], patch_size=stem[2])
    blocks = {int(match.group(1)) for key in shapes if (match := re.match(r"blocks\.(\d+)\.", key))}
    if blocks:
        implied["num_blocks"] = len(blocks)
    tokens = shapes.get("blocks.0.token_mlp.fc1.weight")  # (tokens_mlp_dim, num_patches)
    if tokens is not None and len(tokens) == 2:
        implied["tokens_mlp_dim"] = tokens[0]
        side = math.isqrt(tokens[1])
        if side * side == tokens[1] and "patch_size" in implied:
            implied["image_size"] = side * implied["patch_size"]
    channels = shapes.get("blocks.0.channel_mlp.fc1.weight")  # (channels_mlp_dim, hidden_dim)
    if channels is not None and len(channels) == 2:
        implied["channels_mlp_dim"] = channels[0]
    head = shapes.get("head.weight")  # (num_classes, hidden_dim)
    if head is not None and len(head) == 2:
        implied["num_classes"] = head[0]
    return implied


def _disagreement(summary: Mapping[str, Any], in_weights: Mapping[str, Any]) -> str | None:
    """The first value train.json states differently from model.pt; None when they agree.

    A model_config field that train.json leaves out (an export older than the field) is no conflict.
    """
    for key, value in in_weights.items():
        if key not in summary:
            continue
        stated = summary[key]
        if key == "model_config" and isinstance(stated, dict):
            field = next((f for f in stated if f not in value or stated[f] != value[f]), None)
            if field is not None:
                return (f"{field}={stated[field]!r} in {SUMMARY_FILE} but {value.get(field, '(absent)')!r} "
                        f"in {WEIGHTS_FILE}")
        elif stated != value:
            return f"{key} {stated!r:.80} in {SUMMARY_FILE} but {value!r:.80} in {WEIGHTS_FILE}"
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
