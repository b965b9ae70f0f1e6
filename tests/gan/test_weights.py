"""Importance weights from D's output, the prior-ratio constant, and the weight report."""

from __future__ import annotations

import math

import pytest
import torch

from pysynth.gan import importance_weights, ratio_constant, weight_report
from pysynth.gan.weights import DEFAULT_CLIP

NO_CLIP = (0.0, math.inf)


def maps(*means: float) -> torch.Tensor:
    """(N, 1, 2, 2) probability maps with the given means (cells spread around them)."""
    spread = torch.tensor([-0.05, 0.05, -0.02, 0.02]).reshape(1, 1, 2, 2)
    return torch.tensor(means).reshape(-1, 1, 1, 1) + spread


def test_weight_is_the_odds_of_the_mean_probability() -> None:
    w = importance_weights(maps(0.5, 0.25, 0.8), clip=NO_CLIP)
    torch.testing.assert_close(w, torch.tensor([1.0, 1 / 3, 4.0]))
    assert w.dtype == torch.float32
    assert w.shape == (3,)
    # The mean of the map, not the mean of per-cell odds ((1/9 + 9) / 2 would be 4.56).
    assert float(importance_weights(torch.tensor([[0.1, 0.9]]), clip=NO_CLIP)) == pytest.approx(1.0)
    torch.testing.assert_close(importance_weights(maps(0.5, 0.25), c=2.0, clip=NO_CLIP), torch.tensor([2.0, 2 / 3]))


def test_weight_accepts_any_map_layout() -> None:
    expected = importance_weights(maps(0.3, 0.6))
    torch.testing.assert_close(importance_weights(maps(0.3, 0.6)[:, 0]), expected)
    torch.testing.assert_close(importance_weights(maps(0.3, 0.6).mean(dim=(1, 2, 3))), expected)
    torch.testing.assert_close(importance_weights(maps(0.3, 0.6).half()), expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="batch axis"):
        importance_weights(torch.tensor(0.5))


def test_weights_are_clipped_and_finite_at_certainty() -> None:
    w = importance_weights(torch.tensor([0.0, 0.05, 0.5, 0.9, 1.0]))
    torch.testing.assert_close(w, torch.tensor([0.2, 0.2, 1.0, 2.0, 2.0]))
    eps = 1e-4
    w = importance_weights(torch.tensor([0.0, 1.0]), clip=NO_CLIP, eps=eps)
    torch.testing.assert_close(w, torch.tensor([eps / (1 - eps), (1 - eps) / eps]))
    assert torch.isfinite(w).all()


def test_nan_probability_gets_the_lower_bound() -> None:
    p = maps(0.5, 0.5, 0.8)
    p[1, 0, 1, 0] = math.nan
    torch.testing.assert_close(importance_weights(p, clip=(0.3, 2.5)), torch.tensor([1.0, 0.3, 2.5]))


def test_weights_carry_no_gradient() -> None:
    logits = torch.randn(4, 1, 3, 3, requires_grad=True)
    with torch.enable_grad():
        w = importance_weights(torch.sigmoid(logits))
    assert not w.requires_grad
    assert w.grad_fn is None
    # A segmentation loss scaled by the weights reaches only the segmenter's side.
    per_sample = (logits.detach() * 0 + 1).requires_grad_()
    (per_sample.flatten(1).mean(1) * w).sum().backward()
    assert logits.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": 0.0}, "c must"),
        ({"c": math.inf}, "c must"),
        ({"clip": (2.0, 0.2)}, "clip"),
        ({"clip": (-1.0, 2.0)}, "clip"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 0.5}, "eps"),
    ],
)
def test_importance_weights_reject_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        importance_weights(maps(0.5), **kwargs)
    # The fused loss op checks its scalars with the same function, so it refuses the same arguments.
    from pysynth.kernels.weighted_loss import weighted_two_head_loss

    clip = kwargs.pop("clip", DEFAULT_CLIP)
    with pytest.raises(ValueError, match=match):
        weighted_two_head_loss(
            torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(2, 2), maps(0.5),
            clip_lo=clip[0], clip_hi=clip[1], **kwargs,
        )  # fmt: skip


