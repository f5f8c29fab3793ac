"""Batched augmentation: normalization, identity, per-image flips, zoom, integer shifts; MixUp and CutMix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer.augment import augment_batch, mix_batch, normalize
from mixer.config import AugmentConfig

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(size: int = 16) -> torch.Tensor:
    return torch.randn(size, 3, 32, 32, generator=seeded(123))


def test_normalize_layout_dtype_and_values() -> None:
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=seeded(0))
    x = normalize(images, MEAN, STD)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        expected = (images[1, 5, 7, c].item() / 255 - MEAN[c]) / STD[c]
        assert abs(x[1, c, 5, 7].item() - expected) < 1e-5
    full = normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5))
    assert torch.allclose(full, torch.full((1, 3, 2, 2), 2.0))


def test_all_features_off_returns_the_input() -> None:
    x = batch()
    out = augment_batch(x, AugmentConfig(flip=False, zoom=0.0, crop_padding=0), seeded(0))
    assert torch.equal(out, x)


def test_flip_is_per_image_and_exact() -> None:
    x = batch(32)
    out = augment_batch(x, AugmentConfig(flip=True, zoom=0.0, crop_padding=0), seeded(1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))  # each image exactly one of the two
    assert 0 < sum(flipped) < len(x)


def test_zoom_keeps_shape_and_is_reproducible() -> None:
    x = batch()
    cfg = AugmentConfig(flip=False, zoom=0.2, crop_padding=0)
    first = augment_batch(x, cfg, seeded(7))
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, augment_batch(x, cfg, seeded(7)))
    assert not torch.equal(first, augment_batch(x, cfg, seeded(8)))
    assert not torch.allclose(first, x)


def test_zoom_is_about_the_center() -> None:
    # An image symmetric under flips stays symmetric under a centered zoom.
    x = batch(8)
    x = x + x.flip(-1) + x.flip(-2) + x.flip(-1, -2)
    out = augment_batch(x, AugmentConfig(flip=False, zoom=0.3, crop_padding=0), seeded(3))
    assert torch.allclose(out, out.flip(-1), atol=1e-4)
    assert torch.allclose(out, out.flip(-2), atol=1e-4)


def test_crop_shift_moves_content_by_whole_pixels() -> None:
    p = 3
    x = batch(16)
    out = augment_batch(x, AugmentConfig(flip=False, zoom=0.0, crop_padding=p), seeded(5))
    shifts = set()
    for i in range(len(x)):
        # Output pixel (r, c) = input pixel (r + dy, c + dx); compare away from the reflected border.
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if torch.equal(out[i, :, p:-p, p:-p], x[i, :, p + dy:32 - p + dy, p + dx:32 - p + dx])]
        assert len(matches) == 1, i
        shifts.add(matches[0])
    assert len(shifts) > 1  # different images, different shifts


def mixing(mixup: float = 0.0, cutmix: float = 0.0) -> AugmentConfig:
    return AugmentConfig(flip=False, zoom=0.0, crop_padding=0, mixup=mixup, cutmix=cutmix)


def test_mixup_blends_each_image_with_its_partner_from_the_reversed_batch() -> None:
    x, y = batch(), torch.arange(16)
    mixed = mix_batch(x, y, mixing(mixup=0.4), np.random.default_rng(0))
    assert 0 < mixed.lam < 1
    assert torch.allclose(mixed.x, mixed.lam * x + (1 - mixed.lam) * x.flip(0))
    assert torch.equal(mixed.y_a, y) and torch.equal(mixed.y_b, y.flip(0))
    again = mix_batch(x, y, mixing(mixup=0.4), np.random.default_rng(0))
    assert again.lam == mixed.lam and torch.equal(again.x, mixed.x)  # seeded: reproducible


def test_cutmix_pastes_one_box_whose_area_sets_lam() -> None:
    x, y = batch(), torch.arange(16)
    for seed in range(20):
        mixed = mix_batch(x, y, mixing(cutmix=1.0), np.random.default_rng(seed))
        pasted = (mixed.x != x).any(dim=(0, 1))  # (H, W): pixels taken from the partner
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # one solid rectangle, every pixel of it from the partner
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            assert pasted[box].all() and pasted.sum() == pasted[box].numel()
            assert torch.equal(mixed.x[..., box[0], box[1]], x.flip(0)[..., box[0], box[1]])
        assert mixed.lam == pytest.approx(1 - pasted.sum().item() / (32 * 32))


def test_mixing_off_returns_the_batch_itself() -> None:
    x, y = batch(), torch.arange(16)
    mixed = mix_batch(x, y, mixing(), np.random.default_rng(0))
    assert mixed.x is x and mixed.lam == 1.0
