"""The two-head U-Net: shapes, gradients, cost accounting, CPU fast paths."""

from __future__ import annotations

import pytest
import torch

from pysynth.models.unet import UNet, UNetConfig, flops_per_pixel, pad_to_multiple


def test_shapes_and_heads() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=3))
    out = model(torch.rand(2, 3, 64, 48))
    assert out.shape == (2, 2, 64, 48)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 60, 48))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flops_per_pixel_matches_a_hand_count() -> None:
    model = UNet(UNetConfig(width=2, depth=1))
    # Level 0: conv 3->2, conv 2->2 at full size; level 1: conv 2->4, conv 4->4 at 1/4 of the pixels;
    # decoder: conv (4+2)->2, conv 2->2 at full size; head 2->2 (1x1). 2 FLOPs per multiply-add, 9 taps.
    per_px = 2 * (9 * (3 * 2 + 2 * 2) + 9 * (2 * 4 + 4 * 4) / 4 + 9 * (6 * 2 + 2 * 2) + 2 * 2)
    assert flops_per_pixel(model, size=32) == pytest.approx(per_px)


def test_pad_to_multiple_round_trip() -> None:
    x = torch.rand(1, 3, 37, 50)
    padded, (h, w) = pad_to_multiple(x, 16)
    assert padded.shape[-2:] == (48, 64)
    assert torch.equal(padded[..., :h, :w], x)


def test_channels_last_and_bf16_autocast_agree_with_fp32() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2)).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() < 0.1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="depth"):
        UNetConfig(depth=0)
    with pytest.raises(ValueError, match="channel"):
        UNetConfig(width=0)


def test_folded_batchnorm_computes_the_same() -> None:
    from pysynth.models.unet import fold_batchnorm

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2, max_width=16))
    model.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        model(torch.randn(2, 3, 32, 32) * 2 + 0.5)
    model.eval()
    fused = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)
