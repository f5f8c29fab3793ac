"""fit(): Ray Train's TorchTrainer around the per-worker loop (mixer.loop), tracked in MLflow.

`RaySession` is the loop's runtime on a Ray Train worker. The driver side observes the workers'
reports through Ray Train callbacks and never the workers' internals.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback

# Every Ray worker imports this module to run train_loop. MLflow and DVC (seconds of imports per
# worker start) are needed only on the driver: its functions import tracking, serving and versioning
# where they use them.
from mixer import config, data, export
from mixer.background import Background
from mixer.config import Config
from mixer.loop import train_loop
from mixer.epochs import ProgressLine, TrainingError, stop_if_diverged
from mixer.progress import EpochLog, OnEpoch
from mixer.ray_cluster import connect

CHECKPOINT_FILE = "checkpoint.pt"


# --- the Ray runtime --------------------------------------------------------------------------


class RaySession:
    """A Ray Train worker: rank, device, DDP and checkpoints from ray.train."""  # Ray-specific

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()  # in every report: who trained where

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    def latest_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return _read_checkpoint(Path(folder))

    def report(self, metrics: dict[str, float], checkpoint: dict[str, Any] | None) -> None:
        metrics = {**metrics, "node_id": self.node_id}
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(checkpoint, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker."""  # Ray-specific
    train_split, val_split = ray.get([loop_config["train"], loop_config["val"]])
    initial = loop_config["initial_weights"]
    train_loop(loop_config["config"], train_split, val_split, loop_config["mean"], loop_config["std"],
               RaySession(), initial_weights=ray.get(initial) if initial is not None else None)


def _read_checkpoint(folder: Path) -> dict[str, Any]:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


# --- the driver -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    models_dir: Path
    best_epoch: int
    history: list[dict[str, float]]
    run_id: str  # the MLflow run
    model_uri: str  # the logged MLflow model of the best epoch

    @property
    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


@dataclass(frozen=True)
class TrainingInputs:
    """What training reads, loaded once by the driver.

    The splits sit in the Ray object store: workers on any node fetch them from there, never from
    a path that exists only on the driver.
    """

    train: ray.ObjectRef
    val: ray.ObjectRef
    meta: dict[str, Any]  # mean, std, class names, counts
    example_images: np.ndarray  # two val images: the MLflow model's input example
    data_version: str | None
    initial_weights: ray.ObjectRef | None = None  # train.init_from's state dict
    init_origin: dict[str, Any] | None = None  # where those weights came from (export.InitialWeights.origin)


@dataclass(frozen=True)
class LocalInputs:
    """The checked splits in the driver's memory, before they go to the object store."""

    train: data.Split
    val: data.Split
    meta: dict[str, Any]
    data_version: str | None
    initial: export.InitialWeights | None = None


def read_inputs(cfg: Config) -> LocalInputs:
    """Check the prepared data against dvc.lock, then read it, and train.init_from's weights. Needs no
    Ray: `mixer train` runs it while Ray starts."""
    from mixer import versioning

    initial = export.read_initial_weights(cfg)  # a wrong folder is refused before the data is even checked
    data_version = versioning.check_data_matches_lock(cfg.root, cfg.data.out_dir)  # before any split is read
    return LocalInputs(train=data.load_split(cfg.data.out_dir, "train"), val=data.load_split(cfg.data.out_dir, "val"),
                       meta=data.load_meta(cfg.data.out_dir), data_version=data_version, initial=initial)


def load_inputs(cfg: Config, local: LocalInputs | None = None) -> TrainingInputs:
    """Put the splits in the object store (connect() first), reading them first unless `local` holds them."""
    local = local or read_inputs(cfg)
    initial = local.initial
    return TrainingInputs(train=ray.put(local.train), val=ray.put(local.val), meta=local.meta,
                          example_images=local.val.images[:2].copy(), data_version=local.data_version,
                          initial_weights=ray.put(initial.state_dict) if initial else None,
                          init_origin=initial.origin if initial else None)


