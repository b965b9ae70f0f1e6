"""pysynth::weighted_two_head_loss against an independent float64 composition of the published formulas.

Both of the op's paths are held to :func:`composition`, written here from the formulas and sharing no code with the
op or with ``two_head_loss``: the PyTorch path the op runs on the CPU, and the Triton kernels, run on the CPU by the
interpreter (``TRITON_INTERPRET=1``, set in conftest.py). Forward and backward, with and without the soft Dice term.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from pysynth.gan.weights import importance_weights
from pysynth.kernels.weighted_loss import weighted_two_head_loss, weighted_two_head_loss_reference
from pysynth.train.targets import two_head_loss


@pytest.fixture
def needs_triton() -> None:
    pytest.importorskip("triton")


# --- the float64 composition ----------------------------------------------------------------------------------


def composition_weights(d_map, *, c=1.0, clip_lo=0.2, clip_hi=2.0, eps=1e-6) -> torch.Tensor:
    """Paper Eqs. 3-5 with the released code's choices, one sample at a time in Python floats.

    ``D`` is the exact mean (``math.fsum``) of the sample's map of Pr(real); NaN gives ``clip_lo``; otherwise
    ``clip(c · D/(1 − D), clip_lo, clip_hi)`` of ``D`` clamped to ``[eps, 1 − eps]``.
    """
    out = []
    for values in d_map.detach().double().reshape(d_map.shape[0], -1).tolist():
        d = math.fsum(values) / len(values)
        if math.isnan(d):
            out.append(clip_lo)
            continue
        d = min(max(d, eps), 1.0 - eps)
        out.append(min(max(c * d / (1.0 - d), clip_lo), clip_hi))
    return torch.tensor(out, dtype=torch.float64)


def composition(
    logits, detection, segmentation, pixel_weights, d_map, *, c=1.0, clip_lo=0.2, clip_hi=2.0, eps=1e-6, dice_weight=0.0
):
    """``(loss, weights)`` in float64, differentiable in ``logits`` by autograd through elementary torch functions.

    Per sample, with ``x`` a head's logits, ``σ = 1/(1 + e^−x)``, ``t`` its target and ``pw`` the pixel weights:
    ``BCE = −t·log σ − (1 − t)·log(1 − σ) = log(1 + e^x) − x·t`` per pixel; the BCE term is
    ``Σ_px pw·(BCE_det + BCE_seg) / Σ_px pw`` (0 where ``Σ pw`` is 0); each head's soft Dice loss is
    ``1 − (2·Σ(σ·pw)(t·pw) + 1) / (Σ σ·pw + Σ t·pw + 1)`` (Dice of the pixel-weighted prediction and target,
    smoothed by 1); the loss is ``w · (BCE term + dice_weight · (Dice_det + Dice_seg))``.
    """
    x = logits.double()
    n = x.shape[0]
    pw = pixel_weights.double().expand(n, *x.shape[2:])
    weights = composition_weights(d_map, c=c, clip_lo=clip_lo, clip_hi=clip_hi, eps=eps)
    pw_total = pw.sum(dim=(1, 2))
    bce_total = torch.zeros(n, dtype=torch.float64)
    dice_total = torch.zeros(n, dtype=torch.float64)
    for head, target in enumerate((detection, segmentation)):
        xh, t = x[:, head], target.double()
        bce = torch.logaddexp(torch.zeros_like(xh), xh) - xh * t
        bce_total = bce_total + (pw * bce).sum(dim=(1, 2))
        p, q = torch.sigmoid(xh) * pw, t * pw
        dice = 1.0 - (2.0 * (p * q).sum(dim=(1, 2)) + 1.0) / (p.sum(dim=(1, 2)) + q.sum(dim=(1, 2)) + 1.0)
        dice_total = dice_total + dice
    bce_term = torch.where(pw_total > 0, bce_total / torch.where(pw_total > 0, pw_total, 1.0), 0.0)
    return weights * (bce_term + dice_weight * dice_total), weights


# --- inputs and comparison ------------------------------------------------------------------------------------


def make_inputs(n, h, w, d_shape=(5, 5), *, seed=0, dtype=torch.float32, scale=3.0, d_pattern="uniform", pw="random"):
    """Random logits and targets, and a pattern of importance weights (``d_pattern``) and pixel weights (``pw``).

    ``d_pattern``: ``"uniform"`` maps in (0, 1); ``"bounds"``, samples in turn near 0, near 1 and in between (weights
    at both clip bounds and inside); ``"nan"``, uniform with a NaN cell in sample 0. ``pw``: ``"random"`` in (0, 1);
    ``"binary"``, a 0/1 ignore mask; ``"border"``, 1 inside and 0.01 within 2 px of the edge (the released code's
    border weights, scaled down), with sample 0's left half weighted 0.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, 2, h, w, generator=g, dtype=torch.float64)).to(dtype)
    detection = (torch.rand(n, h, w, generator=g) > 0.8).float()
    segmentation = torch.rand(n, h, w, generator=g)  # soft targets are allowed
    if pw == "random":
        pixel_weights = torch.rand(n, h, w, generator=g)
    elif pw == "binary":
        pixel_weights = (torch.rand(n, h, w, generator=g) > 0.3).float()
    else:
        pixel_weights = torch.full((n, h, w), 0.01)
        pixel_weights[:, 2 : h - 2, 2 : w - 2] = 1.0
        pixel_weights[0, :, : w // 2] = 0.0
    d_map = torch.rand(n, *d_shape, generator=g)
    if d_pattern == "bounds":
        spread = torch.rand(n, *d_shape, generator=g)
        for k in range(n):
            d_map[k] = (1e-3 * spread[k], 1 - 1e-3 * spread[k], 0.2 + 0.6 * spread[k])[k % 3]
    elif d_pattern == "nan":
        d_map.view(n, -1)[0, 0] = math.nan
    return logits, detection, segmentation, pixel_weights, d_map


def loss_and_grad(fn, logits, *args, **kwargs):
    """Per-sample loss, weights and d(Σ_n r_n·loss_n)/d logits for a fixed random r (every sample's gradient)."""
    logits = logits.detach().requires_grad_()
    loss, weights = fn(logits, *args, **kwargs)
    r = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * r).sum(), logits)
    return loss.detach(), weights, grad


