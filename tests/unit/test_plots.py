"""PNG files for training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixer.plots import confusion_matrix_png, training_curves_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_png(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 4.0 - e * 0.3, "val_loss": 4.1 - e * 0.25, "train_top1": 0.05 * e,
                "val_top1": 0.04 * e, "val_top5": 0.15 * e, "lr": 5e-3 / (1 + e)} for e in range(1, 6)]
    path = tmp_path / "plots" / "curves.png"
    training_curves_png(history, path)
    assert is_png(path)


def test_confusion_matrix_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, (100, 100)) + np.eye(100, dtype=np.int64) * 50
    confusion[7] = 0  # a class with no examples must not break row normalization
    names = [f"class_{i}" for i in range(100)]
    confusion_matrix_png(torch.as_tensor(confusion), tmp_path / "cm.png", class_names=names)
    confusion_matrix_png(confusion, tmp_path / "cm_plain.png")
    assert is_png(tmp_path / "cm.png") and is_png(tmp_path / "cm_plain.png")
