"""pysynth::weighted_two_head_loss: the Triton kernels (run by the interpreter on the CPU) against the PyTorch twin."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from pysynth.kernels.weighted_loss import (
    _importance_weights,
    weighted_two_head_loss,
    weighted_two_head_loss_reference,
)
from pysynth.train.targets import two_head_loss


@pytest.fixture
def needs_triton() -> None:
    pytest.importorskip("triton")


def make_inputs(n, h, w, d_shape=(5, 5), *, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, 2, h, w, generator=g, dtype=torch.float64)).to(dtype)
    detection = (torch.rand(n, h, w, generator=g) > 0.8).float()
    segmentation = torch.rand(n, h, w, generator=g)  # soft targets are allowed
    pixel_weights = torch.rand(n, h, w, generator=g)
    d_map = torch.rand(n, *d_shape, generator=g)
    return logits, detection, segmentation, pixel_weights, d_map


def loss_and_grad(fn, logits, *args, **kwargs):
    """Per-sample loss, weights and d(Σ_n r_n·loss_n)/d logits for a fixed random r (every sample's gradient)."""
    logits = logits.detach().requires_grad_()
    loss, weights = fn(logits, *args, **kwargs)
    r = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * r).sum(), logits)
    return loss.detach(), weights, grad


def triton_op(*args, **kwargs):
    return weighted_two_head_loss(*args, use_triton=True, **kwargs)


def twin_op(*args, **kwargs):
    return weighted_two_head_loss(*args, use_triton=False, **kwargs)


def assert_close_to_reference(fn, inputs, *, rtol=1e-5, atol=1e-6, **kwargs):
    loss, weights, grad = loss_and_grad(fn, *inputs, **kwargs)
    ref_loss, ref_weights, ref_grad = loss_and_grad(weighted_two_head_loss_reference, *inputs, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(weights, ref_weights, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol * 1e-2)
    assert grad.dtype == inputs[0].dtype
    assert grad.shape == inputs[0].shape


# --- the Triton kernels against the twin ----------------------------------------------------------------------


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize(
    ("n", "h", "w", "d_shape"),
    [
        (3, 37, 29, (5, 5)),  # odd size, two pixel blocks, the last one partial
        (2, 8, 8, (1, 1)),  # one pixel block, a 1x1 discriminator map
        (1, 1, 1, (1, 5, 5)),  # a single pixel; a map with a channel axis
        (2, 16, 9, (12, 12)),  # a map larger than one finishing block
    ],
)
def test_triton_matches_twin(n, h, w, d_shape):
    inputs = make_inputs(n, h, w, d_shape, seed=n * h * w)
    assert_close_to_reference(triton_op, inputs)
    assert_close_to_reference(twin_op, inputs)


@pytest.mark.usefixtures("needs_triton")
def test_triton_many_pixel_blocks():
    # 130 blocks of pixels per sample: the finishing kernel loops over more than one block of partial sums.
    inputs = make_inputs(1, 364, 364, seed=5)
    assert_close_to_reference(triton_op, inputs, rtol=2e-5)


@pytest.mark.usefixtures("needs_triton")
def test_triton_non_contiguous_inputs():
    n, h, w = 2, 13, 11
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, 2, w, h, generator=g).transpose(-1, -2)  # (N, 2, H, W), transposed
    detection = (torch.rand(n, h, 2 * w, generator=g) > 0.5).float()[..., ::2]  # strided
    segmentation = torch.rand(h, w, n, generator=g).permute(2, 0, 1)
    pixel_weights = torch.rand(h, w, generator=g)  # (H, W), broadcast over the batch
    d_map = torch.rand(n, 5, 5, generator=g).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (logits, detection, segmentation, d_map))
    inputs = (logits, detection, segmentation, pixel_weights, d_map)
    contiguous = [t.contiguous() for t in inputs[:3]] + [pixel_weights.expand(n, h, w).contiguous(), d_map.contiguous()]
    for fn in (triton_op, twin_op):
        loss, weights, grad = loss_and_grad(fn, *inputs)
        ref_loss, ref_weights, ref_grad = loss_and_grad(weighted_two_head_loss_reference, *contiguous)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, ref_weights)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("big", [30.0, 1e4])
