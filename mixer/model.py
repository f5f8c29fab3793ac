"""MLP-Mixer: An all-MLP Architecture for Vision (Tolstikhin et al. 2021), pure torch.

Paper: https://arxiv.org/abs/2105.01601. Layout after timm's `mlp_mixer.py` and google-research
`vision_transformer/vit_jax/models_mixer.py`: blocks, model, init, then helpers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mixer.config import ModelConfig

# A normal truncated at +-2 std has std 0.8796 of the untruncated one; dividing by it keeps
# flax's lecun_normal variance of exactly 1 / fan_in.
_TRUNC_NORMAL_STD = 0.87962566103423978


# Dropout's CPU masks: random integers below this, kept where >= p * _MASK_RANGE (p exact to 2**-24).
_MASK_RANGE = 1 << 24


class Dropout(nn.Dropout):
    """nn.Dropout, with the CPU mask drawn as 24-bit random integers instead of torch's bernoulli_.

    On CPU, torch's bernoulli_ was half of the `seed` model's training step (docs/PERFORMANCE.md):
    forward and backward of a (128, 64, 128) tensor took 9.8 ms, against 4.4 ms this way on 2
    cores. On other devices this is torch's own dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * _MASK_RANGE)
        keep = torch.randint(0, _MASK_RANGE, x.shape, dtype=torch.int32) >= threshold
        # One float mask holding the 1 / (1 - p) scale: a single multiply forward and backward.
        return x * keep.to(x.dtype).mul_(_MASK_RANGE / (_MASK_RANGE - threshold))


class MlpBlock(nn.Module):
    """Two dense layers with a GELU between them: dim -> hidden_dim -> dim."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    """Mix across patches (tokens), then across channels, each with a residual."""

    def __init__(self, num_patches: int, dim: int, tokens_mlp_dim: int, channels_mlp_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = MlpBlock(num_patches, tokens_mlp_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = MlpBlock(dim, channels_mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # MLP over N: (B, C, N)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(nn.Module):
    """Per-patch linear embedding, `num_blocks` Mixer blocks, LayerNorm, average pooling, linear head.

    Input: normalized float images (B, in_channels, image_size, image_size); output: logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # A patch_size-strided conv is one shared linear map per non-overlapping patch.
        self.stem = nn.Conv2d(cfg.in_channels, cfg.hidden_dim, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size)
        self.blocks = nn.Sequential(*[
            MixerBlock(cfg.num_patches, cfg.hidden_dim, cfg.tokens_mlp_dim, cfg.channels_mlp_dim, cfg.dropout)
            for _ in range(cfg.num_blocks)
        ])
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.head_drop = Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_dim, cfg.num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, N, C)
        x = self.stem(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, num_classes)
        x = self.forward_features(x).mean(dim=1)  # global average pooling over patches: (B, C)
        return self.head(self.head_drop(x))

    @torch.no_grad()
    def _init_weights(self) -> None:
        """As models_mixer.py: lecun_normal stem, xavier MLPs, unit LayerNorms, zero head."""
        fan_in = self.cfg.in_channels * self.cfg.patch_size ** 2
        std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD
        nn.init.trunc_normal_(self.stem.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.stem.bias)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # A zero head starts every class at the same logit (loss = ln(num_classes)).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)


def build_model(cfg: ModelConfig) -> MlpMixer:
    return MlpMixer(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: ModelConfig) -> int:
    """FLOPs of one image's forward pass: 2 per multiply-add of the embedding, MLPs and head.

    LayerNorm, GELU, biases, residual adds and pooling are left out (under 1% of the total).
    """
    n, c = cfg.num_patches, cfg.hidden_dim
    embed = n * (cfg.in_channels * cfg.patch_size ** 2) * c
    token_mixing = c * 2 * n * cfg.tokens_mlp_dim  # one N -> D_S -> N MLP per channel
    channel_mixing = n * 2 * c * cfg.channels_mlp_dim  # one C -> D_C -> C MLP per patch
    head = c * cfg.num_classes
    return 2 * (embed + cfg.num_blocks * (token_mixing + channel_mixing) + head)
