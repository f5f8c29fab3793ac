"""What any trainer does with the metrics of an epoch: print them, and stop when the loss diverged.

Shared by the Ray Train controller (mixer.progress) and `mixer train-offline`; imports nothing but
the standard library, so both stay light.
"""

from __future__ import annotations

from typing import Any

EPOCH_METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds")


class TrainingError(ValueError):
    """Training stopped for a reason the user can act on; the message says what to do."""


class TrainingDiverged(TrainingError):
    """The loss became nan or inf."""


class ProgressLine:
    """One console line per epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def __call__(self, m: dict[str, Any]) -> None:
        print(f"epoch {m['epoch']:>3}/{self.epochs}  train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2%}"
              f"  val loss {m['val_loss']:.4f} top1 {m['val_top1']:.2%} top5 {m['val_top5']:.2%}"
              f"  lr {m['lr']:.2e}  {m['epoch_seconds']:.1f}s", flush=True)


def stop_if_diverged(metrics: dict[str, Any]) -> None:
    """End the run at the first nan/inf epoch (the workers stopped already)."""
    if metrics.get("diverged"):
        raise TrainingDiverged(
            f"training diverged: train loss {metrics['train_loss']}, val loss {metrics['val_loss']} in epoch "
            f"{metrics['epoch']} (lr {metrics['lr']:.2e}); nothing was exported or registered; lower train.lr "
            f"or use train.precision=fp32 and train again")
