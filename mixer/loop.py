"""The per-worker training loop: a plain function, free of Ray, MLflow and DVC.

The loop talks to the outside world only through a `WorkerSession`: `training.RaySession` on a
Ray Train worker, `LocalSession` in one process without Ray (benchmarks, quick tests, a GPU
machine with nothing but torch). Every rank calls `report` once per epoch; only rank 0 hands over
checkpoints.

Speed (see docs/PERFORMANCE.md): the split lives on the device as uint8; augmentation runs on
whole batches there; per-step metrics accumulate on the device and are read once per epoch (no
host sync per step); optional bf16 autocast and torch.compile; a fused AdamW where the device
has one.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mixer import data
from mixer.augment import augment_batch, mix_batch, normalize
from mixer.config import Config
from mixer.evaluation import topk_hits
from mixer.model import build_model


class WorkerSession(Protocol):
    """What the loop needs from its runtime: who it is, where it runs, how it reports."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], checkpoint: dict[str, Any] | None) -> None: ...


def train_loop(cfg: Config, train: data.Split, val: data.Split, mean: Sequence[float],
               std: Sequence[float], session: WorkerSession,
               initial_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Train on this rank's shard, evaluate val across ranks, report and checkpoint every epoch.

    `initial_weights` (train.init_from) replace the random initial weights; a checkpoint to resume
    from replaces both.
    """
    t = cfg.train
    device = session.device
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = build_model(cfg.model)  # saved and validated: never a wrapper's prefixed names
    if initial_weights is not None:  # before DDP's broadcast and the EMA's copy, which both start from them
        raw_model.load_state_dict(initial_weights)
    raw_model.to(device)
    model = session.prepare_model(raw_model)
    optimizer = adamw(model.parameters(), t.lr, t.weight_decay, device)
    # The weights validated, checkpointed as "model" and exported: an EMA of the trained ones, or them.
    ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay)) if t.ema_decay else None
    evaluated = ema.module if ema is not None else raw_model

    global_batches = len(train) // t.batch_size  # the last partial batch is dropped: equal steps on all ranks
    steps_per_epoch = min(global_batches, t.limit_train_batches or global_batches)
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    state = {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0, "history": []}

    resumed = session.latest_checkpoint()
    if resumed is not None:
        raw_model.load_state_dict(resumed["trained"] if ema is not None else resumed["model"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        state = resumed["state"]

    # Copies: arrays from the Ray object store are read-only. (N, H, W, C) uint8, resident on the device.
    train_images = torch.as_tensor(np.array(train.images), device=device)
    train_labels = torch.as_tensor(np.array(train.fine_labels), device=device)
    local_batch = t.batch_size // session.world_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    if t.precision == "bf16" and session.rank == 0:
        warn_if_bf16_is_emulated(device)
    if t.compile:
        example = normalize(train_images[:local_batch], mean, std)
        model = compiled_or_eager(model, lambda m: _probe_step(m, example, autocast))

    for epoch in range(state["epoch"], t.epochs):
        started = time.perf_counter()
        # Every source of randomness derives from (seed, epoch, rank), so a resumed run replays
        # exactly what an uninterrupted one would have done, with no RNG state to save.
        torch.manual_seed(_seed(t.seed, epoch, session.rank))  # dropout
        augment_rng = torch.Generator(device).manual_seed(_seed(t.seed, epoch, session.rank))
        mix_rng = np.random.default_rng(_seed(t.seed, epoch, session.rank, 1))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_seed(t.seed, epoch)))
        shard = order[: global_batches * t.batch_size][session.rank :: session.world_size].to(device)

        model.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, top-1 hits, n
        for step in range(steps_per_epoch):
            idx = shard[step * local_batch : (step + 1) * local_batch]
            x = augment_batch(normalize(train_images[idx], mean, std), t.augment, augment_rng)
            y = train_labels[idx]
            mixed = mix_batch(x, y, t.augment, mix_rng)
            with autocast:
                logits = model(mixed.x)
                loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
                if mixed.lam < 1.0:
                    loss = mixed.lam * loss + (1.0 - mixed.lam) * F.cross_entropy(
                        logits, mixed.y_b, label_smoothing=t.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(raw_model)
            if t.schedule == "cosine":
                scheduler.step()
            # Accumulate on the device: no host sync per step.
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        _all_reduce_sum(sums)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU steps run asynchronously: time them, not their launch
        train_seconds = time.perf_counter() - started
        val_loss, val_top1, val_top5 = _validate(evaluated, val, mean, std, cfg, session)

        train_loss = float(sums[0] / sums[2])  # the epoch's one host sync (identical on every rank)
        # A nan/inf loss never recovers: stop on every rank at once, and keep its weights out of the
        # checkpoints so that the last good epoch stays the one to resume from.
        diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
        if t.schedule == "plateau" and not diverged:
            scheduler.step(val_loss)
        improved = val_loss < state["best_val_loss"]
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_top1": float(sums[1] / sums[2]),
            "val_loss": val_loss,
            "val_top1": val_top1,
            "val_top5": val_top5,
            "lr": lr,
            "epoch_seconds": train_seconds,  # training only, not validation
            # Per rank: equal on every rank when DDP keeps the replicas in step.
            "weights_checksum": _checksum(raw_model),
        }
        state = {"epoch": epoch + 1, "best_val_loss": val_loss if improved else state["best_val_loss"],
                 "bad_epochs": 0 if improved else state["bad_epochs"] + 1,
                 "history": [*state["history"], metrics]}
        stop = t.early_stopping_patience > 0 and state["bad_epochs"] >= t.early_stopping_patience
        checkpoint = None
        if session.rank == 0 and not diverged:
            checkpoint = {"model": evaluated.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "state": state}
            if ema is not None:  # to resume: the trained weights and the average's own state
                checkpoint.update(trained=raw_model.state_dict(), ema=ema.state_dict())
        session.report({**metrics, "early_stopped": stop, "diverged": diverged}, checkpoint)
        if stop or diverged:
            break


@torch.no_grad()
def _validate(model: nn.Module, val: data.Split, mean: Sequence[float], std: Sequence[float], cfg: Config,
              session: WorkerSession) -> tuple[float, float, float]:
    """Loss, top-1 and top-5 on the val split, each rank scoring its slice, summed across ranks."""
    model.eval()
    device = session.device
    rows = np.arange(session.rank, len(val), session.world_size)
    batch = cfg.eval.batch_size
    batches = math.ceil(len(rows) / batch)
    if cfg.train.limit_eval_batches:
        batches = min(batches, cfg.train.limit_eval_batches)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits, n
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    for b in range(batches):
        take = rows[b * batch : (b + 1) * batch]
        x = normalize(torch.as_tensor(val.images[take], device=device), mean, std)
        y = torch.as_tensor(val.fine_labels[take], device=device)
        with autocast:
            logits = model(x).float()
        # Summed on the device, read once after the last batch: no host sync per batch.
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += topk_hits(logits, y, 1)
        sums[2] += topk_hits(logits, y, 5)
        sums[3] += len(y)
    _all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return float(sums[0]) / n, float(sums[1]) / n, float(sums[2]) / n


def adamw(params: Any, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter update on CPU and CUDA (the multi-tensor form elsewhere).

    The update is the same; on a GPU the unfused form is dozens of small kernel launches per step.
    On this project's 2-core CPU the `seed` model's step takes 0.33 ms fused against 1.78 ms.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if device.type in ("cpu", "cuda") else None)


def warn_if_bf16_is_emulated(device: torch.device) -> None:
    """Warn when bf16 autocast would run on a CPU where oneDNN has no bf16 support (no AVX-512).

    Autocast then falls back to slow paths, many times slower than fp32: a `nano` step (batch 128, 2 threads) took
    16.3 s in bf16 against 0.89 s in fp32 on an AVX2-only AMD EPYC (docs/PERFORMANCE.md), while
    bf16 is 1.1-1.6x faster than fp32 on the avx512_bf16 EPYC this project was first measured on.
    """
    if device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn(f"train.precision=bf16 on a CPU without bf16 support in oneDNN "
                      f"({torch.backends.cpu.get_cpu_capability()}): many times slower than fp32 here; "
                      f"use train.precision=fp32", RuntimeWarning, stacklevel=2)


def cpu_has_native_bf16() -> bool | None:
    """Whether oneDNN supports bf16 on this CPU (PyTorch's own test; Inductor asks it too), or None
    for a build without oneDNN, where there is no telling."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def compiled_or_eager(model: nn.Module, probe: Callable[[nn.Module], None]) -> nn.Module:
    """torch.compile(model), or `model` itself where compiling fails (no C++ compiler, no Triton,
    an unsupported platform), with a warning.

    Compiling is lazy: `probe` runs a first step through the compiled model, so that a failure
    shows here rather than mid-epoch, and the compiled kernels are then reused. The caller keeps
    saving the uncompiled module, whose parameter names carry no `_orig_mod.` prefix.
    """
    try:
        compiled = torch.compile(model, dynamic=False)  # fixed batch shapes: the last partial batch is dropped
        probe(compiled)
    except Exception as err:  # torch raises many kinds here (BackendCompilerFailed, OSError, ...)
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile is not available here ({type(err).__name__}: {first_line}); "
                      f"training without it", RuntimeWarning, stacklevel=2)
        return model
    finally:
        model.zero_grad(set_to_none=True)  # the probe's gradients are not a training step's
    return compiled


def _probe_step(model: nn.Module, x: torch.Tensor, autocast: torch.autocast) -> None:
    """A forward and backward pass in training mode, leaving no trace but gradients."""
    model.train()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), autocast:
        model(x).float().sum().backward()


def _scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    t = cfg.train
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=t.plateau_factor,
                                                          patience=t.plateau_patience)
    warmup = t.warmup_epochs * steps_per_epoch  # in optimizer steps
    total = max(t.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


@dataclass
class LocalSession:
    """One process, no Ray: for benchmarks and tests of the loop itself."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self.last_checkpoint: dict[str, Any] | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self.last_checkpoint

    def report(self, metrics: dict[str, float], checkpoint: dict[str, Any] | None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None:  # a snapshot, as a saved file would be: state_dict() shares tensors
            self.last_checkpoint = copy.deepcopy(checkpoint)