def test_extreme_logits(big):
    n, h, w = 2, 5, 7
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(n, h, w, seed=7)
    signs = torch.where(torch.rand(n, 2, h, w, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    logits = big * signs
    segmentation = segmentation.round()  # some pixels right with certainty, some wrong
    inputs = (logits, detection, segmentation, pixel_weights, d_map)
    # The truth in float64: max(x, 0) − x·t + log1p(exp(−|x|)).
    x, t = logits.double(), torch.stack([detection, segmentation], 1).double()
    bce = (x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))) * pixel_weights.double()[:, None]
    weights = _importance_weights(d_map).double()
    expected = weights * bce.sum(dim=(1, 2, 3)) / pixel_weights.double().sum(dim=(1, 2))
    for fn in (triton_op, twin_op, weighted_two_head_loss_reference):
        loss, _, grad = loss_and_grad(fn, *inputs)
        assert torch.isfinite(loss).all()
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
        # sigmoid(±big) is 0 or 1 in float32, so the gradient is w·pw·(step(x) − t)/Σpw exactly up to rounding.
        step = (logits > 0).double()
        r = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
        scale = r * weights / pixel_weights.double().sum(dim=(1, 2))
        expected_grad = scale[:, None, None, None] * pixel_weights.double()[:, None] * (step - t)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("fn", [triton_op, twin_op, weighted_two_head_loss_reference])
def test_zero_pixel_weights_give_zero_loss_and_gradient(fn):
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(3, 6, 5, seed=11)
    pixel_weights[1] = 0
    loss, _, grad = loss_and_grad(fn, logits, detection, segmentation, pixel_weights, d_map)
    assert loss[1] == 0
    assert (grad[1] == 0).all()
    assert torch.isfinite(loss).all()
    assert (loss[[0, 2]] > 0).all()


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("fn", [triton_op, twin_op, weighted_two_head_loss_reference])
def test_importance_weights_clip_and_nan_guard(fn):
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
    loss, weights, grad = loss_and_grad(fn, logits, detection, segmentation, pixel_weights, d_map, c=1.5)
    expected = torch.tensor([0.2, 2.0, 0.2, 2.0, 0.2, 1.5])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    unweighted, _ = weighted_two_head_loss_reference(
        logits, detection, segmentation, pixel_weights, torch.full((n, 1), 0.5), c=1.0
    )
    torch.testing.assert_close(loss, expected * unweighted.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("fn", [triton_op, twin_op])
def test_weights_output_has_no_gradient(fn):
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 5, 4, seed=17)
    logits.requires_grad_()
    d_map.requires_grad_()
    loss, weights = fn(logits, detection, segmentation, pixel_weights, d_map)
    assert loss.requires_grad
    assert not weights.requires_grad
    assert loss.shape == weights.shape == (2,)
    assert loss.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(weights, _importance_weights(d_map))
    # No gradient reaches the discriminator's map (nor the targets and pixel weights).
    (grad_logits, grad_d) = torch.autograd.grad(loss.sum(), [logits, d_map], allow_unused=True)
    assert grad_logits is not None
    assert grad_d is None


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("fn", [triton_op, twin_op, weighted_two_head_loss_reference])
def test_mean_equals_two_head_loss(fn):
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(4, 9, 7, seed=19)
    loss, weights = fn(logits, detection, segmentation, pixel_weights, d_map)
    expected, _ = two_head_loss(logits, detection, segmentation, pixel_weights, sample_weights=weights, dice_weight=0)
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-6, atol=1e-7)
    # (H, W) pixel weights, as two_head_loss also takes them.
    loss, weights = fn(logits, detection, segmentation, pixel_weights[0], d_map)
    expected, _ = two_head_loss(logits, detection, segmentation, pixel_weights[0], sample_weights=weights)
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("fn", [triton_op, twin_op])
def test_known_value(fn):
    # Zero logits: each head's BCE is log 2 whatever the target; D = 0.5 gives w = c.
    n, h, w = 2, 3, 4
    zeros = torch.zeros(n, 2, h, w)
    loss, weights = fn(zeros, torch.rand(n, h, w), torch.rand(n, h, w), torch.rand(n, h, w), torch.full((n, 2, 2), 0.5))
    torch.testing.assert_close(weights, torch.ones(n))
    torch.testing.assert_close(loss, torch.full((n,), 2 * math.log(2)))


