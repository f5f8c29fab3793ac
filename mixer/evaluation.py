"""Classification metrics as pure functions of (logits, labels), and evaluation of a model on a split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixer.augment import normalize


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the k highest logits."""
    return int(topk_hits(logits, labels, k))


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """topk_correct as a 0-dim tensor on the logits' device: summing it costs no host sync."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    return (top == labels.view(-1, 1)).any(dim=1).sum()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    flat = labels.long().view(-1) * num_classes + preds.long().view(-1)
    counts = torch.bincount(flat.cpu(), minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class (float64); NaN for a class with no examples."""
    totals = confusion.sum(dim=1).double()
    return confusion.diagonal().double() / totals


@dataclass
class EvalResult:
    top1: float  # fraction in [0, 1]
    top5: float  # fraction in [0, 1]
    loss: float  # mean cross-entropy, nats per image
    count: int  # images evaluated
    confusion: torch.Tensor  # (num_classes, num_classes) int64, row = true class

    @property
    def per_class(self) -> list[float]:
        return per_class_accuracy(self.confusion).tolist()

    def to_metrics(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}


@torch.no_grad()
def predict_logits(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], batch_size: int, device: torch.device | str = "cpu",
                   limit_batches: int = 0, flip_average: bool = False) -> torch.Tensor:
    """float32 logits on the CPU for uint8 (N, H, W, C) images; limit_batches 0 = all of them.

    flip_average: the mean of the logits of each image and of its mirror image (left-right), a
    test-time augmentation matching the training flips; it costs a second forward pass.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    images = torch.as_tensor(images_uint8)
    starts = range(0, images.shape[0], batch_size)
    if limit_batches > 0:
        starts = starts[:limit_batches]
    outputs = []
    try:
        for start in starts:
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            x = normalize(batch, mean, std)
            logits = model(x).float()
            if flip_average:
                logits = (logits + model(x.flip(3)).float()) / 2  # (B, C, H, W): W is dim 3
            outputs.append(logits.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def evaluate(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
             mean: Sequence[float], std: Sequence[float], batch_size: int,
             device: torch.device | str = "cpu", limit_batches: int = 0,
             num_classes: int = 100, flip_average: bool = False) -> EvalResult:
    """Top-1, top-5, mean loss and the confusion matrix over (the first limit_batches of) a split."""
    logits = predict_logits(model, images_uint8, mean, std, batch_size, device, limit_batches, flip_average)
    count = logits.shape[0]
    if count == 0:
        raise ValueError("evaluate: no images to evaluate")
    targets = torch.as_tensor(labels).long().cpu()[:count]
    return EvalResult(
        top1=topk_correct(logits, targets, 1) / count,
        top5=topk_correct(logits, targets, 5) / count,
        loss=float(F.cross_entropy(logits, targets)),
        count=count,
        confusion=confusion_matrix(logits.argmax(dim=1), targets, num_classes),
    )