def composition_loss_and_grad(logits, *args, **kwargs):
    """:func:`loss_and_grad` of the composition, from the logits in float64."""
    return loss_and_grad(composition, logits.double(), *args, **kwargs)


def triton_op(*args, **kwargs):
    return weighted_two_head_loss(*args, use_triton=True, **kwargs)


def twin_op(*args, **kwargs):
    return weighted_two_head_loss(*args, use_triton=False, **kwargs)


PATHS = {"triton": triton_op, "twin": twin_op, "reference": weighted_two_head_loss_reference}


def path(name: str):
    if name == "triton":
        pytest.importorskip("triton")
    return PATHS[name]


def assert_matches_composition(fn, inputs, *, rtol=1e-5, grad_rtol=1e-4, **kwargs):
    """The path's loss, weights and gradient against the float64 composition of the same inputs."""
    loss, weights, grad = loss_and_grad(fn, *inputs, **kwargs)
    ref_loss, ref_weights, ref_grad = composition_loss_and_grad(*inputs, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=1e-6)
    # The weights are the float64 formula rounded once to the loss's dtype.
    torch.testing.assert_close(
        weights.double(), ref_weights, rtol=1e-7 if weights.dtype == torch.float32 else 1e-14, atol=0
    )
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=1e-6 * float(ref_grad.abs().max()))
    assert grad.dtype == inputs[0].dtype
    assert grad.shape == inputs[0].shape
    return loss, weights, grad


# --- both paths against the composition -----------------------------------------------------------------------

CASES = {
    # two pixel blocks, the last one partial
    "two-blocks": ((3, 37, 29, (5, 5)), {"d_pattern": "uniform", "pw": "random"}, {}),
    # one pixel block, a 1x1 map, weights at both clip bounds, a 0/1 mask, another c and clip
    "bounds": ((3, 8, 8, (1, 1)), {"d_pattern": "bounds", "pw": "binary"}, {"c": 0.7, "clip_lo": 0.1, "clip_hi": 3.0}),
    # a single pixel; a map with a channel axis
    "one-pixel": ((1, 1, 1, (1, 5, 5)), {"d_pattern": "uniform", "pw": "random"}, {}),
    # a map larger than one finishing block, a NaN map, border weights and a zero-weighted half, no upper clip
    "nan-border": ((4, 16, 9, (12, 12)), {"d_pattern": "nan", "pw": "border"}, {"c": 1.5, "clip_hi": math.inf}),
}


