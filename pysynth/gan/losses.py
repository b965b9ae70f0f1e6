"""Refiner and discriminator losses (docs/method.md §3; paper Eq. 6).

The refiner's loss is ``L_G = alpha·L_reg + beta·L_real + gamma·L_hard``; the discriminator's is the standard
two-class cross-entropy. Both take D's logits, not probabilities, so they stay finite when D is confident.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class GanLossConfig:
    """Weights of the refiner's loss; the defaults are the paper's.

    Attributes:
        alpha: Weight of the regularisation term ``L_reg``.
        beta: Weight of the realism term ``L_real``.
        gamma: Weight of the hard-example term ``L_hard = -L_task``. The paper sets 1e-7 (its text also speaks of
            a factor 1e-4); 0 turns hard examples off (the "no hard examples" ablation).
        lambda1: Weight of ``‖I − X‖₁`` inside ``L_reg``.
        lambda2: Weight of ``‖I − X‖₂²`` inside ``L_reg``.
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1e-7
    lambda1: float = 1e-5
    lambda2: float = 1e-4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"GanLossConfig.{name} must be finite and >= 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def refiner_loss(
    refined: torch.Tensor,
    initial: torch.Tensor,
    d_logits_on_refined: torch.Tensor,
    task_loss: torch.Tensor | None = None,
    config: GanLossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The refiner's loss ``alpha·L_reg + beta·L_real + gamma·L_hard``.

    - ``L_reg = λ1·‖I − X‖₁ + λ2·‖I − X‖₂²``: the norms are sums over every pixel and channel of a patch,
      averaged over the batch (the paper's expectation over patches). The paper's tiny λs assume such sums; on
      [-1, 1] images the term's scale therefore grows with the patch area (a 400² RGB patch has 480,000 values,
      so ``λ1·‖·‖₁ = 4.8 ×`` the mean absolute change).
    - ``L_real``: the non-saturating form ``−E log D(X, S)``, i.e. binary cross-entropy of D's logits against
      "real", averaged over the cells of D's map and the batch. The paper and docs/method.md write
      ``E log(1 − D(X, S))``, which has the same fixed point but vanishing gradients while D confidently rejects
      the refined patches (early training); the non-saturating form is the usual remedy (Goodfellow et al. 2014).
    - ``L_hard = −L_task``: the segmenter's loss on the refined patches, negated so that the refiner makes
      harder examples. Gradients reach the refiner through ``X``; keeping the segmenter's own parameters out of
      this step is the caller's job.

    Args:
        refined: Refined patches ``X`` (with gradient to the refiner).
        initial: Initial synthetic patches ``I`` (no gradient needed).
        d_logits_on_refined: D's logits on ``(X, S)`` (gradient flows through D to ``X``; D's parameters must not
            be stepped with this loss).
        task_loss: Scalar segmentation loss on ``X``; ``None`` leaves ``L_hard`` out.
        config: Loss weights (default: the paper's).

    Returns:
        ``(loss, parts)``: the scalar loss and, for logging, floats ``reg_l1`` and ``reg_l2`` (per-patch sums
        before λ), ``reg`` (``L_reg``), ``real``, ``hard``, ``mean_abs_change`` (mean ``|I − X|`` per value) and
        ``total``.

    Shape:
        - refined, initial: ``(N, C, H, W)``; d_logits_on_refined: ``(N, ...)``; task_loss: scalar.
        - Output: scalar.
    """
    c = config or GanLossConfig()
    if refined.shape != initial.shape or refined.ndim < 2:
        raise ValueError(f"refined {tuple(refined.shape)} and initial {tuple(initial.shape)} must match")
    if d_logits_on_refined.shape[0] != refined.shape[0]:
        raise ValueError(f"D logits {tuple(d_logits_on_refined.shape)} must have batch {refined.shape[0]}")
    if task_loss is not None and task_loss.numel() != 1:
        raise ValueError(f"task_loss must be a scalar, got shape {tuple(task_loss.shape)}")
    diff = (initial.detach().float() - refined.float()).flatten(1)
    l1 = diff.abs().sum(dim=1).mean()
    l2 = diff.square().sum(dim=1).mean()
    reg = c.lambda1 * l1 + c.lambda2 * l2
    logits = d_logits_on_refined.float()
    real = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss = c.alpha * reg + c.beta * real
    hard = None
    if task_loss is not None:
        hard = -task_loss.float().reshape(())
        loss = loss + c.gamma * hard
    parts = {
        "reg_l1": float(l1.detach()),
        "reg_l2": float(l2.detach()),
        "reg": float(reg.detach()),
        "real": float(real.detach()),
        "hard": float(hard.detach()) if hard is not None else 0.0,
        "mean_abs_change": float(diff.detach().abs().mean()),
        "total": float(loss.detach()),
    }
    return loss, parts


def discriminator_loss(
    d_real_logits: torch.Tensor, d_fake_logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The discriminator's loss ``−E log D(R, S) − E log(1 − D(X, S))`` (binary cross-entropy on logits).

    Each expectation is a mean over its own batch and map cells, and the two are added: D is trained as if real
    and synthetic pairs were equally likely whatever the batch counts, so its odds ``D/(1 − D)`` estimate
    ``p/g`` directly and the importance-weight constant is 1 (:func:`pysynth.gan.weights.ratio_constant`
    explains the general case). No label smoothing: it would bias D's probabilities, which become weights.

    Args:
        d_real_logits: D's logits on real pairs ``(R, S)``: a real patch R and another real crop S of its tile.
        d_fake_logits: D's logits on refined pairs (refined patches detached from the refiner, e.g. from
            :class:`pysynth.gan.models.HistoryBuffer`, with their references).

    Returns:
        ``(loss, parts)``: the scalar loss and floats ``real`` and ``fake`` (the two cross-entropies),
        ``p_real_on_real`` and ``p_real_on_fake`` (mean ``sigmoid`` of the logits), ``accuracy`` (cells on the
        right side of 0.5, averaged over the two kinds) and ``total``.

    Shape:
        - d_real_logits: ``(N_real, ...)``; d_fake_logits: ``(N_fake, ...)``; the counts may differ.
        - Output: scalar.
    """
    if d_real_logits.numel() == 0 or d_fake_logits.numel() == 0:
        raise ValueError("discriminator_loss needs at least one real and one fake logit")
    real_logits, fake_logits = d_real_logits.float(), d_fake_logits.float()
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss = real + fake
    with torch.no_grad():
        accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
        parts = {
            "real": float(real),
            "fake": float(fake),
            "p_real_on_real": float(torch.sigmoid(real_logits).mean()),
            "p_real_on_fake": float(torch.sigmoid(fake_logits).mean()),
            "accuracy": float(accuracy),
            "total": float(loss),
        }
    return loss, parts
