"""Refiner, discriminator, reference (style) encoder and SimGAN image history (docs/method.md §3).

Both networks take the patch and a reference patch ``S`` of the target tissue. ``S`` goes through its own small
encoder (valid convolutions, two poolings, a global average pool) to a style code, which is injected into the
first feature map of the main branch: an asymmetric siamese design, as in the released code.

Tiling a code over ``H × W``, concatenating it and applying a 1×1 convolution is the same map as a 1×1
convolution of the features plus a per-sample bias computed from the code; :class:`StyleInjection` computes the
second form, which never builds the tiled tensor. Neither network uses batch normalisation: a patch's refinement
or score must not depend on what else is in the batch (D sees real, current and historical fakes in mixed
batches, and its outputs become importance weights).

Images are normalised RGB in [-1, 1] (uint8 / 127.5 - 1, the segmenter's input; see
:func:`pysynth.models.io.normalise`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: Smallest reference patch side the :class:`StyleEncoder` accepts (its valid convolutions and poolings).
MIN_REFERENCE_SIZE = 24


@dataclass(frozen=True)
class GanConfig:
    """Shape of the refiner and the discriminator.

    Attributes:
        image_channels: Channels of patches and reference patches (3 for RGB).
        style_dim: Length of the style code of a reference patch.
        style_channels: Width of the reference encoder's convolutions.
        use_reference: Condition both networks on the reference patch; ``False`` is the "no reference patch"
            ablation (the reference is ignored and no encoder is built).
        refiner_channels: Width of the refiner's residual trunk.
        refiner_blocks: Residual blocks in the refiner (two 3×3 convolutions each).
        disc_channels: Width of the discriminator's first stage; each later stage doubles it up to
            ``disc_max_channels``.
        disc_layers: Stride-2 stages of the discriminator. With the final valid 3×3 convolution the logit map has
            side ``ceil(side / 2**disc_layers) - 2``: 5×5 for a 400² patch at the default 6, 2×2 for 200².
        disc_max_channels: Cap on the discriminator's width.
        leaky_slope: Negative slope of the discriminator's LeakyReLUs.
    """

    image_channels: int = 3
    style_dim: int = 32
    style_channels: int = 32
    use_reference: bool = True
    refiner_channels: int = 32
    refiner_blocks: int = 5
    disc_channels: int = 32
    disc_layers: int = 6
    disc_max_channels: int = 128
    leaky_slope: float = 0.2

    def __post_init__(self) -> None:
        for name in ("image_channels", "style_dim", "style_channels", "refiner_channels", "disc_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GanConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.refiner_blocks, int) or not 0 <= self.refiner_blocks <= 64:
            raise ValueError(f"GanConfig.refiner_blocks must be in 0..64, got {self.refiner_blocks!r}")
        if not isinstance(self.disc_layers, int) or not 1 <= self.disc_layers <= 8:
            raise ValueError(f"GanConfig.disc_layers must be in 1..8, got {self.disc_layers!r}")
        if self.disc_max_channels < self.disc_channels:
            raise ValueError(
                f"GanConfig.disc_max_channels ({self.disc_max_channels}) must be >= disc_channels "
                f"({self.disc_channels})"
            )
        if not 0 <= self.leaky_slope < 1:
            raise ValueError(f"GanConfig.leaky_slope must be in [0, 1), got {self.leaky_slope}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _check_images(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (N, {channels}, H, W), got {tuple(x.shape)}")


class StyleEncoder(nn.Module):
    """Reference patch → style code: valid 3×3 convolutions, two 2×2 max-poolings, global average pool, linear.

    Valid (unpadded) convolutions keep zero padding from telling the code where the patch edge is; the global
    average pool makes the code independent of the reference's size and of where its texture lies.

    Args:
        style_dim: Length of the code.
        channels: Width of the convolutions.
        in_channels: Channels of the reference patch.

    Shape:
        - Input: ``(N, C, h, w)`` with ``h, w >= 24`` (:data:`MIN_REFERENCE_SIZE`); ``h, w`` need not match the
          patch being refined or judged.
        - Output: ``(N, style_dim)``.
    """

    def __init__(self, style_dim: int = 32, channels: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels

        def conv(cin: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, channels, 3), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels),
            *conv(channels),
            nn.MaxPool2d(2),
            *conv(channels),
            *conv(channels),
            nn.MaxPool2d(2),
            *conv(channels),
        )
        self.project = nn.Linear(channels, style_dim)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Style codes of a batch of reference patches (see the class' Shape)."""
        _check_images(reference, self.in_channels, "reference")
        if min(reference.shape[-2:]) < MIN_REFERENCE_SIZE:
            raise ValueError(
                f"reference patches must be at least {MIN_REFERENCE_SIZE}×{MIN_REFERENCE_SIZE}, "
                f"got {tuple(reference.shape[-2:])}"
            )
        return self.project(self.features(reference).mean(dim=(2, 3)))