@pytest.mark.parametrize("name", ["triton", "twin", "reference"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_the_float64_composition(name, dice_weight, case):
    (n, h, w, d_shape), patterns, kwargs = CASES[case]
    inputs = make_inputs(n, h, w, d_shape, seed=n * h * w, **patterns)
    assert_matches_composition(path(name), inputs, dice_weight=dice_weight, **kwargs)


@pytest.mark.parametrize("name", ["triton", "twin"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5, 2.0])
def test_float64_logits_match_the_composition_to_float64_rounding(name, dice_weight):
    # In float64 the op is the composition up to summation order: a wrong term anywhere would show at 1e-6.
    inputs = make_inputs(3, 13, 11, (4, 4), seed=53, dtype=torch.float64, d_pattern="bounds", pw="border")
    loss, weights, grad = loss_and_grad(path(name), *inputs, dice_weight=dice_weight, c=1.3)
    ref_loss, ref_weights, ref_grad = composition_loss_and_grad(*inputs, dice_weight=dice_weight, c=1.3)
    assert loss.dtype == weights.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.usefixtures("needs_triton")
def test_triton_many_pixel_blocks():
    # 130 blocks of pixels per sample: the finishing kernel loops over more than one block of partial sums.
    inputs = make_inputs(1, 364, 364, seed=5)
    assert_matches_composition(triton_op, inputs, rtol=2e-5, dice_weight=0.5)


@pytest.mark.parametrize("name", ["triton", "twin"])
def test_non_contiguous_inputs(name):
    n, h, w = 2, 13, 11
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, 2, w, h, generator=g).transpose(-1, -2)  # (N, 2, H, W), transposed
    detection = (torch.rand(n, h, 2 * w, generator=g) > 0.5).float()[..., ::2]  # strided
    segmentation = torch.rand(h, w, n, generator=g).permute(2, 0, 1)
    pixel_weights = torch.rand(h, w, generator=g)  # (H, W), broadcast over the batch
    d_map = torch.rand(n, 5, 5, generator=g).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (logits, detection, segmentation, d_map))
    inputs = (logits, detection, segmentation, pixel_weights, d_map)
    assert_matches_composition(path(name), inputs, dice_weight=0.5)


