"""`mixer train-offline`: the worker loop alone, on this machine's own device.

For a machine that has torch and nothing else, like a lent GPU with no network: no Ray, no MLflow,
no DVC. It runs the loop a Ray Train worker runs (mixer.loop.train_loop) on one device, checks the
data against dvc.lock by hashing it as DVC does, keeps checkpoints in a folder (started again with
the same folder and params, a run resumes), and exports the epoch with the lowest val loss to
train.models_dir in the format `mixer train` writes, with no MLflow run. Where MLflow is, `mixer
evaluate --weights DIR` then `mixer register --from DIR` log and register it like a run whose
tracking server was down.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixer import config, data, export, lockfile
from mixer.atomic import atomic_write_bytes, atomic_write_text
from mixer.config import Config
from mixer.epochs import ProgressLine, TrainingError, stop_if_diverged
from mixer.redaction import logged_config
from mixer.loop import train_loop

LATEST_FILE = "latest.pt"  # every epoch's checkpoint, to resume from
BEST_FILE = "best.pt"  # the checkpoint with the lowest val loss so far, to export
PARAMS_FILE = "params.json"  # the run's resolved config: a resume must use the same


@dataclass(frozen=True)
class OfflineResult:
    models_dir: Path
    best_epoch: int
    history: list[dict[str, float]]
    checkpoints: Path

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


class ModifiedDataError(data.DataError):
    """The prepared data is not the version dvc.lock records: one line."""


def train_offline(cfg: Config, device: torch.device, checkpoints: Path | None = None) -> OfflineResult:
    """Train on `device`, checkpointing to `checkpoints` (default: runs/offline/<run name> in the
    project, a local folder even where ray.storage_path is a URI); export the best epoch to
    train.models_dir."""
    cfg = config.replace(cfg, {"train.run_name": cfg.train.run_name or f"offline-{time.strftime('%Y%m%d-%H%M%S')}"})
    folder = checkpoints or cfg.root / "runs" / "offline" / cfg.train.run_name
    initial = export.read_initial_weights(cfg)  # a wrong folder is refused before the data is hashed
    data_version = check_data(cfg)
    train, val = data.load_split(cfg.data.out_dir, "train"), data.load_split(cfg.data.out_dir, "val")
    meta = data.load_meta(cfg.data.out_dir)
    if device.type == "cpu":  # as Ray sets a CPU worker's threads from its CPUs
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    params = json.loads(json.dumps(logged_config(cfg)))  # as params.json holds them: lists, not tuples
    session = FolderSession(device, folder, params, ProgressLine(cfg.train.epochs))
    print(f"run {cfg.train.run_name} on {device}: checkpoints in {folder}"
          f"{' (resuming)' if session.resumes else ''}", flush=True)
    train_loop(cfg, train, val, meta["mean"], meta["std"], session,
               initial_weights=initial.state_dict if initial else None)
    best = session.best_checkpoint()
    history = session.last_state["history"]  # every epoch, also those after the best one
    export.save(cfg.train.models_dir, best["model"], cfg.model, meta["mean"], meta["std"],
                info=export.training_info(cfg, best, history, meta, data_version, None,
                                          initial.origin if initial else None, device.type, num_workers=1))
    return OfflineResult(cfg.train.models_dir, best["state"]["epoch"], history, folder)


def check_data(cfg: Config) -> str:
    """The DVC version of data.out_dir, refused (one line) when dvc.lock records another one."""
    if not (cfg.data.out_dir / "meta.json").is_file():
        raise data.DataError(f"{cfg.data.out_dir}: no prepared data; run `mixer ingest` first (data.url may be a "
                             f"local copy of the archive)")
    version = lockfile.folder_version(cfg.data.out_dir)
    recorded = lockfile.data_version(cfg.root, cfg.data.out_dir)
    if recorded is not None and recorded != version:
        raise ModifiedDataError(f"{cfg.data.out_dir}: md5 {version}, but {lockfile.LOCK_FILE} records {recorded}; "
                                f"prepare it again from the archive and data.* that dvc.lock names (`mixer ingest`)")
    return version


class FolderSession:
    """A one-process worker session (mixer.loop.WorkerSession) that keeps its checkpoints in a folder:
    the latest, to resume from, and the one with the lowest val loss, to export."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device, folder: Path, params: dict[str, Any],
                 *handlers: Callable[[dict[str, Any]], None]) -> None:
        self.device = device
        self.folder = folder
        self.handlers = handlers
        self.resumes = (folder / LATEST_FILE).is_file()
        self.last_state: dict[str, Any] = {"best_val_loss": math.inf, "history": []}
        saved = folder / PARAMS_FILE
        if self.resumes and saved.is_file():
            _refuse_other_params(folder, json.loads(saved.read_text()), params)
        elif not self.resumes:
            atomic_write_text(saved, json.dumps(params, indent=2, sort_keys=True) + "\n")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        if not self.resumes:
            return None
        checkpoint = _load(self.folder / LATEST_FILE)
        self.last_state = checkpoint["state"]
        return checkpoint

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None:  # saved before the epoch is printed: a printed epoch is never lost
            encoded = _encode(checkpoint)
            if metrics["val_loss"] < self.last_state["best_val_loss"]:
                atomic_write_bytes(self.folder / BEST_FILE, encoded)
            atomic_write_bytes(self.folder / LATEST_FILE, encoded)  # after the best: a crash between keeps both right
            self.last_state = checkpoint["state"]
        for handler in self.handlers:
            handler(metrics)
        stop_if_diverged(metrics)  # a diverged epoch comes without a checkpoint: nothing is exported

    def best_checkpoint(self) -> dict[str, Any]:
        if not (self.folder / BEST_FILE).is_file():
            raise TrainingError(f"{self.folder}: no checkpoint, so no epoch finished; nothing to export")
        return _load(self.folder / BEST_FILE)


def _refuse_other_params(folder: Path, saved: Any, current: Any, key: str = "") -> None:
    """One line naming the first setting that differs from the run the checkpoints belong to."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in sorted(set(saved) | set(current)):
            _refuse_other_params(folder, saved.get(name), current.get(name), f"{key}.{name}" if key else name)
    elif saved != current:
        raise config.ConfigError(f"{folder}: these checkpoints are of a run with other params ({key}: {saved} -> "
                                 f"{current}); resume with the same params, or pick another train.run_name")


def _encode(checkpoint: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
