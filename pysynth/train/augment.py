"""Augmentation of synthetic training patches: geometry, scale, stain, blur and noise (NumPy + OpenCV).

Every transform acts on the image and, where geometric, on the instance labels the same way, so targets are
computed after augmentation and always match the pixels. The random stream is the caller's: an item's
augmentation depends on its own generator only, which keeps training deterministic and resumable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

#: Ruifrok & Johnston H&E(-DAB) stain vectors (optical density per unit stain, rows: H, E, residual).
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters.

    Attributes:
        flips: Random horizontal and vertical flips.
        rot90: Random multiples of 90°.
        scale: Range of the zoom factor (log-uniform); covers scanners whose true µm/px differs from the metadata.
        stretch_p: Probability of an area-preserving stretch along a random direction: elongated (spindle) nuclei,
            which the polygon priors rarely make.
        stretch: Largest ratio of the stretched to the compressed axis (log-uniform from 1).
        stain_scale: Standard deviation of the log of each stain's (H, E) concentration factor.
        stain_shift: Standard deviation of an additive shift of each stain's concentration (optical density).
        blur_p: Probability of a Gaussian blur (focus variation).
        blur_sigma: Largest blur sigma (px).
        noise_p: Probability of Gaussian pixel noise.
        noise_sd: Largest noise standard deviation (grey levels).
    """

    flips: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.8, 1.25)
    stretch_p: float = 0.5
    stretch: float = 3.0
    stain_scale: float = 0.15
    stain_shift: float = 0.03
    blur_p: float = 0.3
    blur_sigma: float = 1.2
    noise_p: float = 0.2
    noise_sd: float = 4.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"AugmentConfig.scale must be 0 < lo <= hi, got {self.scale}")
        if self.stretch < 1:
            raise ValueError(f"AugmentConfig.stretch must be at least 1, got {self.stretch}")
        for name in ("blur_p", "noise_p", "stretch_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("stain_scale", "stain_shift", "blur_sigma", "noise_sd"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be non-negative, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        """Inverse of :meth:`to_dict` (lists become tuples); unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown augmentation parameter(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def stain_jitter(rgb: np.ndarray, factors: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Scale and shift the hematoxylin and eosin concentrations of an RGB image (colour deconvolution).

    Args:
        rgb: ``(h, w, 3)`` uint8.
        factors: ``(2,)`` multiplicative factors of the H and E concentrations.
        shifts: ``(2,)`` additive shifts of the H and E concentrations (optical density units).

    Returns:
        ``(h, w, 3)`` uint8.
    """
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _HED_INV.astype(np.float32)
    conc[:, :2] = conc[:, :2] * np.asarray(factors, np.float32) + np.asarray(shifts, np.float32)
    od = (conc @ _HED.astype(np.float32)).reshape(rgb.shape)
    out = 256.0 * np.exp(-np.maximum(od, 0.0)) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _stretch(
    image: np.ndarray, labels: np.ndarray, valid: np.ndarray, rng: np.random.Generator, most: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stretch by ``sqrt(a)`` along a random direction and compress by it across (area kept), about the centre."""
    a = float(np.exp(rng.uniform(0.0, np.log(most))))
    theta = float(rng.uniform(0.0, np.pi))
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    m = rot @ np.diag([np.sqrt(a), 1 / np.sqrt(a)]) @ rot.T
    h, w = labels.shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    affine = np.hstack([m, (centre - m @ centre)[:, None]])
    image = cv2.warpAffine(image, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    labels = cv2.warpAffine(labels, affine, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    valid = cv2.warpAffine(valid, affine, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return image, labels, valid


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random augmentation of a patch, cropped (or padded) to ``out_size``.

    Args:
        image: ``(h, w, 3)`` uint8.
        labels: ``(h, w)`` integer instance labels.
        rng: The item's random generator.
        config: What to vary and how much.
        out_size: Side of the returned patch.

    Returns:
        ``(image, labels, valid)``: uint8 ``(s, s, 3)``, int32 ``(s, s)``, and float32 ``(s, s)`` that is 0 where
        the patch had to be padded (the loss ignores those pixels), 1 elsewhere.
    """
    labels = labels.astype(np.int32)
    lo, hi = config.scale
    f = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else lo
    if abs(f - 1.0) > 1e-3:
        h, w = labels.shape
        size = (max(1, round(w * f)), max(1, round(h * f)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    h, w = labels.shape
    valid = np.ones((h, w), np.float32)
    if config.stretch_p > 0 and config.stretch > 1 and rng.random() < config.stretch_p:
        image, labels, valid = _stretch(image, labels, valid, rng, config.stretch)
    if h < out_size or w < out_size:
        ph, pw = max(0, out_size - h), max(0, out_size - w)
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
        labels = np.pad(labels, ((0, ph), (0, pw)))
        valid = np.pad(valid, ((0, ph), (0, pw)))
        h, w = labels.shape
    y = int(rng.integers(h - out_size + 1))
    x = int(rng.integers(w - out_size + 1))
    image = image[y : y + out_size, x : x + out_size]
    labels = labels[y : y + out_size, x : x + out_size]
    valid = valid[y : y + out_size, x : x + out_size]
    if config.flips and rng.random() < 0.5:
        image, labels, valid = image[:, ::-1], labels[:, ::-1], valid[:, ::-1]
    if config.flips and rng.random() < 0.5:
        image, labels, valid = image[::-1], labels[::-1], valid[::-1]
    if config.rot90:
        k = int(rng.integers(4))
        image, labels, valid = np.rot90(image, k), np.rot90(labels, k), np.rot90(valid, k)
    image = np.ascontiguousarray(image)
    if config.stain_scale > 0 or config.stain_shift > 0:
        factors = np.exp(rng.normal(0.0, config.stain_scale, 2))
        shifts = rng.normal(0.0, config.stain_shift, 2)
        image = stain_jitter(image, factors, shifts)
    if config.blur_p > 0 and rng.random() < config.blur_p:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, max(0.3, config.blur_sigma))))
    if config.noise_p > 0 and rng.random() < config.noise_p:
        noise = rng.normal(0.0, rng.uniform(0.0, config.noise_sd), image.shape)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, np.ascontiguousarray(labels), np.ascontiguousarray(valid)