@pytest.mark.parametrize("use_triton", [False, True])
def test_the_fused_loss_trains_with_these_very_weights(use_triton: bool) -> None:
    # One formula: the weights pysynth::weighted_two_head_loss multiplies each sample's loss by (and returns) are
    # this function's numbers, on its PyTorch path (which calls it) and in its Triton kernel (which re-expresses it
    # in float64; run by the interpreter here), for float32 and float64 logits.
    if use_triton:
        pytest.importorskip("triton")
    from pysynth.kernels.weighted_loss import weighted_two_head_loss

    g = torch.Generator().manual_seed(0)
    n = 8
    d = torch.rand(n, 1, 5, 5, generator=g)
    d[0], d[1], d[3] = 1e-7, 1 - 1e-7, 0.5  # clipped up, clipped down (or 1e6 unclipped), exactly c
    d[2, 0, 0, 0] = math.nan
    logits = 3 * torch.randn(n, 2, 6, 5, generator=g)
    det, seg, pw = (torch.rand(n, 6, 5, generator=g) for _ in range(3))
    for c, clip in ((1.0, DEFAULT_CLIP), (2.5, (0.1, math.inf)), (0.3, NO_CLIP)):
        for dtype in (torch.float32, torch.float64):
            loss, used = weighted_two_head_loss(
                logits.to(dtype), det, seg, pw, d, c=c, clip_lo=clip[0], clip_hi=clip[1], dice_weight=0.5,
                use_triton=use_triton,
            )  # fmt: skip
            expected = importance_weights(d, c, clip, dtype=dtype)
            assert used.dtype == dtype
            torch.testing.assert_close(used, expected, rtol=1e-15, atol=0)
            # ... and the loss is linear in them: the same loss at weight 1 (D = 0.5, c = 1), scaled.
            unit, _ = weighted_two_head_loss(
                logits.to(dtype), det, seg, pw, torch.full((n, 1), 0.5), dice_weight=0.5, use_triton=use_triton
            )
            torch.testing.assert_close(loss, expected * unit, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    assert importance_weights(maps(0.5), dtype=torch.float64).dtype == torch.float64


def test_ratio_constant() -> None:
    assert ratio_constant(1, 1) == 1.0
    assert ratio_constant(100, 300) == 3.0
    assert ratio_constant(0.25, 0.75) == 3.0
    for bad in ((0, 1), (1, 0), (-1, 1), (math.nan, 1), (1, math.inf)):
        with pytest.raises(ValueError, match="finite and > 0"):
            ratio_constant(*bad)


@pytest.mark.parametrize(("n_real", "n_synthetic"), [(1, 1), (1, 3), (5, 2)])
def test_bayes_optimal_discriminator_gives_the_density_ratio(n_real: int, n_synthetic: int) -> None:
    # p = N(0, 1), g = N(0.7, 1.3²); D* = π_r p / (π_r p + π_s g) for a D trained on those priors.
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    p = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    g = torch.exp(-0.5 * ((x - 0.7) / 1.3) ** 2) / (1.3 * math.sqrt(2 * math.pi))
    prior_r, prior_s = n_real / (n_real + n_synthetic), n_synthetic / (n_real + n_synthetic)
    d = prior_r * p / (prior_r * p + prior_s * g)
    w = importance_weights(d, c=ratio_constant(n_real, n_synthetic), clip=NO_CLIP)
    torch.testing.assert_close(w, (p / g).float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- report


def test_report_statistics() -> None:
    w = torch.tensor([0.2, 0.2, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    r = weight_report(w)
    assert r.n == 8
    assert r.n_nonfinite == 0
    assert r.mean == pytest.approx(w.double().mean().item())
    assert r.std == pytest.approx(w.double().std(unbiased=False).item())
    assert (r.min, r.max) == (pytest.approx(0.2), pytest.approx(2.0))
    assert r.quantiles["q50"] == pytest.approx(torch.quantile(w.double(), 0.5).item())
    assert r.frac_low == pytest.approx(2 / 8)
    assert r.frac_high == pytest.approx(3 / 8)
    assert r.ess == pytest.approx(w.sum().item() ** 2 / (8 * w.square().sum().item()), rel=1e-6)
    assert not r.collapsed
    assert r.collapsed_at is None
    flat = r.to_dict()
    assert {"q05", "q95", "frac_low", "collapsed"} <= flat.keys()
    assert "quantiles" not in flat


def test_report_equal_weights_have_full_effective_sample_size() -> None:
    assert weight_report(torch.ones(10)).ess == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n_high", "n_low", "expected"), [(96, 0, "high"), (0, 95, "low"), (90, 5, None), (50, 50, None)]
)
def test_report_flags_collapse_at_one_bound(n_high: int, n_low: int, expected: str | None) -> None:
    middle = 100 - n_high - n_low
    w = torch.cat([torch.full((n_high,), 2.0), torch.full((n_low,), 0.2), torch.full((middle,), 1.0)])
    r = weight_report(w, DEFAULT_CLIP)
    assert r.collapsed_at == expected
    assert r.collapsed == (expected is not None)


def test_report_from_a_collapsed_discriminator() -> None:
    # D → 1 on every synthetic patch: every weight sits at the upper bound.
    w = importance_weights(torch.full((64, 1, 5, 5), 0.999))
    assert weight_report(w).collapsed_at == "high"


def test_report_handles_nonfinite_and_bad_input() -> None:
    r = weight_report(torch.tensor([1.0, math.nan, math.inf, 0.5]))
    assert r.n == 4
    assert r.n_nonfinite == 2
    assert r.mean == pytest.approx(0.75)
    empty = weight_report(torch.tensor([math.nan]))
    assert math.isnan(empty.mean)
    assert not empty.collapsed
    with pytest.raises(ValueError, match="at least one"):
        weight_report(torch.zeros(0))
    with pytest.raises(ValueError, match="collapse_fraction"):
        weight_report(torch.ones(3), collapse_fraction=0.0)
    assert weight_report(torch.ones(3), clip=NO_CLIP).frac_high == 0.0