@pytest.mark.usefixtures("needs_triton")
def test_triton_half_precision_logits():
    inputs = make_inputs(2, 11, 10, seed=23, dtype=torch.float16)
    loss, _, grad = loss_and_grad(triton_op, *inputs)
    ref_loss, _, ref_grad = loss_and_grad(twin_op, *inputs)
    assert loss.dtype == torch.float32
    assert grad.dtype == torch.float16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)


# --- gradients in float64 -------------------------------------------------------------------------------------


def test_gradcheck_reference():
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 3, 4, seed=29, dtype=torch.float64)
    logits.requires_grad_()

    def fn(x):
        return weighted_two_head_loss_reference(x, detection, segmentation, pixel_weights, d_map)[0]

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("use_triton", [False, True])
def test_gradcheck_op(use_triton):
    if use_triton:
        pytest.importorskip("triton")
    # The registered backward (Triton kernel or PyTorch formula) against finite differences.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 3, 4, seed=31, dtype=torch.float64)
    logits.requires_grad_()

    def fn(x):
        return weighted_two_head_loss(x, detection, segmentation, pixel_weights, d_map, use_triton=use_triton)[0]

    assert fn(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    if use_triton:
        pytest.importorskip("triton")
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 5, 3, seed=37)
    logits.requires_grad_()
    args = (logits, detection, segmentation, pixel_weights, d_map, 1.0, 0.2, 2.0, 1e-6, use_triton)
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
    loss, _ = weighted_two_head_loss(*make_inputs(1, 3, 3))
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
        ({"eps": 0.0}, "eps must be"),
        ({"clip_lo": 3.0}, "clip_lo <= clip_hi"),
        ({"c": -1.0}, "c must be"),
        ({"c": float("nan")}, "c must be"),
    ],
)
def test_rejects_bad_input(change, match):
    names = ("logits", "detection", "segmentation", "pixel_weights", "d_map")
    kwargs = dict(zip(names, make_inputs(2, 4, 5), strict=True)) | change
    with pytest.raises(ValueError, match=match):
        weighted_two_head_loss(**kwargs)


def test_boolean_targets_and_weights():
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 4, 5, seed=41)
    loss, _ = weighted_two_head_loss(logits, detection.bool(), segmentation > 0.5, pixel_weights > 0.5, d_map)
    ref, _ = weighted_two_head_loss_reference(
        logits, detection, (segmentation > 0.5).float(), (pixel_weights > 0.5).float(), d_map
    )
    torch.testing.assert_close(loss, ref)


def test_import_does_not_need_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pysynth.kernels.weighted_loss import weighted_two_head_loss\n"
        "loss, w = weighted_two_head_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3), torch.zeros(1, 3, 3),"
        " torch.ones(1, 3, 3), torch.full((1, 5, 5), 0.5))\n"
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
    logits, detection, segmentation, pixel_weights, d_map = make_inputs(2, 9, 7, seed=43)

    def step(x):
        loss, weights = weighted_two_head_loss(x, detection, segmentation, pixel_weights, d_map, use_triton=use_triton)
        return loss.mean(), weights

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    x = logits.clone().requires_grad_()
    loss, weights = compiled(x)
    loss.backward()
    y = logits.clone().requires_grad_()
    ref_loss, ref_weights = weighted_two_head_loss_reference(y, detection, segmentation, pixel_weights, d_map)
    ref_loss.mean().backward()
    torch.testing.assert_close(loss, ref_loss.mean())
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.needs_cuda
@pytest.mark.usefixtures("needs_triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_runs_triton_and_matches_twin(dtype, monkeypatch):
    from pysynth.kernels import weighted_loss

    calls = []
    forward = weighted_loss._forward_triton
    monkeypatch.setattr(weighted_loss, "_forward_triton", lambda *a: calls.append(1) or forward(*a))
    inputs = [t.cuda() for t in make_inputs(4, 97, 131, seed=47, dtype=dtype)]
    ours = loss_and_grad(weighted_two_head_loss, *inputs)
    assert calls, "use_triton=None did not pick the Triton kernels for CUDA tensors"
    twin = loss_and_grad(twin_op, *inputs)
    torch.testing.assert_close(ours[0], twin[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], twin[1])
    torch.testing.assert_close(ours[2], twin[2], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-8)


def test_bench_section_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the section would time it")
    from pysynth.bench import weighted_loss as section

    assert section.run(quick=True) == [{"status": "needs a CUDA GPU: the Triton kernel is not timed on CPU"}]
