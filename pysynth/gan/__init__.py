"""The GAN module: reference-conditioned refiner and discriminator, their losses, and importance weights."""

from __future__ import annotations

from pysynth.gan.losses import GanLossConfig, discriminator_loss, refiner_loss
from pysynth.gan.models import Discriminator, GanConfig, HistoryBuffer, Refiner, StyleEncoder, StyleInjection
from pysynth.gan.weights import WeightReport, importance_weights, ratio_constant, weight_report

__all__ = [
    "Discriminator",
    "GanConfig",
    "GanLossConfig",
    "HistoryBuffer",
    "Refiner",
    "StyleEncoder",
    "StyleInjection",
    "WeightReport",
    "discriminator_loss",
    "importance_weights",
    "ratio_constant",
    "refiner_loss",
    "weight_report",
]
