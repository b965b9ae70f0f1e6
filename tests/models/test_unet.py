"""The two-head U-Net: shapes, gradients, cost accounting, CPU fast paths."""

from __future__ import annotations

import numpy as np
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


def _channels_last(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "w", "c1", "c2"), [(1, 1, 1, 1), (2, 3, 3, 5), (7, 4, 16, 8), (5, 9, 32, 16)])
def test_upsample_concat_matches_interpolate_and_cat(h: int, w: int, c1: int, c2: int, dtype: torch.dtype) -> None:
    from pysynth.models.unet import upsample_concat, upsample_concat_reference

    low = _channels_last(1, c1, h, w, seed=1).to(dtype)
    skip = _channels_last(1, c2, 2 * h, 2 * w, seed=2).to(dtype)
    with torch.inference_mode():
        ours, ref = upsample_concat(low, skip), upsample_concat_reference(low, skip)
    assert ours.shape == (1, c1 + c2, 2 * h, 2 * w)
    assert ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    else:  # both round a float32 result once: at most one bfloat16 step apart
        step = torch.finfo(torch.bfloat16).eps * ref[:, :c1].float().abs().clamp_min(1e-3)
        assert torch.all((ours[:, :c1].float() - ref[:, :c1].float()).abs() <= step)
        assert (ours[:, :c1] == ref[:, :c1]).float().mean() > 0.9
    assert torch.equal(ours[:, c1:], skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_equals_pytorch(dtype: torch.dtype) -> None:
    from pysynth.models.unet import max_pool

    for c, h, w in [(1, 2, 2), (3, 6, 4), (16, 10, 14), (2, 5, 4)]:  # odd height: PyTorch's pooling (floor)
        x = _channels_last(1, c, h, w, seed=c).to(dtype)
        with torch.inference_mode():
            ours = max_pool(x)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours, torch.nn.functional.max_pool2d(x, 2))  # exact


def test_bf16_rounding_is_to_nearest_even() -> None:
    from pysynth.models.unet import upsample_concat, upsample_concat_reference

    # Between 1 and 1 + 2^-6 the upsampled row is 1, 1 + 2^-8, 1 + 3 * 2^-8, 1 + 2^-6 in float32. The middle two
    # lie halfway between bfloat16 neighbours (steps of 2^-7): to nearest even they become 1 and 1 + 2^-6.
    low = torch.tensor([1.0, 1.0 + 2**-6], dtype=torch.bfloat16).view(1, 1, 1, 2)
    low = low.contiguous(memory_format=torch.channels_last)
    skip = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        row = upsample_concat(low, skip)[0, 0, 0].float().tolist()
        ref = upsample_concat_reference(low, skip)[0, 0, 0].float().tolist()
    assert row == [1.0, 1.0, 1.0 + 2**-6, 1.0 + 2**-6]
    assert row == ref


def test_upsample_concat_kernel_threads_agree_and_shapes_are_checked() -> None:
    from pysynth import _core

    low = np.random.default_rng(0).random((13, 6, 4), dtype=np.float32)
    skip = np.random.default_rng(1).random((26, 12, 3), dtype=np.float32)
    one, many = np.zeros((26, 12, 7), np.float32), np.zeros((26, 12, 7), np.float32)
    _core.upsample2x_concat(low, skip, one, 1)
    _core.upsample2x_concat(low, skip, many, 5)
    np.testing.assert_array_equal(one, many)
    with pytest.raises(ValueError, match="upsample2x_concat"):
        _core.upsample2x_concat(low, skip[:-1], np.zeros((25, 12, 7), np.float32), 1)


def test_upsample_concat_falls_back_where_the_kernel_does_not_apply() -> None:
    from pysynth.models.unet import upsample_concat, upsample_concat_reference

    low, skip = torch.randn(1, 4, 3, 5), torch.randn(1, 2, 6, 10)  # NCHW
    assert torch.equal(upsample_concat(low, skip), upsample_concat_reference(low, skip))
    odd = torch.randn(1, 2, 7, 10).contiguous(memory_format=torch.channels_last)  # not twice the size
    cl = low.contiguous(memory_format=torch.channels_last)
    assert torch.equal(upsample_concat(cl, odd), upsample_concat_reference(cl, odd))
    grad = cl.clone().requires_grad_(True)  # training: autograd must see the join
    upsample_concat(grad, skip.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert grad.grad is not None
    assert torch.all(grad.grad > 0)


def test_folded_channels_last_network_joins_in_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from pysynth import _core
    from pysynth.models import unet as unet_module

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=3, max_width=16)).eval()
    fused = unet_module.fold_batchnorm(model).to(memory_format=torch.channels_last)
    assert fused.fused
    assert not model.fused
    calls, pools = [], []
    kernel, pool = _core.upsample2x_concat, _core.max_pool2x2
    monkeypatch.setattr(_core, "upsample2x_concat", lambda *a: (calls.append(a[0].shape), kernel(*a))[1])
    monkeypatch.setattr(_core, "max_pool2x2", lambda *a: (pools.append(a[0].shape), pool(*a))[1])
    x = _channels_last(1, 3, 64, 48, seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)
        batch = torch.cat([x, x.flip(-1)]).contiguous(memory_format=torch.channels_last)  # two images: PyTorch
        torch.testing.assert_close(fused(batch), model(batch), atol=1e-5, rtol=1e-4)
    assert len(calls) == 3  # every level of the decoder, once (the batch took PyTorch's path)
    assert len(pools) == 3  # every level of the encoder below the first
    if not torch.backends.mkldnn.is_available():
        return
    bf16 = []
    kernel16 = _core.upsample2x_concat_bf16
    monkeypatch.setattr(_core, "upsample2x_concat_bf16", lambda *a: (bf16.append(a[0].shape), kernel16(*a))[1])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused(x).float()
        fused.fused = False
        ref = fused(x).float()
    assert len(bf16) == 3
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.05)  # bf16 steps through the decoder