@pytest.mark.parametrize("name", ["triton", "twin", "reference"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
@pytest.mark.parametrize("big", [30.0, 1e4])
def test_extreme_logits(name, dice_weight, big):
    n, h, w = 2, 5, 7
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(n, h, w, seed=7)
    signs = torch.where(torch.rand(n, 2, h, w, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    logits = big * signs
    segmentation = segmentation.round()  # some pixels right with certainty, some wrong
    inputs = (logits, detection, segmentation, pixel_weights, d_map)
    loss, _, grad = assert_matches_composition(path(name), inputs, rtol=1e-6, grad_rtol=1e-5, dice_weight=dice_weight)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["triton", "twin", "reference"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_zero_pixel_weights_give_zero_loss_and_gradient(name, dice_weight):
    # Nothing weighted: the BCE term is 0/max(0, 1e-12) and both Dice sums are 0, so Dice is 1 − 1/1 = 0.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(3, 6, 5, seed=11)
    pixel_weights[1] = 0
    loss, _, grad = loss_and_grad(
        path(name), logits, detection, segmentation, pixel_weights, d_map, dice_weight=dice_weight
    )
    assert loss[1] == 0
    assert (grad[1] == 0).all()
    assert torch.isfinite(loss).all()
    assert (loss[[0, 2]] > 0).all()


@pytest.mark.parametrize("name", ["triton", "twin", "reference"])
def test_importance_weights_clip_and_nan_guard(name):
    n = 6
    logits, detection, segmentation, pixel_weights, _ = make_inputs(n, 4, 4, seed=13)
    d_map = torch.empty(n, 3, 3)
    d_map[0] = 0.0  # D clamped to eps: w = eps/(1 − eps), clipped up to clip_lo
    d_map[1] = 1.0  # D clamped to 1 − eps: w ≈ 1e6, clipped down to clip_hi
    d_map[2] = 1e-7
    d_map[3] = 1 - 1e-7
    d_map[4] = 0.5
    d_map[4, 0, 0] = float("nan")  # one NaN makes the mean NaN: w = clip_lo
    d_map[5] = torch.linspace(0.3, 0.7, 9).reshape(3, 3)  # mean 0.5: w = c
    inputs = (logits, detection, segmentation, pixel_weights, d_map)
    loss, weights, grad = loss_and_grad(path(name), *inputs, c=1.5, dice_weight=0.5)
    expected = torch.tensor([0.2, 2.0, 0.2, 2.0, 0.2, 1.5])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    unweighted, _ = composition(*inputs[:4], torch.full((n, 1), 0.5), dice_weight=0.5)
    torch.testing.assert_close(loss.double(), expected.double() * unweighted.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["triton", "twin"])
def test_weights_output_has_no_gradient(name):
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 5, 4, seed=17)
    logits.requires_grad_()
    d_map.requires_grad_()
    loss, weights = path(name)(logits, detection, segmentation, pixel_weights, d_map, dice_weight=0.5)
    assert loss.requires_grad
    assert not weights.requires_grad
    assert loss.shape == weights.shape == (2,)
    assert loss.dtype == weights.dtype == torch.float32
    # No gradient reaches the discriminator's map (nor the targets and pixel weights).
    (grad_logits, grad_d) = torch.autograd.grad(loss.sum(), [logits, d_map], allow_unused=True)
    assert grad_logits is not None
    assert grad_d is None


@pytest.mark.parametrize("name", ["triton", "twin"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_mean_and_gradient_equal_the_unfused_training_loss(name, dice_weight):
    # The op replaces two_head_loss(..., sample_weights=importance_weights(D), dice_weight) in joint training.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(4, 9, 7, seed=19)
    for pw in (pixel_weights, pixel_weights[0]):  # (N, H, W) and (H, W) pixel weights, as two_head_loss takes both
        x = logits.clone().requires_grad_()
        loss, weights = path(name)(x, detection, segmentation, pw, d_map, dice_weight=dice_weight)
        torch.testing.assert_close(weights, importance_weights(d_map), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(loss.mean(), x)
        y = logits.clone().requires_grad_()
        expected, _ = two_head_loss(
            y, detection, segmentation, pw, sample_weights=importance_weights(d_map), dice_weight=dice_weight
        )
        (expected_grad,) = torch.autograd.grad(expected, y)
        torch.testing.assert_close(loss.mean(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["triton", "twin"])
def test_known_value(name):
    # Zero logits: each head's BCE is log 2 whatever the target; D = 0.5 gives w = c. With empty targets and unit
    # pixel weights each head's soft Dice is 1 − 1/(Σσ + 1) = 1 − 1/(0.5·12 + 1) = 6/7.
    n, h, w = 2, 3, 4
    zeros, empty = torch.zeros(n, 2, h, w), torch.zeros(n, h, w)
    fn = path(name)
    loss, weights = fn(zeros, torch.rand(n, h, w), torch.rand(n, h, w), torch.rand(n, h, w), torch.full((n, 2, 2), 0.5))
    torch.testing.assert_close(weights, torch.ones(n))
    torch.testing.assert_close(loss, torch.full((n,), 2 * math.log(2)))
    loss, _ = fn(zeros, empty, empty, torch.ones(n, h, w), torch.full((n, 2, 2), 0.5), c=2.0, dice_weight=0.5)
    torch.testing.assert_close(loss, torch.full((n,), 2.0 * (2 * math.log(2) + 0.5 * 12 / 7)))


@pytest.mark.usefixtures("needs_triton")
def test_triton_half_precision_logits():
    inputs = make_inputs(2, 11, 10, seed=23, dtype=torch.float16)
    loss, _, grad = loss_and_grad(triton_op, *inputs, dice_weight=0.5)
    ref_loss, _, ref_grad = composition_loss_and_grad(*inputs, dice_weight=0.5)
    assert loss.dtype == torch.float32
    assert grad.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)


# --- gradients in float64 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_gradcheck_reference(dice_weight):
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 3, 4, seed=29, dtype=torch.float64)
    logits.requires_grad_()

    def fn(x):
        return weighted_two_head_loss_reference(
            x, detection, segmentation, pixel_weights, d_map, dice_weight=dice_weight
        )[0]

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_gradcheck_op(use_triton, dice_weight):
    if use_triton:
        pytest.importorskip("triton")
    # The registered backward (Triton kernel or PyTorch formula) against finite differences.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 3, 4, seed=31, dtype=torch.float64)
    logits.requires_grad_()

    def fn(x):
        return weighted_two_head_loss(
            x, detection, segmentation, pixel_weights, d_map, dice_weight=dice_weight, use_triton=use_triton
        )[0]

    assert fn(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    if use_triton:
        pytest.importorskip("triton")
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 5, 3, seed=37)
    logits.requires_grad_()
    args = (logits, detection, segmentation, pixel_weights, d_map, 1.0, 0.2, 2.0, 1e-6, 0.5, use_triton)
    torch.library.opcheck(
        torch.ops.pysynth.weighted_two_head_loss.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# --- the contract -----------------------------------------------------------------------------------------------


def test_auto_uses_the_twin_on_cpu(monkeypatch):
    from pysynth.kernels import weighted_loss

    def fail(*args):
        raise AssertionError("the Triton path ran on CPU tensors")

    monkeypatch.setattr(weighted_loss, "_forward_triton", fail)
    loss, _ = weighted_two_head_loss(*make_inputs(1, 3, 3), dice_weight=0.5)
    assert loss.shape == (1,)


@pytest.mark.usefixtures("needs_triton")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_op(*make_inputs(1, 3, 3))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"logits": torch.zeros(2, 3, 4, 5)}, r"logits must be \(N, 2, H, W\)"),
        ({"logits": torch.zeros(2, 2, 0, 5)}, "N, H, W >= 1"),
        ({"logits": torch.zeros(2, 2, 4, 5, dtype=torch.int64)}, "floating point"),
        ({"detection": torch.zeros(2, 5, 4)}, "detection must be"),
        ({"segmentation": torch.zeros(1, 4, 5)}, "segmentation must be"),
        ({"pixel_weights": torch.zeros(4, 4)}, "pixel_weights must be"),
        ({"d_map": torch.zeros(3, 5, 5)}, "d_map must be"),
        ({"d_map": torch.zeros(2, 0)}, "d_map must be"),
        # The scalars are checked by pysynth.gan.weights, as for importance_weights.
        ({"eps": 0.0}, "eps must be"),
        ({"clip_lo": 3.0}, "clip must be"),
        ({"clip_lo": -0.1}, "clip must be"),
        ({"c": -1.0}, "c must be"),
        ({"c": 0.0}, "c must be"),
        ({"c": float("nan")}, "c must be"),
        ({"dice_weight": -0.5}, "dice_weight must be"),
        ({"dice_weight": float("inf")}, "dice_weight must be"),
    ],
)
def test_rejects_bad_input(change, match):
    names = ("logits", "detection", "segmentation", "pixel_weights", "d_map")
    kwargs = dict(zip(names, make_inputs(2, 4, 5), strict=True)) | change
    with pytest.raises(ValueError, match=match):
        weighted_two_head_loss(**kwargs)


def test_boolean_targets_and_weights():
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 4, 5, seed=41)
    loss, _ = weighted_two_head_loss(
        logits, detection.bool(), segmentation > 0.5, pixel_weights > 0.5, d_map, dice_weight=0.5
    )
    ref, _ = composition(
        logits, detection, (segmentation > 0.5).float(), (pixel_weights > 0.5).float(), d_map, dice_weight=0.5
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_import_does_not_need_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pysynth.kernels.weighted_loss import weighted_two_head_loss\n"
        "loss, w = weighted_two_head_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3), torch.zeros(1, 3, 3),"
        " torch.ones(1, 3, 3), torch.full((1, 5, 5), 0.5), dice_weight=0.5)\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "print(float(w[0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(1.0)


@pytest.mark.parametrize("use_triton", [False, True])
def test_torch_compile_full_graph(use_triton):
    # The fake implementations let the op (and its backward) trace into one graph with dynamic shapes.
    if use_triton:
        pytest.importorskip("triton")
    inputs = make_inputs(2, 9, 7, seed=43)
    logits, detection, segmentation, pixel_weights, d_map = inputs

    def step(x):
        loss, weights = weighted_two_head_loss(
            x, detection, segmentation, pixel_weights, d_map, dice_weight=0.5, use_triton=use_triton
        )
        return loss.mean(), weights

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    x = logits.clone().requires_grad_()
    loss, weights = compiled(x)
    loss.backward()
    y = logits.double().requires_grad_()
    ref_loss, ref_weights = composition(y, *inputs[1:], dice_weight=0.5)
    ref_loss.mean().backward()
    torch.testing.assert_close(loss.double(), ref_loss.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-7, atol=0)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.needs_cuda
@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_cuda_auto_runs_triton_and_matches_the_composition(dtype, dice_weight, monkeypatch):
    from pysynth.kernels import weighted_loss

    calls = []
    forward = weighted_loss._forward_triton
    monkeypatch.setattr(weighted_loss, "_forward_triton", lambda *a: calls.append(1) or forward(*a))
    inputs = make_inputs(4, 97, 131, seed=47, dtype=dtype)
    loss, weights, grad = loss_and_grad(weighted_two_head_loss, *[t.cuda() for t in inputs], dice_weight=dice_weight)
    assert calls, "use_triton=None did not pick the Triton kernels for CUDA tensors"
    ref_loss, ref_weights, ref_grad = composition_loss_and_grad(*inputs, dice_weight=dice_weight)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.cpu().double(), ref_weights, rtol=1e-7, atol=0)
    scale = float(ref_grad.abs().max())
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=rtol, atol=rtol * 1e-2 * scale)


def test_bench_section_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the section would time it")
    from pysynth.bench import weighted_loss as section

    assert section.run(quick=True) == [{"status": "needs a CUDA GPU: the Triton kernel is not timed on CPU"}]
