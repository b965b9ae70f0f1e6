"""Importance-weighted two-head loss (docs/method.md §4-5), fused in Triton behind ``pysynth::weighted_two_head_loss``.

Per sample ``n``: ``D_n`` is the mean of the discriminator's map of Pr(real), clamped to ``[eps, 1 - eps]``;
``w_n = clip(c·D_n / (1 − D_n), clip_lo, clip_hi)`` (``clip_lo`` where ``D_n`` is NaN); the loss is
``w_n · Σ_px pw · (BCE_det + BCE_seg) / max(Σ_px pw, 1e-12)``. Gradients flow into the logits only.

On CUDA with Triton installed the op runs two fused kernels (per-block partial sums, then one program per
sample that finishes the sums, computes ``w_n`` from the map and the loss) and one backward kernel; elsewhere it
runs :func:`weighted_two_head_loss_reference`, plain PyTorch, which is also the specification the tests compare
the kernels with (under ``TRITON_INTERPRET=1`` on the CPU). Triton is imported on first use only.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import torch
from torch.nn import functional as F

from pysynth.kernels import triton_available

__all__ = ["weighted_two_head_loss", "weighted_two_head_loss_reference"]

# Pixels per program (times two heads); fixed, not autotuned, so the interpreter runs the same code.
BLOCK = 1024
# Partial sums or d_map entries a finishing program adds per step.
FINISH_BLOCK = 128
# Floor of a sample's pixel-weight total, as in pysynth.train.targets.two_head_loss.
MIN_WEIGHT_SUM = 1e-12

# Bound by _triton_kernels() on first use; the kernel functions below resolve them as globals when compiled.
triton = None
tl = None


def _importance_weights(
    d_map: torch.Tensor, *, c: float = 1.0, clip_lo: float = 0.2, clip_hi: float = 2.0, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample importance weights ``clip(c·D/(1 − D), clip_lo, clip_hi)`` from the discriminator's map.

    ``D`` is the mean of each sample's map, clamped to ``[eps, 1 - eps]``; a sample whose mean is NaN gets
    ``clip_lo``. No gradient flows into ``d_map``.

    Args:
        d_map: ``(N, ...)`` per-patch Pr(real), e.g. ``(N, 5, 5)`` or ``(N, 1, 5, 5)``.
        c: Scale of the odds (released code: 1).
        clip_lo: Least weight (released code: 0.2).
        clip_hi: Greatest weight (released code: 2.0).
        eps: How close to 0 and 1 ``D`` may come.

    Returns:
        ``(N,)`` weights, float32 (float64 for a float64 map).
    """
    dtype = torch.promote_types(d_map.dtype, torch.float32) if d_map.is_floating_point() else torch.float32
    d = d_map.detach().to(dtype).reshape(d_map.shape[0], -1).mean(dim=1)
    odds = d.clamp(eps, 1 - eps)
    w = (c * odds / (1 - odds)).clamp(clip_lo, clip_hi)
    return torch.where(torch.isnan(d), torch.full_like(w, clip_lo), w)


