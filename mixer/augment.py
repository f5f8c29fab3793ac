"""Batched augmentation on tensors, on whatever device the batch lives (CPU or GPU).

Every image gets its own random flip, zoom and shift, applied to the whole batch by a single
`affine_grid` + `grid_sample`: no per-image Python loop, no host round trip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixer.config import AugmentConfig


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), standardized per channel.

    `mean` and `std` are in pixel / 255 units, one per channel.
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()  # (B, C, H, W) in [0, 1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def is_identity(cfg: AugmentConfig) -> bool:
    """True when `cfg` turns every per-image feature off, so `augment_batch` returns its input."""
    return not cfg.flip and cfg.zoom == 0 and cfg.crop_padding == 0


def augment_batch(x: torch.Tensor, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random flip, zoom and shift per image of a normalized float batch (B, C, H, W).

    - flip: horizontal, with probability 0.5;
    - zoom: scale uniform in [1 - zoom, 1 + zoom], about the center; > 1 zooms out, < 1 zooms in,
      as Keras RandomZoom (one scale for both axes); uncovered pixels are filled by reflection;
    - shift: an integer number of pixels in [-crop_padding, crop_padding] along x and along y, the
      same as a random crop of the image padded by crop_padding (reflection padding here).

    Random numbers come from `generator` (it must live on x's device), so a seeded generator gives
    the same output. Returns `x` itself when every feature is off.
    """
    if is_identity(cfg):
        return x
    theta = _random_theta(x.shape[0], x.shape[-2], x.shape[-1], cfg, generator, x.device)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _random_theta(batch: int, height: int, width: int, cfg: AugmentConfig,
                  generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 2, 3) affine maps from output to input coordinates, both in [-1, 1] units."""
    u = torch.rand(4, batch, generator=generator, device=device)  # flip, zoom, shift x, shift y
    flip = torch.where(u[0] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(batch, device=device)
    scale = 1.0 + cfg.zoom * (2.0 * u[1] - 1.0)  # > 1 samples a larger area: zoom out
    # Uniform integer in [-p, p]; clamp guards against u rounding to exactly 1.0.
    p = cfg.crop_padding
    shift = torch.floor(u[2:] * (2 * p + 1)).clamp_(max=2 * p) - p  # (2, B) pixels
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = flip * scale
    theta[:, 1, 1] = scale
    # A pixel is 2 / width units wide in [-1, 1] coordinates (align_corners=False).
    theta[:, 0, 2] = shift[0] * (2.0 / width)
    theta[:, 1, 2] = shift[1] * (2.0 / height)
    return theta


@dataclass(frozen=True)
class Mixed:
    """A batch after MixUp or CutMix: the loss is lam * loss(y_a) + (1 - lam) * loss(y_b)."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> Mixed:
    """MixUp or CutMix (Zhang et al. 2018; Yun et al. 2019) of a batch with its own reverse, as timm does.

    lam ~ Beta(alpha, alpha), one per batch. With both on, each batch gets one of the two at
    random. CutMix pastes one box per batch, its area (1 - lam) of the image; lam is then
    recomputed from the box as clipped at the borders. The few random numbers come from `rng` on
    the host, so nothing waits on the device.
    """
    methods = [m for m, alpha in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if alpha > 0]
    if not methods:
        return Mixed(x, y, y, 1.0)
    method = methods[int(rng.integers(len(methods)))]
    alpha = cfg.mixup if method == "mixup" else cfg.cutmix
    lam = float(rng.beta(alpha, alpha))
    partner = x.flip(0)
    if method == "mixup":
        return Mixed(x * lam + partner * (1.0 - lam), y, y.flip(0), lam)
    height, width = x.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1.0 - lam)), int(width * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return Mixed(mixed, y, y.flip(0), 1.0 - (bottom - top) * (right - left) / (height * width))
