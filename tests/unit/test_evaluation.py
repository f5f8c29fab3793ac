"""Metrics on hand-built logits, and evaluate() on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mixer.evaluation import confusion_matrix, evaluate, per_class_accuracy, predict_logits, topk_correct

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_topk_correct_on_hand_built_logits() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0],    # top-1 = 1, top-2 = {1, 0}
                           [0.5, 0.1, 0.3, 0.2],    # top-1 = 0, top-2 = {0, 2}
                           [0.0, 0.1, 0.2, 0.7]])   # top-1 = 3, top-2 = {3, 2}
    labels = torch.tensor([1, 2, 1])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 2
    assert topk_correct(logits, labels, 4) == 3
    assert topk_correct(logits, labels, 5) == 3  # k above the class count means all of them


def test_confusion_matrix_matches_a_hand_count() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    expected = torch.tensor([[1, 1, 0],
                             [0, 2, 1],
                             [1, 0, 0]])
    confusion = confusion_matrix(preds, labels, 3)
    assert confusion.dtype == torch.int64
    assert torch.equal(confusion, expected)


def test_per_class_accuracy() -> None:
    confusion = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    acc = per_class_accuracy(confusion)
    assert acc[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(acc[3].item())  # no examples of class 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


def data(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_evaluate_tiny_model_is_consistent() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    images, labels = data(50)
    result = evaluate(model, images, labels, MEAN, STD, batch_size=16, num_classes=10)
    assert model.training  # mode restored

    logits = predict_logits(model, images, MEAN, STD, batch_size=50)
    preds = logits.argmax(1).numpy()
    assert result.count == 50
    assert result.top1 == pytest.approx(float((preds == labels).mean()))
    assert 0 <= result.top1 <= result.top5 <= 1
    assert result.loss == pytest.approx(
        float(nn.functional.cross_entropy(logits, torch.as_tensor(labels))), rel=1e-5)
    assert result.confusion.shape == (10, 10) and int(result.confusion.sum()) == 50
    assert int(result.confusion.diagonal().sum()) == round(result.top1 * 50)
    assert len(result.per_class) == 10
    assert result.to_metrics() == {"top1": result.top1, "top5": result.top5, "loss": result.loss, "count": 50}


def test_limit_batches_evaluates_a_prefix() -> None:
    model = Tiny()
    images, labels = data(50)
    assert predict_logits(model, images, MEAN, STD, batch_size=16, limit_batches=2).shape == (32, 10)
    assert predict_logits(model, torch.as_tensor(images), MEAN, STD, batch_size=16).shape == (50, 10)
    result = evaluate(model, images, labels, MEAN, STD, batch_size=16, limit_batches=1, num_classes=10)
    assert result.count == 16
    assert int(result.confusion.sum()) == 16


def test_flip_average_is_the_mean_over_each_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = Tiny()  # a linear layer over the flattened image: not mirror-symmetric
    images, labels = data(50)
    mirrored = images[:, :, ::-1, :].copy()  # (N, H, W, C): left-right
    plain = predict_logits(model, images, MEAN, STD, batch_size=16)
    plain_mirrored = predict_logits(model, mirrored, MEAN, STD, batch_size=16)
    assert not torch.allclose(plain, plain_mirrored)  # otherwise the test below proves nothing

    averaged = predict_logits(model, images, MEAN, STD, batch_size=16, flip_average=True)
    torch.testing.assert_close(averaged, (plain + plain_mirrored) / 2)
    # An image and its mirror get the same scores, so their evaluations agree.
    torch.testing.assert_close(predict_logits(model, mirrored, MEAN, STD, batch_size=16, flip_average=True), averaged)
    result = evaluate(model, images, labels, MEAN, STD, batch_size=16, num_classes=10, flip_average=True)
    assert result.top1 == pytest.approx(float((averaged.argmax(1).numpy() == labels).mean()))
