"""Importance-weighted two-head loss (docs/method.md §4-5), fused in Triton behind ``pysynth::weighted_two_head_loss``.

Per sample ``n``, with ``σ`` the sigmoid of a head's logits, ``t`` its target and ``pw`` the pixel weights:

- ``w_n`` is :func:`pysynth.gan.weights.importance_weights` of the discriminator's map: ``clip(c·D/(1 − D))`` of
  the map's mean ``D`` clamped to ``[eps, 1 − eps]``, ``clip_lo`` where the mean is NaN, computed in float64;
- ``BCE_n = Σ_px pw · (BCE_det + BCE_seg) / max(Σ_px pw, 1e-12)``;
- ``Dice_n = Σ_head 1 − (2·I + 1) / (S + 1)`` with ``I = Σ_px σ·t·pw²`` and ``S = Σ_px (σ + t)·pw``, the soft
  Dice of :func:`pysynth.train.targets.soft_dice_loss` (``σ·pw`` against ``t·pw``);
- the loss is ``w_n · (BCE_n + dice_weight · Dice_n)``, which is what ``two_head_loss(..., sample_weights=w,
  dice_weight=dice_weight)`` averages over the batch. Gradients flow into the logits only.

All of it is one reduction over the pixels: per sample the six sums ``Σ pw·BCE``, ``Σ pw`` and ``I``, ``S`` of
each head. On CUDA with Triton installed the op runs two fused kernels (per-block partial sums, then one program
per sample that finishes the sums, computes ``w_n`` from the map and the loss) and one backward kernel that reads
the saved sums; elsewhere it runs the same function in plain PyTorch (:func:`weighted_two_head_loss_reference`,
also the eager baseline of the benchmark). The tests hold both to an independent float64 composition of the
formulas, the Triton kernels under ``TRITON_INTERPRET=1`` on the CPU. Triton is imported on first use only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from types import SimpleNamespace

import torch
from torch.nn import functional as F

from pysynth.gan.weights import check_weight_arguments, importance_weights
from pysynth.kernels import triton_available

__all__ = ["weighted_two_head_loss", "weighted_two_head_loss_reference"]

# Pixels per program (times two heads); fixed, not autotuned, so the interpreter runs the same code.
BLOCK = 1024
# Partial sums or d_map entries a finishing program adds per step.
FINISH_BLOCK = 128
# Floor of a sample's pixel-weight total, as in pysynth.train.targets.two_head_loss.
MIN_WEIGHT_SUM = 1e-12
# Per-sample sums, in this order: Σ pw·(BCE_det + BCE_seg), Σ pw, I_det, I_seg, S_det, S_seg. The kernels spell
# the row numbers out (Triton reads no Python globals).
N_SUMS = 6

# Bound by _triton_kernels() on first use; the kernel functions below resolve them as globals when compiled.
triton = None
tl = None


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
    dice_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's function in plain PyTorch (autograd through ``F.binary_cross_entropy_with_logits`` and ``sigmoid``).

    Same arguments and results as :func:`weighted_two_head_loss`, without the checks.
    """
    loss, weights, _ = _reference_parts(
        logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight
    )
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
    dice_weight: float = 0.0,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample importance-weighted, pixel-weighted BCE plus soft Dice of the detection and segmentation heads.

    The mean of the returned loss equals ``two_head_loss(logits, detection, segmentation, pixel_weights,
    sample_weights=weights, dice_weight=dice_weight)`` (``pysynth.train.targets``) with the weights of
    ``importance_weights(d_map, c, (clip_lo, clip_hi), eps)`` (``pysynth.gan.weights``): joint training's loss.

    Args:
        logits: ``(N, 2, H, W)``: channel 0 detection, channel 1 segmentation.
        detection: ``(N, H, W)`` targets in [0, 1].
        segmentation: ``(N, H, W)`` targets in [0, 1].
        pixel_weights: ``(N, H, W)`` or ``(H, W)`` non-negative weights.
        d_map: ``(N, ...)`` the discriminator's per-patch Pr(real) in [0, 1], any map size.
        c: Scale of the odds ``D/(1 − D)``, finite and > 0.
        clip_lo: Least importance weight, also used where a map's mean is NaN.
        clip_hi: Greatest importance weight (may be ``math.inf``).
        eps: ``D`` is clamped to ``[eps, 1 - eps]``.
        dice_weight: Weight of the soft Dice term of both heads (0: BCE only), as ``two_head_loss``'s.
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
    # The importance weights' own checks, so the op refuses exactly what importance_weights refuses.
    c, clip_lo, clip_hi, eps = check_weight_arguments(c, (clip_lo, clip_hi), eps)
    if not 0 <= dice_weight < math.inf:
        raise ValueError(f"dice_weight must be finite and >= 0, got {dice_weight}")
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
        c,
        clip_lo,
        clip_hi,
        eps,
        float(dice_weight),
        bool(use_triton),
    )
    return loss, weights