def fit(cfg: Config, callbacks: Sequence[UserCallback] = (), inputs: TrainingInputs | None = None) -> FitResult:
    """Train with Ray Train, tracked as one MLflow run; export the best epoch to models_dir and log it.

    Every run has a name (train.run_name, else a generated one): an interrupted run resumes from its
    last checkpoint when started again with that name. The best epoch reaches models_dir before
    MLflow sees it, so a tracking server that is down loses nothing: `mixer register --from` logs and
    registers the folder later.
    """
    from mixer import tracking

    cfg = config.replace(cfg, {"train.run_name": cfg.train.run_name or unique_name("mixer")})
    device = "cuda" if cfg.ray.use_gpu else "cpu"
    connect(cfg)
    inputs = inputs or load_inputs(cfg)
    run_id = tracking.start_training_run_if_reachable(cfg, inputs.data_version, device)  # None: untracked
    try:
        with _sigterm_interrupts() as received:
            best_state, history = _on_helper_thread(run_trainer, cfg, inputs, [on_epoch(cfg, run_id), *callbacks])
    except BaseException as err:
        failure = _explain(cfg, err, received)
        if run_id:
            tracking.end_run_quietly(cfg, run_id, "KILLED" if isinstance(failure or err, KeyboardInterrupt)
                                     else "FAILED")
        if failure is None:
            raise
        raise failure from None
    best_epoch = best_state["state"]["epoch"]
    best = history[best_epoch - 1]
    save_best(cfg, inputs, best_state, history, run_id, cfg.train.models_dir)
    if run_id is None:
        raise tracking.TrackingUnavailable(tracking.register_later(cfg, cfg.train.models_dir, "was unreachable"))
    try:
        tracking.log_history(cfg, run_id, history)  # epochs the live log missed (a server hiccup)
        model_uri = log_best(cfg, inputs, run_id, cfg.train.models_dir)
        tracking.finish_training_run(cfg, run_id, {"best_val_top1": best["val_top1"],
                                                   "best_val_loss": best["val_loss"], "best_epoch": best_epoch},
                                     cfg.train.models_dir, model_uri)
    except Exception as err:
        raise tracking.TrackingUnavailable(tracking.register_later(
            cfg, cfg.train.models_dir, f"failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})")) from err
    return FitResult(cfg.train.models_dir, best_epoch, history, run_id, model_uri)


def on_epoch(cfg: Config, run_id: str | None) -> OnEpoch:
    """What the controller does with each epoch: print it, log it to the MLflow run (if any), stop on nan.

    The controller unpickles this as it starts: everything in it comes from mixer.progress, which
    imports no torch and no MLflow (tests/unit/test_startup.py).
    """
    handlers: list[Callable[[dict[str, Any]], None]] = [ProgressLine(cfg.train.epochs)]
    if run_id:
        handlers.append(EpochLog(cfg.mlflow.tracking_uri, run_id))
    handlers.append(stop_if_diverged)  # after logging: the nan epoch shows in the curves
    return OnEpoch(*handlers)


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (a full disk)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while training; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _on_helper_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a helper thread, so that Ctrl-C and SIGTERM reach this (main) thread.

    On the main thread, Ray Train installs its own SIGINT handler, which aborts the run and exits
    the process with status 0; here the interrupt is raised instead, so that fit() closes the MLflow
    run as KILLED and says how to resume.
    """
    return Background(fn, *args, name="mixer-fit").result()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """Within the block, SIGTERM interrupts like Ctrl-C; yields the signals received.

    Ray's driver installs a SIGTERM handler that only exits, which would leave the MLflow run
    RUNNING and no word on how to resume. Only the main thread can handle signals.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _explain(cfg: Config, err: BaseException, signals: Sequence[int] = ()) -> BaseException | None:
    """The one-line error for a failure the user can act on; None for anything else."""
    resume = f"rerun the same command with train.run_name={cfg.train.run_name} to resume"
    if isinstance(err, KeyboardInterrupt):
        return TrainingInterrupted(f"interrupted: each finished epoch is checkpointed in "
                                   f"{cfg.ray.storage_path}/{cfg.train.run_name}; {resume}",
                                   signals[0] if signals else signal.SIGINT)
    for cause in _causes(err):
        if isinstance(cause, TrainingError):
            return cause
        if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left on device" in str(cause):
            return CheckpointWriteError(
                f"no space left on the device while writing a checkpoint to {cfg.ray.storage_path}: the "
                f"checkpoints of earlier epochs are intact; free some space, then {resume}")
    return None