def weighted_two_head_loss_reference(
    logits: torch.Tensor,
    detection: torch.Tensor,
    segmentation: torch.Tensor,
    pixel_weights: torch.Tensor,
    d_map: torch.Tensor,
    *,
    c: float = 1.0,
    clip_lo: float = 0.2,
    clip_hi: float = 2.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's specification in plain PyTorch (autograd through ``F.binary_cross_entropy_with_logits``).

    Same arguments and results as :func:`weighted_two_head_loss`.
    """
    loss, weights, _ = _reference_parts(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps)
    return loss, weights


def weighted_two_head_loss(
    logits: torch.Tensor,
    detection: torch.Tensor,
    segmentation: torch.Tensor,
    pixel_weights: torch.Tensor,
    d_map: torch.Tensor,
    *,
    c: float = 1.0,
    clip_lo: float = 0.2,
    clip_hi: float = 2.0,
    eps: float = 1e-6,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample importance-weighted, pixel-weighted BCE of the detection and segmentation heads.

    The mean of the returned loss equals ``two_head_loss(logits, detection, segmentation, pixel_weights,
    sample_weights=weights)`` (``pysynth.train.targets``, without Dice).

    Args:
        logits: ``(N, 2, H, W)``: channel 0 detection, channel 1 segmentation.
        detection: ``(N, H, W)`` targets in [0, 1].
        segmentation: ``(N, H, W)`` targets in [0, 1].
        pixel_weights: ``(N, H, W)`` or ``(H, W)`` non-negative weights.
        d_map: ``(N, ...)`` the discriminator's per-patch Pr(real) in [0, 1], any map size.
        c: Scale of the odds ``D/(1 − D)``.
        clip_lo: Least importance weight, also used where a map's mean is NaN.
        clip_hi: Greatest importance weight.
        eps: ``D`` is clamped to ``[eps, 1 - eps]``.
        use_triton: Run the Triton kernels (True), the PyTorch twin (False), or Triton where the inputs are on a
            GPU and Triton is installed (None). True on CPU tensors needs ``TRITON_INTERPRET=1``.

    Returns:
        ``(loss, weights)``: the per-sample loss (differentiable in ``logits`` only) and the importance weights
        (no gradient), both float32 (float64 for float64 logits).

    Raises:
        ValueError: On shapes that do not fit together, an empty batch or image, mixed devices, or bad scalars.
        RuntimeError: If ``use_triton`` is True where Triton cannot run.

    Shape:
        - logits: ``(N, 2, H, W)``; targets and pixel weights ``(N, H, W)``; d_map ``(N, h, w)``.
        - loss, weights: ``(N,)``.
    """
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (N, 2, H, W), got {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"logits must have N, H, W >= 1, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    for name, t in (("detection", detection), ("segmentation", segmentation)):
        if tuple(t.shape) != (n, h, w):
            raise ValueError(f"{name} must be {(n, h, w)} like the logits, got {tuple(t.shape)}")
    if pixel_weights.ndim == 2 and tuple(pixel_weights.shape) == (h, w):
        pixel_weights = pixel_weights.expand(n, h, w)
    if tuple(pixel_weights.shape) != (n, h, w):
        raise ValueError(f"pixel_weights must be {(n, h, w)} or {(h, w)}, got {tuple(pixel_weights.shape)}")
    if d_map.ndim < 1 or d_map.shape[0] != n or d_map[0].numel() == 0:
        raise ValueError(f"d_map must be (N, ...) with N = {n} and a non-empty map, got {tuple(d_map.shape)}")
    devices = {t.device for t in (logits, detection, segmentation, pixel_weights, d_map)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if not 0 <= clip_lo <= clip_hi:
        raise ValueError(f"need 0 <= clip_lo <= clip_hi, got {clip_lo}, {clip_hi}")
    if not c >= 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if use_triton is None:
        use_triton = logits.is_cuda and triton_available()
    # Boolean or integer masks are fine as targets and weights; the kernels read floats.
    detection, segmentation, pixel_weights, d_map = (
        t if t.is_floating_point() else t.float() for t in (detection, segmentation, pixel_weights, d_map)
    )
    loss, weights, _ = torch.ops.pysynth.weighted_two_head_loss(
        logits,
        detection,
        segmentation,
        pixel_weights,
        d_map,
        float(c),
        float(clip_lo),
        float(clip_hi),
        float(eps),
        bool(use_triton),
    )
    return loss, weights


# --- the op ----------------------------------------------------------------------------------------------------


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """Sums and results are float32, float64 for float64 logits (half-precision logits are read as float32)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _reference_parts(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps):
    """``(loss, weights, weight_sum)`` in PyTorch; ``weight_sum`` is each sample's ``Σ_px pixel_weights``."""
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    pw = pixel_weights.to(dtype).expand(logits.shape[0], *logits.shape[2:])
    bce = F.binary_cross_entropy_with_logits(x[:, 0], detection.to(dtype), reduction="none")
    bce = bce + F.binary_cross_entropy_with_logits(x[:, 1], segmentation.to(dtype), reduction="none")
    weight_sum = pw.sum(dim=(1, 2))
    weights = _importance_weights(d_map, c=c, clip_lo=clip_lo, clip_hi=clip_hi, eps=eps).to(dtype)
    loss = weights * (bce * pw).sum(dim=(1, 2)) / weight_sum.clamp_min(MIN_WEIGHT_SUM)
    return loss, weights, weight_sum


@torch.library.custom_op(
    "pysynth::weighted_two_head_loss",
    mutates_args=(),
    schema="(Tensor logits, Tensor detection, Tensor segmentation, Tensor pixel_weights, Tensor d_map, float c, "
    "float clip_lo, float clip_hi, float eps, bool use_triton) -> (Tensor, Tensor, Tensor)",
)
def _weighted_two_head_loss_op(
    logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, use_triton
):
    """``(loss, weights, weight_sum)``, each ``(N,)``; see :func:`weighted_two_head_loss`."""
    if use_triton:
        return _forward_triton(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps)
    with torch.no_grad():
        return _reference_parts(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps)


@_weighted_two_head_loss_op.register_fake
def _(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, use_triton):
    dtype = _compute_dtype(logits)
    return tuple(logits.new_empty(logits.shape[:1], dtype=dtype) for _ in range(3))


@torch.library.custom_op(
    "pysynth::weighted_two_head_loss_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor logits, Tensor detection, Tensor segmentation, Tensor pixel_weights, "
    "Tensor weights, Tensor weight_sum, bool use_triton) -> Tensor",
)
def _weighted_two_head_loss_backward_op(
    grad, logits, detection, segmentation, pixel_weights, weights, weight_sum, use_triton
):
    """Gradient w.r.t. the logits: ``grad_n · w_n · pw · (sigmoid(x) − t) / max(Σ pw, 1e-12)``, contiguous."""
    if use_triton:
        return _backward_triton(grad, logits, detection, segmentation, pixel_weights, weights, weight_sum)
    dtype = weights.dtype
    scale = grad.to(dtype) * weights / weight_sum.clamp_min(MIN_WEIGHT_SUM)
    targets = torch.stack([detection, segmentation], dim=1).to(dtype)
    out = scale[:, None, None, None] * pixel_weights.to(dtype)[:, None] * (torch.sigmoid(logits.to(dtype)) - targets)
    return out.to(logits.dtype).contiguous()


@_weighted_two_head_loss_backward_op.register_fake
def _(grad, logits, detection, segmentation, pixel_weights, weights, weight_sum, use_triton):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, detection, segmentation, pixel_weights, _d_map, _c, _lo, _hi, _eps, use_triton = inputs
    _loss, weights, weight_sum = output
    ctx.mark_non_differentiable(weights, weight_sum)
    ctx.save_for_backward(logits, detection, segmentation, pixel_weights, weights, weight_sum)
    ctx.use_triton = use_triton


def _backward(ctx, grad_loss, _grad_weights, _grad_weight_sum):
    logits, detection, segmentation, pixel_weights, weights, weight_sum = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.pysynth.weighted_two_head_loss_backward(
            grad_loss, logits, detection, segmentation, pixel_weights, weights, weight_sum, ctx.use_triton
        )
    return grad_logits, *([None] * 9)


_weighted_two_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --- Triton ----------------------------------------------------------------------------------------------------


@functools.cache
def _triton_kernels() -> SimpleNamespace:
    """Import Triton and compile (JIT-wrap) the kernels, once."""
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        raise RuntimeError("use_triton=True needs Triton (pip install 'pysynth-histo[gpu]')") from exc
    return SimpleNamespace(
        partial_sums=triton.jit(_partial_sums_kernel),
        finish=triton.jit(_finish_kernel),
        backward=triton.jit(_backward_kernel),
    )


def _launch_context(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton kernels need a GPU or TRITON_INTERPRET=1 for {device} tensors")
    return contextlib.nullcontext()


def _dense_pixel_weights(pixel_weights: torch.Tensor, n: int, h: int, w: int) -> tuple[torch.Tensor, int]:
    """Contiguous pixel weights and their batch stride: 0 for one ``(H, W)`` map shared by the batch (no copy)."""
    pixel_weights = pixel_weights.expand(n, h, w)
    if pixel_weights.stride(0) == 0:
        return pixel_weights[0].contiguous(), 0
    return pixel_weights.contiguous(), h * w


def _forward_triton(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps):
    kernels = _triton_kernels()
    n, _, h, w = logits.shape
    hw = h * w
    n_parts = triton.cdiv(hw, BLOCK)
    dtype = _compute_dtype(logits)
    logits, detection, segmentation = logits.contiguous(), detection.contiguous(), segmentation.contiguous()
    pixel_weights, pw_stride = _dense_pixel_weights(pixel_weights, n, h, w)
    d_map = d_map.reshape(n, -1).contiguous()
    bce_parts = logits.new_empty((n, n_parts), dtype=dtype)
    weight_parts = torch.empty_like(bce_parts)
    loss, weights, weight_sum = (logits.new_empty((n,), dtype=dtype) for _ in range(3))
    with _launch_context(logits.device):
        kernels.partial_sums[(n_parts, n)](
            logits, detection, segmentation, pixel_weights, pw_stride, bce_parts, weight_parts, hw, n_parts, BLOCK=BLOCK
        )
        kernels.finish[(n,)](
            bce_parts,
            weight_parts,
            n_parts,
            d_map,
            d_map.shape[1],
            loss,
            weights,
            weight_sum,
            c,
            clip_lo,
            clip_hi,
            eps,
            MIN_WEIGHT_SUM,
            BLOCK=FINISH_BLOCK,
        )
    return loss, weights, weight_sum


def _backward_triton(grad, logits, detection, segmentation, pixel_weights, weights, weight_sum):
    kernels = _triton_kernels()
    n, _, h, w = logits.shape
    hw = h * w
    # The grad of a .mean() or .sum() arrives expanded (stride 0); the kernel reads it densely.
    grad = grad.to(weights.dtype).contiguous()
    logits, detection, segmentation = logits.contiguous(), detection.contiguous(), segmentation.contiguous()
    pixel_weights, pw_stride = _dense_pixel_weights(pixel_weights, n, h, w)
    out = torch.empty_like(logits)
    with _launch_context(logits.device):
        kernels.backward[(triton.cdiv(hw, BLOCK), n)](
            grad,
            logits,
            detection,
            segmentation,
            pixel_weights,
            pw_stride,
            weights,
            weight_sum,
            out,
            hw,
            MIN_WEIGHT_SUM,
            BLOCK=BLOCK,
        )
    return out


# The kernels work on a (2, BLOCK) tile: row 0 the detection head, row 1 the segmentation head, one block of a
# sample's pixels. Program ids: axis 0 the pixel block, axis 1 the sample (CUDA limits axis 1 to 65535).


def _partial_sums_kernel(
    logits_ptr, det_ptr, seg_ptr, pw_ptr, pw_stride, bce_parts_ptr, weight_parts_ptr, hw, n_parts, BLOCK: tl.constexpr
):
    part = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    acc = bce_parts_ptr.dtype.element_ty
    head = tl.arange(0, 2)[:, None]
    offs = part * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < hw
    x = tl.load(logits_ptr + (2 * n + head) * hw + offs, mask=mask, other=0.0).to(acc)
    det = tl.load(det_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    seg = tl.load(seg_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    t = tl.where(head == 0, det, seg)
    pw = tl.load(pw_ptr + n * pw_stride + offs, mask=mask, other=0.0).to(acc)
    # Stable BCE with logits: max(x, 0) − x·t + log1p(exp(−|x|)); log1p as log(u)·z/(u − 1), exact for tiny z.
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    log1p = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
    bce = tl.maximum(x, 0.0) - x * t + log1p
    tl.store(bce_parts_ptr + n * n_parts + part, tl.sum(tl.sum(bce * pw, axis=1), axis=0))
    tl.store(weight_parts_ptr + n * n_parts + part, tl.sum(tl.sum(pw, axis=1), axis=0))


def _finish_kernel(
    bce_parts_ptr,
    weight_parts_ptr,
    n_parts,
    d_ptr,
    d_count,
    loss_ptr,
    weights_ptr,
    weight_sum_ptr,
    c,
    clip_lo,
    clip_hi,
    eps,
    min_weight_sum,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    acc = loss_ptr.dtype.element_ty
    idx = tl.arange(0, BLOCK)
    bce = tl.zeros([BLOCK], dtype=acc)
    pw = tl.zeros([BLOCK], dtype=acc)
    for start in range(0, n_parts, BLOCK):
        mask = start + idx < n_parts
        bce += tl.load(bce_parts_ptr + n * n_parts + start + idx, mask=mask, other=0.0)
        pw += tl.load(weight_parts_ptr + n * n_parts + start + idx, mask=mask, other=0.0)
    d_total = tl.zeros([BLOCK], dtype=acc)
    for start in range(0, d_count, BLOCK):
        mask = start + idx < d_count
        d_total += tl.load(d_ptr + n * d_count + start + idx, mask=mask, other=0.0).to(acc)
    d = tl.sum(d_total, axis=0) / d_count
    is_nan = d != d
    d = tl.minimum(tl.maximum(tl.where(is_nan, 0.5, d), eps), 1.0 - eps)
    w = tl.minimum(tl.maximum(c * d / (1.0 - d), clip_lo), clip_hi)
    w = tl.where(is_nan, clip_lo, w)
    weight_sum = tl.sum(pw, axis=0)
    tl.store(loss_ptr + n, w * tl.sum(bce, axis=0) / tl.maximum(weight_sum, min_weight_sum))
    tl.store(weights_ptr + n, w)
    tl.store(weight_sum_ptr + n, weight_sum)


def _backward_kernel(
    grad_ptr,
    logits_ptr,
    det_ptr,
    seg_ptr,
    pw_ptr,
    pw_stride,
    weights_ptr,
    weight_sum_ptr,
    out_ptr,
    hw,
    min_weight_sum,
    BLOCK: tl.constexpr,
):
    part = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    acc = weights_ptr.dtype.element_ty
    scale = tl.load(grad_ptr + n) * tl.load(weights_ptr + n) / tl.maximum(tl.load(weight_sum_ptr + n), min_weight_sum)
    head = tl.arange(0, 2)[:, None]
    offs = part * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < hw
    at = (2 * n + head) * hw + offs
    x = tl.load(logits_ptr + at, mask=mask, other=0.0).to(acc)
    det = tl.load(det_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    seg = tl.load(seg_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    t = tl.where(head == 0, det, seg)
    pw = tl.load(pw_ptr + n * pw_stride + offs, mask=mask, other=0.0).to(acc)
    # sigmoid from exp(−|x|) <= 1: never overflows, even at |x| = 1e4.
    z = tl.exp(-tl.abs(x))
    sigmoid = tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    tl.store(out_ptr + at, (scale * pw * (sigmoid - t)).to(out_ptr.dtype.element_ty), mask=mask & (head >= 0))