class StyleInjection(nn.Module):
    """1×1 convolution of ``concat(features, style code tiled over H × W)``, computed without the tiling.

    Args:
        channels: Feature channels in and out.
        style_dim: Length of the style code; 0 for no code (then a plain 1×1 convolution).

    Shape:
        - features: ``(N, channels, H, W)``; style: ``(N, style_dim)`` or ``None`` when ``style_dim == 0``.
        - Output: ``(N, channels, H, W)``.
    """

    def __init__(self, channels: int, style_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.style = nn.Linear(style_dim, channels, bias=False) if style_dim else None

    def forward(self, features: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        """Features mixed with the (broadcast) style code (see the class' Shape)."""
        out = self.conv(features)
        if self.style is None:
            return out
        if style is None or style.ndim != 2 or style.shape[0] != features.shape[0]:
            shape = None if style is None else tuple(style.shape)
            raise ValueError(f"style must be ({features.shape[0]}, {self.style.in_features}), got {shape}")
        return out + self.style(style)[:, :, None, None]


class _ResidualBlock(nn.Module):
    """``relu(x + conv(relu(conv(x))))`` with reflect-padded 3×3 convolutions (size preserving)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Refiner(nn.Module):
    """The refiner ``G(I, S) = clamp(I + Δ(I, S), -1, 1)``.

    Layers: 3×3 conv → ReLU → style injection (1×1 conv of features and tiled style code) → ReLU →
    ``refiner_blocks`` residual blocks → 3×3 conv to the image channels, which is Δ. Δ's convolution starts at
    zero, so a new refiner is the identity on [-1, 1] and training starts from the initial synthesis. (At
    initialisation only that convolution receives gradients; the others follow once it moves off zero.)
    Convolutions pad by reflection, so the output has the input's size, odd sizes included.

    Args:
        config: Network shape; ``config.use_reference=False`` builds the "no reference" ablation, which ignores
            ``reference``.

    Shape:
        - image: ``(N, C, H, W)`` in [-1, 1], ``H, W >= 2``.
        - reference: ``(N, C, h, w)`` in [-1, 1], ``h, w >= 24``; may be ``None`` without a reference.
        - Output: ``(N, C, H, W)`` in [-1, 1].
    """

    def __init__(self, config: GanConfig | None = None) -> None:
        super().__init__()
        self.config = config or GanConfig()
        c = self.config
        width = c.refiner_channels
        self.encoder = StyleEncoder(c.style_dim, c.style_channels, c.image_channels) if c.use_reference else None
        self.head = nn.Conv2d(c.image_channels, width, 3, padding=1, padding_mode="reflect")
        self.inject = StyleInjection(width, c.style_dim if c.use_reference else 0)
        self.blocks = nn.Sequential(*(_ResidualBlock(width) for _ in range(c.refiner_blocks)))
        self.delta = nn.Conv2d(width, c.image_channels, 3, padding=1, padding_mode="reflect")
        for p in self.delta.parameters():
            nn.init.zeros_(p)

    def forward(self, image: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Refined patches (see the class' Shape)."""
        return (image + self.residual(image, reference)).clamp(-1.0, 1.0)

    def residual(self, image: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Δ before adding and clamping (for inspection and logging); same Shape as the output."""
        _check_images(image, self.config.image_channels, "image")
        style = _style(self.encoder, reference, image.shape[0])
        x = F.relu(self.head(image))
        x = F.relu(self.inject(x, style))
        return self.delta(self.blocks(x))


class Discriminator(nn.Module):
    """Patch discriminator ``D(X, S)``: a map of realism logits for patch ``X`` given reference ``S``.

    Layers: ``disc_layers`` stages of (3×3 stride-2 conv, LeakyReLU, 3×3 conv, LeakyReLU), widths
    ``disc_channels · 2**i`` capped at ``disc_max_channels``; the style code is injected after the first stage;
    then a valid 3×3 conv and a 1×1 conv to one logit per cell. ``sigmoid(logit)`` estimates Pr(real | X, S), so
    D judges both realism and consistency with the reference's tissue type.

    Args:
        config: Network shape; with ``config.use_reference=False`` the reference is ignored.

    Shape:
        - patch: ``(N, C, H, W)`` in [-1, 1] with ``H, W >= 2**(disc_layers + 1) + 1`` (129 at the default).
        - reference: ``(N, C, h, w)``, ``h, w >= 24``; may be ``None`` without a reference.
        - Output: ``(N, 1, H', W')`` logits, ``H' = ceil(H / 2**disc_layers) - 2`` (see :meth:`output_shape`):
          5×5 for 400², 2×2 for 200² at the default config.
    """

    def __init__(self, config: GanConfig | None = None) -> None:
        super().__init__()
        self.config = config or GanConfig()
        c = self.config
        self.encoder = StyleEncoder(c.style_dim, c.style_channels, c.image_channels) if c.use_reference else None
        widths = [min(c.disc_channels * 2**i, c.disc_max_channels) for i in range(c.disc_layers)]
        self.stages = nn.ModuleList()
        cin = c.image_channels
        for width in widths:
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, width, 3, stride=2, padding=1),
                    nn.LeakyReLU(c.leaky_slope, inplace=True),
                    nn.Conv2d(width, width, 3, padding=1),
                    nn.LeakyReLU(c.leaky_slope, inplace=True),
                )
            )
            cin = width
        self.inject = StyleInjection(widths[0], c.style_dim if c.use_reference else 0)
        self.head = nn.Sequential(
            nn.Conv2d(cin, cin, 3), nn.LeakyReLU(c.leaky_slope, inplace=True), nn.Conv2d(cin, 1, 1)
        )

    def output_shape(self, shape_hw: Sequence[int]) -> tuple[int, int]:
        """``(H', W')`` of the logit map for a ``(H, W)`` patch (non-positive where the patch is too small)."""
        scale = 2**self.config.disc_layers
        h, w = (int(s) for s in shape_hw)
        return math.ceil(h / scale) - 2, math.ceil(w / scale) - 2

    def forward(self, patch: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Realism logits per cell (see the class' Shape)."""
        _check_images(patch, self.config.image_channels, "patch")
        if min(self.output_shape(patch.shape[-2:])) < 1:
            need = 2 ** (self.config.disc_layers + 1) + 1
            raise ValueError(
                f"patch {tuple(patch.shape[-2:])} too small for disc_layers={self.config.disc_layers}: "
                f"height and width must be >= {need}"
            )
        style = _style(self.encoder, reference, patch.shape[0])
        slope = self.config.leaky_slope
        x = self.stages[0](patch)
        x = F.leaky_relu(self.inject(x, style), slope)
        for stage in self.stages[1:]:
            x = stage(x)
        return self.head(x)


def _style(encoder: StyleEncoder | None, reference: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if encoder is None:
        return None
    if reference is None:
        raise ValueError("this network is conditioned on a reference patch (use_reference=True); got None")
    if reference.shape[0] != n:
        raise ValueError(f"reference batch ({reference.shape[0]}) must match the patch batch ({n})")
    return encoder(reference)


Batch = torch.Tensor | tuple[torch.Tensor, ...]


class HistoryBuffer:
    """SimGAN's image history: D's fake half mixes current refiner outputs with older ones.

    Each :meth:`push_and_sample` returns a batch of the same size where a ``fraction`` of the samples (in
    expectation: ``floor(n·fraction)`` plus one with probability equal to the remainder, so batches of one
    also see history) are drawn without replacement from the buffer and the rest are the first samples of the
    current batch; then every current sample is stored, into free slots first and, once the buffer is full,
    over randomly chosen slots. A batch may be a tuple of tensors sharing the first dimension, e.g.
    ``(refined, reference)``, so that a historical patch is judged with its own reference; the tuple stays
    aligned. Everything stored and returned is detached (D's fake half needs no gradient into the refiner).

    Storage is allocated on the first push, on the device and with the dtype of the batch, ``capacity`` samples
    of each tensor. Randomness comes from the buffer's own generator (or one passed per call), so a run is
    reproducible from ``seed``, and :meth:`state_dict` / :meth:`load_state_dict` carry the contents and the
    generator's state for an exact resume.

    Args:
        capacity: Samples kept (K).
        fraction: Share of each returned batch drawn from history, in [0, 1].
        seed: Seed of the buffer's generator.

    Shape:
        - batch: ``(n, ...)`` or a tuple of ``(n, ...)`` tensors; trailing shapes and dtypes must stay the same
          from push to push.
        - Output: same structure and shapes as the batch.
    """

    def __init__(self, capacity: int, *, fraction: float = 0.5, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.capacity = capacity
        self.fraction = float(fraction)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._storage: list[torch.Tensor] | None = None
        self._is_tuple = False
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push_and_sample(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Mix history into ``batch``, then store ``batch`` (see the class' description).

        Args:
            batch: A tensor or a tuple of tensors with a common first dimension ``n``.
            generator: Source of randomness for this call (default: the buffer's own generator).

        Returns:
            A batch with the structure of ``batch``: the current samples first, then the historical ones.

        Raises:
            ValueError: If the tensors' first dimensions differ, or shapes, dtypes or structure differ from
                what the buffer holds.
        """
        g = self.generator if generator is None else generator
        parts = self._validate(batch)
        n = parts[0].shape[0]
        expected = n * self.fraction
        k = math.floor(expected)
        if expected > k and torch.rand((), generator=g, device=g.device).item() < expected - k:
            k += 1
        k = min(k, self._size)
        if k:
            pick = torch.randperm(self._size, generator=g, device=g.device)[:k]
            assert self._storage is not None
            out = [torch.cat([p[: n - k], s[pick.to(s.device)]]) for p, s in zip(parts, self._storage, strict=True)]
        else:
            out = list(parts)
        self._store(parts, g)
        return tuple(out) if self._is_tuple else out[0]

    def _validate(self, batch: Batch) -> list[torch.Tensor]:
        is_tuple = not isinstance(batch, torch.Tensor)
        parts = [batch.detach()] if isinstance(batch, torch.Tensor) else [t.detach() for t in batch]
        if not parts or any(p.ndim < 1 for p in parts) or len({p.shape[0] for p in parts}) != 1:
            raise ValueError(f"batch tensors must share their first dimension, got {[tuple(p.shape) for p in parts]}")
        if self._storage is not None:
            same = is_tuple == self._is_tuple and len(parts) == len(self._storage)
            same = same and all(
                p.shape[1:] == s.shape[1:] and p.dtype == s.dtype for p, s in zip(parts, self._storage, strict=True)
            )
            if not same:
                held = [(tuple(s.shape[1:]), s.dtype) for s in self._storage]
                got = [(tuple(p.shape[1:]), p.dtype) for p in parts]
                raise ValueError(f"batch {got} does not match the buffer's samples {held}")
        else:
            self._is_tuple = is_tuple
        return parts

    def _store(self, parts: list[torch.Tensor], g: torch.Generator) -> None:
        if self._storage is None:
            self._storage = [p.new_empty((self.capacity, *p.shape[1:])) for p in parts]
        n = parts[0].shape[0]
        m = min(n, self.capacity - self._size)
        for p, s in zip(parts, self._storage, strict=True):
            s[self._size : self._size + m] = p[:m]
        self._size += m
        rest = min(n - m, self.capacity)
        if rest:
            slots = torch.randperm(self.capacity, generator=g, device=g.device)[:rest]
            for p, s in zip(parts, self._storage, strict=True):
                s[slots.to(s.device)] = p[n - rest :]

    def state_dict(self) -> dict[str, Any]:
        """Contents, settings and generator state (tensors are copies; save with ``torch.save``)."""
        items = [] if self._storage is None else [s[: self._size].clone() for s in self._storage]
        return {
            "capacity": self.capacity,
            "fraction": self.fraction,
            "size": self._size,
            "is_tuple": self._is_tuple,
            "items": items,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the buffer's capacity and fraction must match)."""
        if state["capacity"] != self.capacity or state["fraction"] != self.fraction:
            raise ValueError(
                f"state is for capacity={state['capacity']}, fraction={state['fraction']}; "
                f"this buffer has capacity={self.capacity}, fraction={self.fraction}"
            )
        size, items = int(state["size"]), list(state["items"])
        if not 0 <= size <= self.capacity or any(t.shape[0] != size for t in items) or (size and not items):
            raise ValueError(f"inconsistent history state: size {size}, items {[tuple(t.shape) for t in items]}")
        if items:
            self._storage = [t.new_empty((self.capacity, *t.shape[1:])) for t in items]
            for t, s in zip(items, self._storage, strict=True):
                s[:size] = t
        else:
            self._storage = None
        self._size = size
        self._is_tuple = bool(state["is_tuple"])
        self.generator.set_state(state["generator"])
