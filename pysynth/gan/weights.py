"""Importance weights from the discriminator (docs/method.md §4; paper Eqs. 3-5) and their health report.

A synthetic patch's segmentation loss is multiplied by ``p(X)/g(X)``, the ratio of the real and synthetic
densities. A discriminator trained with cross-entropy on real and synthetic patches estimates
``D = Pr(real | X)``; by Bayes, with ``π_r`` and ``π_s`` the prior shares of real and synthetic samples in D's
training objective,

    ``D = π_r·p / (π_r·p + π_s·g)``, so ``D / (1 − D) = (π_r·p) / (π_s·g)`` and ``p/g = (π_s/π_r) · D/(1 − D)``.

Hence ``w = c · D/(1 − D)`` with ``c = π_s/π_r`` (:func:`ratio_constant`). Two caveats for the training loop:
D's fake half comes partly from the history buffer, so ``g`` is the mixture of current and recent refiner
outputs, not the current refiner alone; and weights are only as good as D's calibration, hence the clipping and
:func:`weight_report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: The released code's clip range for the weights.
DEFAULT_CLIP = (0.2, 2.0)


def _check_clip(clip: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in clip)
    if not 0.0 <= low <= high:  # False for a NaN bound too
        raise ValueError(f"clip must be (low, high) with 0 <= low <= high, got {clip}")
    return low, high


def check_weight_arguments(c: float, clip: tuple[float, float], eps: float) -> tuple[float, float, float, float]:
    """``(c, low, high, eps)`` as floats, checked as :func:`importance_weights` needs them.

    Shared with the fused loss op (``pysynth.kernels.weighted_loss``), so that both refuse the same arguments.

    Raises:
        ValueError: For ``c`` not finite and > 0, ``clip`` not ``0 <= low <= high``, or ``eps`` outside (0, 0.5).
    """
    # Comparisons rather than math.isfinite, which torch.compile cannot trace (NaN fails them all the same).
    if not 0 < c < math.inf:
        raise ValueError(f"c must be finite and > 0, got {c}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    low, high = _check_clip(clip)
    return float(c), low, high, float(eps)


def importance_weights(
    d_prob_map: torch.Tensor,
    c: float = 1.0,
    clip: tuple[float, float] = DEFAULT_CLIP,
    eps: float = 1e-6,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample importance weights ``w = clip(c · D/(1 − D))`` from D's map of Pr(real).

    ``D`` is the mean of the map over everything but the batch axis (the released code's choice: the map's
    average probability, not the average of per-cell odds), clamped to ``[eps, 1 − eps]`` so that a confident D
    gives a finite weight before clipping. A sample whose map holds a NaN gets the lower clip bound: a broken
    estimate must not up-weight a sample. Computed without gradient; the result never carries one, so the
    segmenter's loss cannot push D through the weights.

    This is the one definition of the weights. Joint training logs it, and the fused loss op
    (``pysynth::weighted_two_head_loss`` in ``pysynth.kernels.weighted_loss``) trains with it: its PyTorch path
    calls this function and its Triton kernel re-expresses these same steps, in float64 too, so the weights logged
    and the weights trained with are the same numbers (the tests hold the kernel to this function).

    Args:
        d_prob_map: Probabilities Pr(real) (``sigmoid`` of D's logits) for the synthetic samples.
        c: Prior ratio ``π_s/π_r`` of D's training (see :func:`ratio_constant`); 1 for balanced training.
        clip: ``(low, high)`` bounds of the weights (``high`` may be ``math.inf``).
        eps: Clamp of ``D`` away from 0 and 1, in ``(0, 0.5)``.
        dtype: Of the result; the weights are computed in float64 whatever it is.

    Returns:
        ``dtype`` weights (float32 by default), detached, on ``d_prob_map``'s device.

    Raises:
        ValueError: For a bad ``c``, ``clip`` or ``eps``, or an input without a batch axis.

    Shape:
        - d_prob_map: ``(N,)``, ``(N, H', W')`` or ``(N, 1, H', W')``.
        - Output: ``(N,)``.
    """
    c, low, high, eps = check_weight_arguments(c, clip, eps)
    if d_prob_map.ndim < 1:
        raise ValueError(f"d_prob_map needs a batch axis, got shape {tuple(d_prob_map.shape)}")
    with torch.no_grad():
        # float64: in float32, 1 - D loses most of its digits as D approaches 1 - eps.
        d = d_prob_map.detach().double()
        d = d.flatten(1).mean(dim=1) if d.ndim > 1 else d
        bad = torch.isnan(d)
        d = d.nan_to_num(0.5).clamp(eps, 1.0 - eps)
        w = (c * d / (1.0 - d)).clamp(low, high)
        return w.masked_fill(bad, low).to(dtype)