# --- the op ----------------------------------------------------------------------------------------------------


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """Sums and results are float32, float64 for float64 logits (half-precision logits are read as float32)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _reference_parts(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight):
    """``(loss, weights, sums)`` in PyTorch; ``sums`` is ``(N, 6)``: each sample's sums in :data:`N_SUMS` order."""
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    pw = pixel_weights.to(dtype).expand(logits.shape[0], *logits.shape[2:])[:, None]
    t = torch.stack([detection, segmentation], dim=1).to(dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x) * pw
    inter = (p * t * pw).sum(dim=(2, 3))
    total = (p + t * pw).sum(dim=(2, 3))
    sums = torch.cat([(bce * pw).sum(dim=(1, 2, 3))[:, None], pw.sum(dim=(1, 2, 3))[:, None], inter, total], dim=1)
    weights = importance_weights(d_map, c, (clip_lo, clip_hi), eps, dtype=dtype)
    dice = (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).sum(dim=1)
    loss = weights * (sums[:, 0] / sums[:, 1].clamp_min(MIN_WEIGHT_SUM) + dice_weight * dice)
    return loss, weights, sums


@torch.library.custom_op(
    "pysynth::weighted_two_head_loss",
    mutates_args=(),
    schema="(Tensor logits, Tensor detection, Tensor segmentation, Tensor pixel_weights, Tensor d_map, float c, "
    "float clip_lo, float clip_hi, float eps, float dice_weight, bool use_triton) -> (Tensor, Tensor, Tensor)",
)
def _weighted_two_head_loss_op(
    logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight, use_triton
):
    """``(loss, weights, sums)``: ``(N,)``, ``(N,)`` and ``(N, 6)``; see :func:`weighted_two_head_loss`."""
    args = (logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight)
    if use_triton:
        return _forward_triton(*args)
    with torch.no_grad():
        return _reference_parts(*args)


@_weighted_two_head_loss_op.register_fake
def _(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight, use_triton):
    dtype = _compute_dtype(logits)
    n = logits.shape[0]
    return (
        logits.new_empty((n,), dtype=dtype),
        logits.new_empty((n,), dtype=dtype),
        logits.new_empty((n, N_SUMS), dtype=dtype),
    )


@torch.library.custom_op(
    "pysynth::weighted_two_head_loss_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor logits, Tensor detection, Tensor segmentation, Tensor pixel_weights, "
    "Tensor weights, Tensor sums, float dice_weight, bool use_triton) -> Tensor",
)
def _weighted_two_head_loss_backward_op(
    grad, logits, detection, segmentation, pixel_weights, weights, sums, dice_weight, use_triton
):
    """Gradient w.r.t. the logits, contiguous, from the forward's weights and sums.

    Per pixel of head ``h`` with ``g = grad_n · w_n``: ``g·pw·(σ − t) / max(Σ pw, 1e-12)`` (the BCE) plus
    ``dice_weight · σ(1 − σ) · pw · (a_h − b_h·t·pw)`` with ``a_h = g·(2·I_h + 1)/(S_h + 1)²`` and
    ``b_h = 2g/(S_h + 1)``: the derivative of ``−(2·I + 1)/(S + 1)`` through ``∂I/∂x = t·pw²·σ'`` and
    ``∂S/∂x = pw·σ'``.
    """
    if use_triton:
        return _backward_triton(grad, logits, detection, segmentation, pixel_weights, weights, sums, dice_weight)
    dtype = weights.dtype
    g = grad.to(dtype) * weights
    scale = (g / sums[:, 1].clamp_min(MIN_WEIGHT_SUM))[:, None, None, None]
    total1 = sums[:, 4:6] + 1.0
    a = (dice_weight * g[:, None] * (2.0 * sums[:, 2:4] + 1.0) / total1.square())[..., None, None]
    b = (dice_weight * 2.0 * g[:, None] / total1)[..., None, None]
    x = logits.to(dtype)
    t = torch.stack([detection, segmentation], dim=1).to(dtype)
    pw = pixel_weights.to(dtype).expand(logits.shape[0], *logits.shape[2:])[:, None]
    # σ and σ(1 − σ) = z/(1 + z)² from z = exp(−|x|) <= 1, as the kernel computes them: finite at any |x|.
    z = torch.exp(-x.abs())
    sigmoid = torch.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    out = scale * pw * (sigmoid - t) + pw * (z / (1.0 + z).square()) * (a - b * t * pw)
    return out.to(logits.dtype).contiguous()


