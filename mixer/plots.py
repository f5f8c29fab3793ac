"""Training curves and confusion matrix as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend), so these
work headless and importing this module does not import matplotlib at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

DPI = 100


def training_curves_png(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch (left; right), the learning rate on the loss panel's right axis."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]

    def series(key: str, scale: float = 1.0) -> list[float] | None:
        if not history or any(row.get(key) is None for row in history):
            return None
        return [float(row[key]) * scale for row in history]

    fig = Figure(figsize=(11, 4.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        values = series(key)
        if values is not None:
            loss_ax.plot(epochs, values, marker=".", label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (nats)")
    lr = series("lr")
    if lr is not None:
        lr_ax = loss_ax.twinx()
        lr_ax.plot(epochs, lr, color="gray", linestyle="--", linewidth=1, label="lr")
        if min(lr) > 0:
            lr_ax.set_yscale("log")  # plateau halvings and cosine tails read as steps, not a flat line
        lr_ax.set_ylabel("learning rate", color="gray")
        lr_ax.tick_params(axis="y", colors="gray")
    loss_ax.legend(loc="upper right")
    loss_ax.grid(alpha=0.3)

    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        values = series(key, scale=100.0)
        if values is not None:
            acc_ax.plot(epochs, values, marker=".", label=label)
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    acc_ax.legend(loc="lower right")
    acc_ax.grid(alpha=0.3)

    fig.tight_layout()
    _save(fig, path)


def confusion_matrix_png(confusion: np.ndarray | torch.Tensor, path: Path,
                         class_names: list[str] | None = None) -> None:
    """Heatmap of the row-normalized confusion matrix: cell (i, j) = share of class i predicted as j."""
    from matplotlib.figure import Figure

    counts = confusion.cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    counts = counts.astype(np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)  # a class with no examples: 0
    n = rates.shape[0]

    fig = Figure(figsize=(10, 9))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set(title=f"Confusion matrix (row-normalized, {int(counts.sum())} images)",
           xlabel="predicted class", ylabel="true class")
    if class_names is not None:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=4)
        ax.set_yticks(range(n), class_names, fontsize=4)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