def _causes(err: BaseException) -> Iterator[BaseException]:
    """err and everything it wraps: chained exceptions, Ray Train's controller and worker failures."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "controller_failure", None),
                   getattr(current, "cause", None), *getattr(current, "worker_failures", {}).values()]
        pending.extend(e for e in wrapped if isinstance(e, BaseException))


def export_best(cfg: Config, inputs: TrainingInputs, best_state: dict[str, Any], history: list[dict[str, float]],
                run_id: str, models_dir: Path) -> str:
    """Write the best epoch to `models_dir` and log it as the MLflow model of `run_id`; returns its URI."""
    save_best(cfg, inputs, best_state, history, run_id, models_dir)
    return log_best(cfg, inputs, run_id, models_dir)


def save_best(cfg: Config, inputs: TrainingInputs, best_state: dict[str, Any], history: list[dict[str, float]],
              run_id: str | None, models_dir: Path) -> None:
    """Write the best epoch to `models_dir` (atomically), with what registering it later needs."""
    export.save(models_dir, best_state["model"], cfg.model, inputs.meta["mean"], inputs.meta["std"],
                info=export.training_info(cfg, best_state, history, inputs.meta, inputs.data_version, run_id,
                                          inputs.init_origin, device="cuda" if cfg.ray.use_gpu else "cpu",
                                          num_workers=cfg.ray.num_workers))


def log_best(cfg: Config, inputs: TrainingInputs, run_id: str, models_dir: Path) -> str:
    """Log `models_dir` as the MLflow model of `run_id`; returns its URI (also noted in the folder)."""
    from mixer import serving, tracking

    with tracking.active(cfg, run_id):
        model_uri = serving.log_model(models_dir, inputs.example_images)
    export.annotate(models_dir, mlflow_model_uri=model_uri)
    return model_uri


def run_trainer(cfg: Config, inputs: TrainingInputs, callbacks: Sequence[UserCallback],
                name: str | None = None) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Run the TorchTrainer; returns (best checkpoint by val loss, the full per-epoch history)."""
    loop_config = {"config": cfg, "train": inputs.train, "val": inputs.val,
                   "mean": inputs.meta["mean"], "std": inputs.meta["std"], "initial_weights": inputs.initial_weights}
    trainer = ray.train.torch.TorchTrainer(
        _ray_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,  # NCCL between GPU workers, gloo between CPU workers
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker,
                                  **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {})},
        ),
        run_config=RunConfig(
            # The same name in the same storage resumes from that run's latest checkpoint.
            name=name or cfg.train.run_name or unique_name("mixer"),
            storage_path=cfg.ray.storage_path,
            # Keeps the best epoch by val loss; Ray always keeps the latest as well, for restarts.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            # A dead worker restarts the group from the latest checkpoint (train_loop resumes).
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    with _checkpoint_dir(result.checkpoint) as folder:
        history = _read_checkpoint(folder)["state"]["history"]
    return read_checkpoint(result.get_best_checkpoint(metric="val_loss", mode="min")), history


def run_sweep_trial(trial: dict[str, Any], base: Config, sweep_name: str, inputs: TrainingInputs) -> None:
    """One trial of `mixer sweep`, in a Ray Tune actor anywhere on the cluster: a Ray Train run that
    reports every epoch to Tune (so ASHA can stop it). Here rather than in sweep.py, which imports
    MLflow: trial actors stay as light to start as Train workers."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, sweep_name, ray.tune.get_context().get_trial_id(), trial["overrides"])
    run_trainer(cfg, inputs, [TuneReportCallback()])


def trial_config(base: Config, sweep_name: str, trial_id: str, overrides: Mapping[str, Any]) -> Config:
    """A sweep trial's config: the base with the trial's sampled values, named after sweep and trial."""
    return config.replace(base, {**overrides, "train.run_name": f"{sweep_name}-{trial_id}"})


def read_checkpoint(checkpoint: ray.train.Checkpoint | None) -> dict[str, Any]:
    """A checkpoint's contents, fetched from wherever its storage is (shared disk, s3://, ...)."""
    with _checkpoint_dir(checkpoint) as folder:
        return _read_checkpoint(folder)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"


@contextlib.contextmanager
def _checkpoint_dir(checkpoint: ray.train.Checkpoint | None) -> Iterator[Path]:
    if checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with checkpoint.as_directory() as folder:
        yield Path(folder)