@_weighted_two_head_loss_backward_op.register_fake
def _(grad, logits, detection, segmentation, pixel_weights, weights, sums, dice_weight, use_triton):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, detection, segmentation, pixel_weights, *_, dice_weight, use_triton = inputs
    _loss, weights, sums = output
    ctx.mark_non_differentiable(weights, sums)
    ctx.save_for_backward(logits, detection, segmentation, pixel_weights, weights, sums)
    ctx.dice_weight = dice_weight
    ctx.use_triton = use_triton


def _backward(ctx, grad_loss, _grad_weights, _grad_sums):
    logits, detection, segmentation, pixel_weights, weights, sums = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.pysynth.weighted_two_head_loss_backward(
            grad_loss, logits, detection, segmentation, pixel_weights, weights, sums, ctx.dice_weight, ctx.use_triton
        )
    return grad_logits, *([None] * 10)


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


def _scalars(device: torch.device, *values: float) -> torch.Tensor:
    """The float scalars as a float64 tensor: Triton would pass Python floats as float32."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _forward_triton(logits, detection, segmentation, pixel_weights, d_map, c, clip_lo, clip_hi, eps, dice_weight):
    kernels = _triton_kernels()
    n, _, h, w = logits.shape
    hw = h * w
    n_parts = triton.cdiv(hw, BLOCK)
    dtype = _compute_dtype(logits)
    logits, detection, segmentation = logits.contiguous(), detection.contiguous(), segmentation.contiguous()
    pixel_weights, pw_stride = _dense_pixel_weights(pixel_weights, n, h, w)
    d_map = d_map.reshape(n, -1).contiguous()
    params = _scalars(logits.device, c, clip_lo, clip_hi, eps, dice_weight)
    parts = logits.new_empty((n, N_SUMS, n_parts), dtype=dtype)
    loss, weights = logits.new_empty((n,), dtype=dtype), logits.new_empty((n,), dtype=dtype)
    sums = logits.new_empty((n, N_SUMS), dtype=dtype)
    with _launch_context(logits.device):
        kernels.partial_sums[(n_parts, n)](
            logits, detection, segmentation, pixel_weights, pw_stride, parts, hw, n_parts, BLOCK=BLOCK
        )
        kernels.finish[(n,)](
            parts, n_parts, d_map, d_map.shape[1], params, loss, weights, sums, MIN_WEIGHT_SUM, BLOCK=FINISH_BLOCK
        )
    return loss, weights, sums


def _backward_triton(grad, logits, detection, segmentation, pixel_weights, weights, sums, dice_weight):
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
            sums.contiguous(),
            _scalars(logits.device, dice_weight),
            out,
            hw,
            MIN_WEIGHT_SUM,
            BLOCK=BLOCK,
        )
    return out


# The pixel kernels work on a (2, BLOCK) tile: row 0 the detection head, row 1 the segmentation head, one block of
# a sample's pixels. Program ids: axis 0 the pixel block, axis 1 the sample (CUDA limits axis 1 to 65535).


def _partial_sums_kernel(logits_ptr, det_ptr, seg_ptr, pw_ptr, pw_stride, parts_ptr, hw, n_parts, BLOCK: tl.constexpr):
    part = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    acc = parts_ptr.dtype.element_ty
    heads = tl.arange(0, 2)
    head = heads[:, None]
    offs = part * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < hw
    x = tl.load(logits_ptr + (2 * n + head) * hw + offs, mask=mask, other=0.0).to(acc)
    det = tl.load(det_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    seg = tl.load(seg_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    t = tl.where(head == 0, det, seg)
    # Pixels past the image load pw = 0 and t = 0: they add nothing to any sum.
    pw = tl.load(pw_ptr + n * pw_stride + offs, mask=mask, other=0.0).to(acc)
    # Stable BCE with logits: max(x, 0) − x·t + log1p(exp(−|x|)); log1p as log(u)·z/(u − 1), exact for tiny z.
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    log1p = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
    bce = tl.maximum(x, 0.0) - x * t + log1p
    sigmoid = tl.where(x >= 0, 1.0 / u, z / u)
    p = sigmoid * pw
    tw = t * pw
    # Rows of parts (n, 6, n_parts): 0 Σ pw·BCE, 1 Σ pw, 2-3 I of each head, 4-5 S of each head.
    row = parts_ptr + n * 6 * n_parts + part
    tl.store(row, tl.sum(tl.sum(bce * pw, axis=1), axis=0))
    tl.store(row + n_parts, tl.sum(tl.sum(pw, axis=1), axis=0))
    tl.store(row + (2 + heads) * n_parts, tl.sum(p * tw, axis=1))
    tl.store(row + (4 + heads) * n_parts, tl.sum(p + tw, axis=1))


def _finish_kernel(
    parts_ptr,
    n_parts,
    d_ptr,
    d_count,
    params_ptr,
    loss_ptr,
    weights_ptr,
    sums_ptr,
    min_weight_sum,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    acc = loss_ptr.dtype.element_ty
    idx = tl.arange(0, BLOCK)
    row = tl.arange(0, 8)  # the six sums, padded to a power of two
    at = parts_ptr + (n * 6 + row[:, None]) * n_parts + idx[None, :]
    total = tl.zeros([8, BLOCK], dtype=acc)
    for start in range(0, n_parts, BLOCK):
        total += tl.load(at + start, mask=(row[:, None] < 6) & (start + idx[None, :] < n_parts), other=0.0)
    sums = tl.sum(total, axis=1)
    tl.store(sums_ptr + n * 6 + row, sums, mask=row < 6)
    bce = tl.sum(tl.where(row == 0, sums, 0.0), axis=0)
    weight_sum = tl.sum(tl.where(row == 1, sums, 0.0), axis=0)
    inter_det = tl.sum(tl.where(row == 2, sums, 0.0), axis=0)
    inter_seg = tl.sum(tl.where(row == 3, sums, 0.0), axis=0)
    total_det = tl.sum(tl.where(row == 4, sums, 0.0), axis=0)
    total_seg = tl.sum(tl.where(row == 5, sums, 0.0), axis=0)
    dice = (1.0 - (2.0 * inter_det + 1.0) / (total_det + 1.0)) + (1.0 - (2.0 * inter_seg + 1.0) / (total_seg + 1.0))
    # pysynth.gan.weights.importance_weights, step for step in float64: the mean of the map, NaN to clip_lo,
    # D clamped to [eps, 1 − eps], c·D/(1 − D) clipped to [clip_lo, clip_hi].
    c = tl.load(params_ptr)
    clip_lo = tl.load(params_ptr + 1)
    clip_hi = tl.load(params_ptr + 2)
    eps = tl.load(params_ptr + 3)
    dice_weight = tl.load(params_ptr + 4).to(acc)
    d_total = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, d_count, BLOCK):
        mask = start + idx < d_count
        d_total += tl.load(d_ptr + n * d_count + start + idx, mask=mask, other=0.0).to(tl.float64)
    d = tl.sum(d_total, axis=0) / d_count
    is_nan = d != d
    d = tl.minimum(tl.maximum(tl.where(is_nan, 0.5, d), eps), 1.0 - eps)
    w = tl.minimum(tl.maximum(c * d / (1.0 - d), clip_lo), clip_hi)
    w = tl.where(is_nan, clip_lo, w).to(acc)
    tl.store(loss_ptr + n, w * (bce / tl.maximum(weight_sum, min_weight_sum) + dice_weight * dice))
    tl.store(weights_ptr + n, w)


def _backward_kernel(
    grad_ptr,
    logits_ptr,
    det_ptr,
    seg_ptr,
    pw_ptr,
    pw_stride,
    weights_ptr,
    sums_ptr,
    dice_weight_ptr,
    out_ptr,
    hw,
    min_weight_sum,
    BLOCK: tl.constexpr,
):
    part = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    acc = weights_ptr.dtype.element_ty
    head = tl.arange(0, 2)[:, None]
    g = tl.load(grad_ptr + n) * tl.load(weights_ptr + n)
    scale = g / tl.maximum(tl.load(sums_ptr + n * 6 + 1), min_weight_sum)
    # Per head (a (2, 1) column): the Dice coefficients a = g·(2I + 1)/(S + 1)², b = 2g/(S + 1), times dice_weight.
    inter = tl.load(sums_ptr + n * 6 + 2 + head)
    total1 = tl.load(sums_ptr + n * 6 + 4 + head) + 1.0
    gd = g * tl.load(dice_weight_ptr).to(acc)
    a = gd * (2.0 * inter + 1.0) / (total1 * total1)
    b = gd * 2.0 / total1
    offs = part * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < hw
    at = (2 * n + head) * hw + offs
    x = tl.load(logits_ptr + at, mask=mask, other=0.0).to(acc)
    det = tl.load(det_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    seg = tl.load(seg_ptr + n * hw + offs, mask=mask, other=0.0).to(acc)
    t = tl.where(head == 0, det, seg)
    pw = tl.load(pw_ptr + n * pw_stride + offs, mask=mask, other=0.0).to(acc)
    # sigmoid and sigmoid' = z/(1 + z)² from z = exp(−|x|) <= 1: never overflow, even at |x| = 1e4.
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    sigmoid = tl.where(x >= 0, 1.0 / u, z / u)
    grad = scale * pw * (sigmoid - t) + pw * (z / (u * u)) * (a - b * t * pw)
    tl.store(out_ptr + at, grad.to(out_ptr.dtype.element_ty), mask=mask & (head >= 0))
