"""Refiner, discriminator, style conditioning, history buffer and the GAN losses."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pysynth.gan import (
    Discriminator,
    GanConfig,
    GanLossConfig,
    HistoryBuffer,
    Refiner,
    StyleEncoder,
    StyleInjection,
    discriminator_loss,
    refiner_loss,
)

SMALL = GanConfig(style_dim=4, style_channels=6, refiner_channels=8, refiner_blocks=2, disc_channels=4, disc_layers=3)


def images(n: int, h: int, w: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g) * 2 - 1) * scale


def perturbed_refiner(config: GanConfig = SMALL, seed: int = 0, std: float = 0.05) -> Refiner:
    """A refiner whose Δ convolution is off zero, so every layer gets gradients."""
    torch.manual_seed(seed)
    refiner = Refiner(config)
    nn.init.normal_(refiner.delta.weight, std=std)
    return refiner


# ---------------------------------------------------------------- config


def test_config_defaults_and_round_trip() -> None:
    c = GanConfig()
    assert (c.style_dim, c.refiner_channels, c.refiner_blocks, c.disc_channels, c.use_reference) == (
        32,
        32,
        5,
        32,
        True,
    )
    assert GanConfig(**c.to_dict()) == c


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"style_dim": 0}, "style_dim"),
        ({"refiner_channels": -1}, "refiner_channels"),
        ({"refiner_blocks": -1}, "refiner_blocks"),
        ({"disc_layers": 0}, "disc_layers"),
        ({"disc_layers": 9}, "disc_layers"),
        ({"disc_channels": 64, "disc_max_channels": 32}, "disc_max_channels"),
        ({"leaky_slope": 1.0}, "leaky_slope"),
        ({"image_channels": 2.5}, "image_channels"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GanConfig(**kwargs)


# ---------------------------------------------------------------- refiner


@pytest.mark.parametrize(("hw", "ref_hw"), [((8, 8), (24, 24)), ((17, 23), (31, 26)), ((32, 31), (40, 40))])
def test_refiner_keeps_shape_for_any_size(hw: tuple[int, int], ref_hw: tuple[int, int]) -> None:
    refiner = perturbed_refiner()
    out = refiner(images(2, *hw), images(2, *ref_hw, seed=1))
    assert out.shape == (2, 3, *hw)
    assert out.min() >= -1
    assert out.max() <= 1


def test_refiner_is_identity_at_init() -> None:
    torch.manual_seed(0)
    refiner = Refiner(SMALL)
    x = images(2, 19, 16)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = -1.0, 1.0
    assert torch.equal(refiner(x, images(2, 24, 24, seed=1)), x)
    # Outside [-1, 1] the output is clamped.
    assert torch.equal(refiner(x * 3, images(2, 24, 24)), (x * 3).clamp(-1, 1))


def test_refiner_output_is_clamped_input_plus_residual() -> None:
    refiner = perturbed_refiner(std=1.0)
    x, s = images(2, 12, 12), images(2, 24, 24, seed=1)
    delta = refiner.residual(x, s)
    assert delta.abs().max() > 0.5
    torch.testing.assert_close(refiner(x, s), (x + delta).clamp(-1, 1))


def test_refiner_is_independent_of_the_rest_of_the_batch() -> None:
    refiner = perturbed_refiner()
    x, s = images(3, 16, 13), images(3, 24, 30, seed=1)
    whole = refiner(x, s)
    for i in range(3):
        torch.testing.assert_close(refiner(x[i : i + 1], s[i : i + 1]), whole[i : i + 1], rtol=1e-5, atol=1e-6)


def test_refiner_accepts_non_contiguous_input() -> None:
    refiner = perturbed_refiner()
    x, s = images(2, 16, 16), images(2, 24, 24, seed=1)
    reference = refiner(x, s)
    fast = refiner(x.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(refiner(x.transpose(2, 3).contiguous().transpose(2, 3), s), reference)


def test_reference_changes_the_output_when_used() -> None:
    refiner = perturbed_refiner(std=0.5)
    disc = Discriminator(SMALL)
    x = images(1, 24, 24)
    s1, s2 = images(1, 24, 24, seed=1), -images(1, 24, 24, seed=1).abs()
    assert not torch.allclose(refiner(x, s1), refiner(x, s2))
    assert not torch.allclose(disc(x, s1), disc(x, s2))


def test_no_reference_ablation_ignores_the_reference() -> None:
    config = GanConfig(**{**SMALL.to_dict(), "use_reference": False})
    refiner, disc = perturbed_refiner(config), Discriminator(config)
    assert refiner.encoder is None
    assert disc.encoder is None
    x = images(2, 24, 24)
    s1, s2 = images(2, 24, 24, seed=1), images(2, 40, 32, seed=2)
    for net in (refiner, disc):
        out = net(x, None)
        assert torch.equal(net(x, s1), out)
        assert torch.equal(net(x, s2), out)


def test_bad_inputs_are_rejected() -> None:
    refiner, disc = Refiner(SMALL), Discriminator(SMALL)
    x = images(2, 24, 24)
    with pytest.raises(ValueError, match="reference"):
        refiner(x, None)
    with pytest.raises(ValueError, match="batch"):
        refiner(x, images(3, 24, 24))
    with pytest.raises(ValueError, match="at least 24"):
        refiner(x, images(2, 23, 40))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        refiner(x[:, :2], images(2, 24, 24))
    with pytest.raises(ValueError, match=r"must be >= 17"):
        disc(images(2, 16, 40), images(2, 24, 24))


def test_style_encoder_code_shape_and_size_invariance() -> None:
    torch.manual_seed(0)
    encoder = StyleEncoder(style_dim=5, channels=4)
    assert encoder(images(3, 24, 24)).shape == (3, 5)
    assert encoder(images(2, 57, 33)).shape == (2, 5)
    # A periodic texture tiled larger gives about the same code: the pool averages, it does not locate.
    tile = images(1, 8, 8).repeat(1, 1, 8, 8)
    torch.testing.assert_close(encoder(tile[..., :48, :48]), encoder(tile), rtol=0.05, atol=0.02)


def test_style_injection_equals_a_1x1_conv_of_the_tiled_concatenation() -> None:
    torch.manual_seed(0)
    inject = StyleInjection(channels=5, style_dim=3)
    features, style = torch.randn(2, 5, 7, 6), torch.randn(2, 3)
    tiled = torch.cat([features, style[:, :, None, None].expand(-1, -1, 7, 6)], dim=1)
    weight = torch.cat([inject.conv.weight, inject.style.weight[:, :, None, None]], dim=1)
    torch.testing.assert_close(inject(features, style), F.conv2d(tiled, weight, inject.conv.bias))
    with pytest.raises(ValueError, match="style"):
        inject(features, torch.randn(3, 3))


def test_refiner_gradcheck_float64() -> None:
    refiner = perturbed_refiner(GanConfig(style_dim=2, style_channels=2, refiner_channels=3, refiner_blocks=1))
    refiner = refiner.double()
    x = images(1, 5, 4, scale=0.3).double().requires_grad_()
    s = images(1, 24, 24, seed=1).double().requires_grad_()
    # fast_mode checks random projections of the Jacobian: a few forward passes instead of one per input value.
    # The projections come from the global generator: seed it, so the check does not depend on earlier tests.
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(refiner, (x, s), eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("hw", [(32, 32), (45, 37), (64, 17)])
def test_discriminator_map_shape(hw: tuple[int, int]) -> None:
    disc = Discriminator(SMALL)
    out = disc(images(2, *hw), images(2, 24, 24, seed=1))
    assert out.shape == (2, 1, *disc.output_shape(hw))
    assert disc.output_shape(hw) == (math.ceil(hw[0] / 8) - 2, math.ceil(hw[1] / 8) - 2)


def test_default_networks_on_paper_sizes() -> None:
    # Shapes only: the default networks on the meta device run no arithmetic.
    with torch.device("meta"):
        disc, refiner = Discriminator(), Refiner()
        patch, ref = torch.empty(2, 3, 400, 400), torch.empty(2, 3, 400, 400)
        assert disc(patch, ref).shape == (2, 1, 5, 5)
        assert disc(torch.empty(2, 3, 200, 200), ref).shape == (2, 1, 2, 2)
        assert refiner(patch, ref).shape == (2, 3, 400, 400)
    assert sum(p.numel() for p in refiner.parameters()) == 135_267
    assert sum(p.numel() for p in disc.parameters()) == 1_361_249


# ---------------------------------------------------------------- gradient flow


def _gan_step(loss_config: GanLossConfig) -> tuple[Refiner, Discriminator, torch.Tensor]:
    refiner, disc = perturbed_refiner(), Discriminator(SMALL)
    initial, reference = images(2, 24, 24), images(2, 24, 24, seed=1).requires_grad_()
    refined = refiner(initial, reference.detach())
    task_loss = (refined[:, 0] - 0.5).square().mean()  # stands in for the segmenter's loss on X
    loss, _ = refiner_loss(refined, initial, disc(refined, reference.detach()), task_loss, loss_config)
    loss.backward()
    return refiner, disc, reference


@pytest.mark.parametrize(
    "weights",
    [{"beta": 0.0, "gamma": 0.0}, {"alpha": 0.0, "gamma": 0.0}, {"alpha": 0.0, "beta": 0.0, "gamma": 1.0}],
    ids=["reg", "real", "hard"],
)
def test_each_refiner_loss_term_reaches_every_refiner_parameter(weights: dict) -> None:
    refiner, _, reference = _gan_step(GanLossConfig(**weights))
    for name, p in refiner.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert reference.grad is None  # a detached reference receives nothing


def test_at_init_only_the_delta_convolution_learns_first() -> None:
    torch.manual_seed(0)
    refiner = Refiner(SMALL)
    initial = images(2, 16, 16)
    refined = refiner(initial, images(2, 24, 24, seed=1))
    refiner_loss(refined, initial, torch.zeros(2, 1, 1, 1), (refined - 0.3).square().mean(), GanLossConfig(gamma=1))[
        0
    ].backward()
    assert refiner.delta.weight.grad.abs().sum() > 0
    assert refiner.head.weight.grad.abs().sum() == 0


def test_discriminator_step_leaves_the_refiner_alone() -> None:
    refiner, disc = perturbed_refiner(), Discriminator(SMALL)
    real, initial, reference = images(2, 24, 24), images(2, 24, 24, seed=1), images(2, 24, 24, seed=2)
    fake = refiner(initial, reference).detach()
    loss, _ = discriminator_loss(disc(real, reference), disc(fake, reference))
    loss.backward()
    assert all(p.grad is None for p in refiner.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_reference_gets_gradient_only_when_not_detached() -> None:
    refiner = perturbed_refiner()
    reference = images(1, 24, 24, seed=1).requires_grad_()
    refiner(images(1, 12, 12), reference).sum().backward()
    assert reference.grad is not None
    assert reference.grad.abs().sum() > 0


# ---------------------------------------------------------------- losses


def _softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def test_refiner_loss_matches_a_hand_computation() -> None:
    initial = torch.tensor([[[[0.0, 0.5]]], [[[-1.0, 1.0]]]])  # (2, 1, 1, 2)
    refined = torch.tensor([[[[0.2, 0.1]]], [[[-1.0, 0.5]]]])
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    config = GanLossConfig(alpha=2.0, beta=3.0, gamma=0.5, lambda1=0.1, lambda2=0.01)
    loss, parts = refiner_loss(refined, initial, logits, torch.tensor(4.0), config)
    l1 = ((0.2 + 0.4) + (0.0 + 0.5)) / 2
    l2 = ((0.04 + 0.16) + (0.0 + 0.25)) / 2
    real = sum(_softplus(-z) for z in (0.0, 2.0, -1.0, 3.0)) / 4  # -log sigmoid(z), non-saturating
    expected = 2.0 * (0.1 * l1 + 0.01 * l2) + 3.0 * real + 0.5 * -4.0
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert parts["reg_l1"] == pytest.approx(l1)
    assert parts["reg_l2"] == pytest.approx(l2)
    assert parts["real"] == pytest.approx(real)
    assert parts["hard"] == pytest.approx(-4.0)
    assert parts["mean_abs_change"] == pytest.approx(1.1 / 4)
    assert parts["total"] == pytest.approx(expected, rel=1e-6)


def test_refiner_loss_defaults_are_the_papers_and_task_loss_is_optional() -> None:
    assert GanLossConfig() == GanLossConfig(alpha=1.0, beta=1.0, gamma=1e-7, lambda1=1e-5, lambda2=1e-4)
    x = images(2, 4, 4)
    loss, parts = refiner_loss(x, x, torch.zeros(2, 1, 2, 2), None)
    assert parts["hard"] == 0.0
    assert parts["reg"] == 0.0
    assert float(loss) == pytest.approx(math.log(2.0))


def test_refiner_realism_term_does_not_saturate() -> None:
    # -log D keeps a gradient of about -1 per logit where D confidently says "fake"; log(1 - D) would not.
    logits = torch.full((2, 1, 2, 2), -20.0, requires_grad=True)
    x = images(2, 4, 4)
    refiner_loss(x, x, logits, None)[0].backward()
    torch.testing.assert_close(logits.grad, torch.full_like(logits, -1 / 8), rtol=1e-6, atol=0)


def test_refiner_loss_gradcheck_float64() -> None:
    refined = images(2, 3, 3).double().requires_grad_()
    logits = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    initial = images(2, 3, 3, seed=1).double()
    config = GanLossConfig(gamma=0.5, lambda1=0.1, lambda2=0.2)

    def fn(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The formula in float64 (refiner_loss computes in float32); random inputs stay off the kink of |d| at 0.
        diff = (initial - x).flatten(1)
        reg = 0.1 * diff.abs().sum(1).mean() + 0.2 * diff.square().sum(1).mean()
        real = F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
        return reg + real - 0.5 * x.square().mean()

    assert torch.autograd.gradcheck(fn, (refined, logits))
    ours = refiner_loss(refined, initial, logits, refined.square().mean(), config)[0]
    assert float(ours.detach()) == pytest.approx(float(fn(refined, logits).detach()), rel=1e-5)
    grad_ours = torch.autograd.grad(ours, (refined, logits))
    grad_ref = torch.autograd.grad(fn(refined, logits), (refined, logits))
    for a, b in zip(grad_ours, grad_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_refiner_loss_rejects_bad_input() -> None:
    x = images(2, 4, 4)
    with pytest.raises(ValueError, match="must match"):
        refiner_loss(x, x[:, :, :3], torch.zeros(2, 1))
    with pytest.raises(ValueError, match="batch"):
        refiner_loss(x, x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="scalar"):
        refiner_loss(x, x, torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="gamma"):
        GanLossConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="lambda1"):
        GanLossConfig(lambda1=math.nan)


def test_discriminator_loss_matches_a_hand_computation() -> None:
    real_logits = torch.tensor([[0.0], [2.0]])
    fake_logits = torch.tensor([[-1.0], [1.0], [3.0]])  # counts may differ
    loss, parts = discriminator_loss(real_logits, fake_logits)
    real = (_softplus(-0.0) + _softplus(-2.0)) / 2
    fake = (_softplus(-1.0) + _softplus(1.0) + _softplus(3.0)) / 3
    assert float(loss) == pytest.approx(real + fake, rel=1e-6)
    assert parts["real"] == pytest.approx(real)
    assert parts["fake"] == pytest.approx(fake)
    assert parts["accuracy"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    sig = [1 / (1 + math.exp(-z)) for z in (-1.0, 1.0, 3.0)]
    assert parts["p_real_on_fake"] == pytest.approx(sum(sig) / 3, rel=1e-6)


def test_discriminator_loss_is_finite_for_confident_logits() -> None:
    loss, parts = discriminator_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert float(loss) == pytest.approx(200.0)
    assert parts["accuracy"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        discriminator_loss(torch.zeros(0), torch.zeros(1))


# ---------------------------------------------------------------- history buffer


def ids(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None]


def test_history_empty_buffer_returns_the_current_batch() -> None:
    buffer = HistoryBuffer(8, seed=0)
    out = buffer.push_and_sample(ids(0, 4))
    assert torch.equal(out, ids(0, 4))
    assert len(buffer) == 4


def test_history_mixes_half_old_half_current_and_stores_current() -> None:
    buffer = HistoryBuffer(8, seed=0)
    pushed: set[float] = set()
    for step in range(10):
        batch = ids(100 * step, 4)
        out = buffer.push_and_sample(batch)
        assert out.shape == batch.shape
        if step > 0:
            assert torch.equal(out[:2], batch[:2])  # current samples first
            old = set(out[2:, 0].tolist())
            assert len(old) == 2
            assert old <= pushed
        pushed |= set(batch[:, 0].tolist())
        stored = set(buffer.state_dict()["items"][0][:, 0].tolist())
        assert len(buffer) == min(8, 4 * (step + 1)) == len(stored)
        assert stored <= pushed
        assert set(batch[:, 0].tolist()) <= stored


def test_history_fraction_is_kept_in_expectation_for_batches_of_one() -> None:
    buffer = HistoryBuffer(16, seed=0)
    buffer.push_and_sample(ids(-1, 1))
    from_history = sum(float(buffer.push_and_sample(ids(i, 1))) != i for i in range(400))
    assert 160 < from_history < 240
    assert all(float(HistoryBuffer(4, fraction=0.0).push_and_sample(ids(i, 1))) == i for i in range(3))


def test_history_keeps_tuples_aligned() -> None:
    buffer = HistoryBuffer(6, seed=1)
    for step in range(6):
        x = ids(10 * step, 3)
        reference = x[:, :, None, None].expand(3, 1, 2, 5) * 10  # another shape, same first dim
        out_x, out_ref = buffer.push_and_sample((x, reference))
        assert torch.equal(out_ref, out_x[:, :, None, None].expand(3, 1, 2, 5) * 10)


def test_history_is_deterministic_given_a_seed_or_a_generator() -> None:
    def run(buffer: HistoryBuffer, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [buffer.push_and_sample(ids(10 * i, 4), generator) for i in range(8)]

    a, b, c = run(HistoryBuffer(6, seed=3)), run(HistoryBuffer(6, seed=3)), run(HistoryBuffer(6, seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    d, e = run(HistoryBuffer(6, seed=0), g1), run(HistoryBuffer(6, seed=1), g2)
    assert all(torch.equal(x, y) for x, y in zip(d, e, strict=True))


def test_history_state_round_trip_resumes_exactly() -> None:
    original = HistoryBuffer(5, seed=7)
    for i in range(4):
        original.push_and_sample((ids(10 * i, 3), ids(10 * i, 3) + 0.5))
    blob = io.BytesIO()
    torch.save(original.state_dict(), blob)
    blob.seek(0)
    resumed = HistoryBuffer(5, seed=123)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    assert len(resumed) == len(original)
    for i in range(4, 9):
        batch = (ids(10 * i, 3), ids(10 * i, 3) + 0.5)
        for x, y in zip(original.push_and_sample(batch), resumed.push_and_sample(batch), strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="capacity"):
        HistoryBuffer(6).load_state_dict(original.state_dict())


def test_history_detaches_and_copies() -> None:
    buffer = HistoryBuffer(4, seed=0)
    x = ids(0, 2).requires_grad_()
    out = buffer.push_and_sample(x * 1)
    assert not out.requires_grad
    y = ids(10, 2)
    buffer.push_and_sample(y)
    y.fill_(-5)
    assert -5 not in buffer.state_dict()["items"][0]


def test_history_batch_larger_than_capacity() -> None:
    buffer = HistoryBuffer(3, seed=0)
    buffer.push_and_sample(ids(0, 5))
    assert len(buffer) == 3
    buffer.push_and_sample(ids(10, 5))
    assert set(buffer.state_dict()["items"][0][:, 0].tolist()) == {12.0, 13.0, 14.0}


def test_history_rejects_inconsistent_batches() -> None:
    with pytest.raises(ValueError, match="capacity"):
        HistoryBuffer(0)
    with pytest.raises(ValueError, match="fraction"):
        HistoryBuffer(4, fraction=1.5)
    buffer = HistoryBuffer(4)
    with pytest.raises(ValueError, match="first dimension"):
        buffer.push_and_sample((ids(0, 2), ids(0, 3)))
    buffer.push_and_sample(ids(0, 2))
    with pytest.raises(ValueError, match="does not match"):
        buffer.push_and_sample(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not match"):
        buffer.push_and_sample((ids(0, 2), ids(0, 2)))
    with pytest.raises(ValueError, match="does not match"):
        buffer.push_and_sample(ids(0, 2).double())
