"""MLP-Mixer: size, FLOPs, shapes, gradients, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mixer.config import MODEL_PRESETS, ModelConfig
from mixer.model import Dropout, build_model, count_parameters, forward_flops


def preset(name: str, **changes: object) -> ModelConfig:
    return dataclasses.replace(ModelConfig(preset=name, **MODEL_PRESETS[name]), **changes)


def test_seed_preset_has_the_tutorial_parameter_count() -> None:
    # embed 48*128+128; per block 2 LayerNorms + token MLP 64->64->64 + channel MLP 128->64->128;
    # final LayerNorm; head 128*100+100.
    block = 2 * 2 * 128 + (64 * 64 + 64) * 2 + (128 * 64 + 64) + (64 * 128 + 128)
    expected = 48 * 128 + 128 + 4 * block + 2 * 128 + 128 * 100 + 100
    assert expected == 121_060
    assert count_parameters(build_model(preset("seed"))) == 121_060


def test_seed_forward_flops_is_about_17_6_mflop() -> None:
    assert forward_flops(preset("seed")) == pytest.approx(17.6e6, abs=0.1e6)


@pytest.mark.parametrize("name", ["seed", "nano"])
def test_forward_gives_one_logit_per_class(name: str) -> None:
    cfg = preset(name)
    model = build_model(cfg)
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 100)
    assert model.forward_features(x).shape == (3, cfg.num_patches, cfg.hidden_dim)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_patch_sizes(patch_size: int) -> None:
    cfg = preset("seed", patch_size=patch_size)
    model = build_model(cfg)
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, (32 // patch_size) ** 2, 128)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_zero_head_gives_uniform_logits_at_init() -> None:
    logits = build_model(preset("seed")).eval()(torch.randn(4, 3, 32, 32))
    assert torch.equal(logits, torch.zeros_like(logits))


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(preset("seed"))
    # The head is zero-initialized, so at init no gradient flows past it into the body; give it
    # small random weights first (as one optimizer step would).
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic() -> None:
    model = build_model(preset("seed"))
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_at_its_rate_and_keeps_the_expected_value(dtype: torch.dtype) -> None:
    drop = Dropout(0.2)
    x = torch.ones(1_000_000, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert y.dtype == dtype
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.002)  # 1e6 draws: std 0.0004
    assert torch.all(y[kept] == torch.tensor(1.25, dtype=dtype))  # 1 / (1 - p): the mean stays 1
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # dropped units get no gradient
    drop.eval()
    assert torch.equal(drop(x), x)
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.2)(x), y)  # seeded: the same mask again