def ratio_constant(n_real: float, n_synthetic: float) -> float:
    """``c = π_s/π_r``: the synthetic-to-real ratio of the samples D was trained on (paper Eq. 4).

    Derivation (module docstring): with priors ``π_r``, ``π_s``, ``D/(1 − D) = π_r·p / (π_s·g)``, so
    ``p/g = (π_s/π_r) · D/(1 − D)``. Pass the counts (or rates) that set the priors in D's loss: for a loss that
    pools real and synthetic samples into one mean, the numbers of each per step; for
    :func:`pysynth.gan.losses.discriminator_loss`, which averages each kind separately and adds the two, the
    priors are equal whatever the counts, and ``c = 1`` (the released code's value).

    Args:
        n_real: Real samples (or their share) in D's objective, > 0.
        n_synthetic: Synthetic samples (or their share), > 0.

    Returns:
        ``n_synthetic / n_real``.
    """
    if not (math.isfinite(n_real) and math.isfinite(n_synthetic) and n_real > 0 and n_synthetic > 0):
        raise ValueError(f"n_real and n_synthetic must be finite and > 0, got {n_real}, {n_synthetic}")
    return float(n_synthetic) / float(n_real)


@dataclass(frozen=True)
class WeightReport:
    """Distribution of a batch (or window) of importance weights, for logging.

    Attributes:
        n: Number of weights.
        n_nonfinite: Weights that were NaN or infinite (left out of the statistics below).
        mean: Mean weight (1 when ``p/g`` is well estimated and the samples come from ``g``).
        std: Standard deviation.
        min: Smallest weight.
        max: Largest weight.
        quantiles: Weights at quantiles 0.05, 0.25, 0.5, 0.75 and 0.95, keyed ``"q05"`` … ``"q95"``.
        frac_low: Share of weights at the lower clip bound.
        frac_high: Share at the upper clip bound.
        ess: Effective sample size as a share of ``n``: ``(Σw)² / (n·Σw²)`` in (0, 1]; small means few samples
            carry the loss.
        collapsed: ``frac_low`` or ``frac_high`` reached the collapse threshold: D has stopped discriminating
            (everything "fake" at the low bound, or D → 1 at the high bound) and the weights carry no
            information.
        collapsed_at: ``"low"``, ``"high"`` or ``None``.
    """

    n: int
    n_nonfinite: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    frac_low: float
    frac_high: float
    ess: float
    collapsed: bool
    collapsed_at: str | None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able form (quantiles as top-level keys)."""
        out = asdict(self)
        out.update(out.pop("quantiles"))
        return out


def weight_report(
    weights: torch.Tensor, clip: tuple[float, float] = DEFAULT_CLIP, *, collapse_fraction: float = 0.95
) -> WeightReport:
    """Statistics of importance weights and a collapse flag.

    A weight counts as "at a bound" within a relative tolerance of 1e-6. ``collapsed`` is set when at least
    ``collapse_fraction`` of the (finite) weights sit at one bound.

    Args:
        weights: Weights from :func:`importance_weights`, any shape (flattened).
        clip: The ``(low, high)`` they were clipped to.
        collapse_fraction: Share at one bound that counts as collapse, in (0, 1].

    Returns:
        A :class:`WeightReport`.

    Raises:
        ValueError: For an empty ``weights``, bad ``clip`` or ``collapse_fraction``.
    """
    low, high = _check_clip(clip)
    if not 0 < collapse_fraction <= 1:
        raise ValueError(f"collapse_fraction must be in (0, 1], got {collapse_fraction}")
    w = weights.detach().flatten().to("cpu", torch.float64)
    if w.numel() == 0:
        raise ValueError("weight_report needs at least one weight")
    finite = torch.isfinite(w)
    n_nonfinite = int((~finite).sum())
    w = w[finite]
    names = ("q05", "q25", "q50", "q75", "q95")
    if w.numel() == 0:
        nan = math.nan
        return WeightReport(
            int(weights.numel()), n_nonfinite, nan, nan, nan, nan, dict.fromkeys(names, nan), 0.0, 0.0, nan, False, None
        )
    q = torch.quantile(w, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    frac_low = float((w <= low + 1e-6 * max(low, 1e-12)).double().mean())
    frac_high = float((w >= high - 1e-6 * high).double().mean()) if math.isfinite(high) else 0.0
    square_sum = float(w.square().sum())
    ess = float(w.sum()) ** 2 / (w.numel() * square_sum) if square_sum > 0 else math.nan
    collapsed_at = "low" if frac_low >= collapse_fraction else "high" if frac_high >= collapse_fraction else None
    return WeightReport(
        n=int(weights.numel()),
        n_nonfinite=n_nonfinite,
        mean=float(w.mean()),
        std=float(w.std(unbiased=False)),
        min=float(w.min()),
        max=float(w.max()),
        quantiles={k: float(v) for k, v in zip(names, q, strict=True)},
        frac_low=frac_low,
        frac_high=frac_high,
        ess=ess,
        collapsed=collapsed_at is not None,
        collapsed_at=collapsed_at,
    )
