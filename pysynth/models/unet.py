"""U-Net with a nucleus-centre detection head and a nuclear-pixel segmentation head (docs/method.md §5).

The network runs over whole slides, so its cost per pixel is part of its contract: :func:`flops_per_pixel`
counts it from the layers themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the U-Net.

    Attributes:
        in_channels: Input channels (3 for RGB).
        width: Channels of the first level; each level below doubles them.
        depth: Number of 2× downsamplings; inputs must be divisible by ``2**depth`` (see :func:`pad_to_multiple`).
        max_width: Cap on channels at the deepest levels.
        classes: Class outputs after detection and segmentation: 0 (none) or 1 (per-pixel lymphocyte probability
            on nuclear pixels).
    """

    in_channels: int = 3
    width: int = 16
    depth: int = 4
    max_width: int = 256
    classes: int = 0

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.width < 1 or self.max_width < self.width:
            raise ValueError(f"UNetConfig: bad channel counts {self}")
        if not 1 <= self.depth <= 7:
            raise ValueError(f"UNetConfig.depth must be in 1..7, got {self.depth}")
        if self.classes not in (0, 1):
            raise ValueError(f"UNetConfig.classes must be 0 or 1, got {self.classes}")

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections and 1×1 output heads (logits): two, or three with a class output.

    Args:
        config: The network's shape.

    Shape:
        - Input: ``(N, C, H, W)``, float, H and W divisible by ``2**depth``.
        - Output: ``(N, 2 + classes, H, W)`` logits; channel 0 is nucleus-centre detection, channel 1 nuclear
          pixels, channel 2 (with ``classes = 1``) lymphocyte on nuclear pixels.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        widths = [min(c.width * 2**i, c.max_width) for i in range(c.depth + 1)]
        self.down = nn.ModuleList([_block(c.in_channels, widths[0])])
        self.down.extend(_block(widths[i - 1], widths[i]) for i in range(1, c.depth + 1))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(c.depth)))
        self.head = nn.Conv2d(widths[0], 2 + c.classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for detection and segmentation (see the class' Shape)."""
        multiple = 2**self.config.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"input height and width must be divisible by {multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def fold_batchnorm(model: UNet) -> UNet:
    """A copy of a U-Net for inference with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is an affine map per channel, so it folds exactly into the preceding convolution's
    weights and bias; the copy computes the same function with one pass over each activation fewer.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for block in [*fused.down, *fused.up]:
        layers = list(block)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.BatchNorm2d) and i > 0 and isinstance(layers[i - 1], nn.Conv2d):
                block[i - 1] = fuse_conv_bn_eval(layers[i - 1], layer)
                block[i] = nn.Identity()
    return fused


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the last two dimensions up to a multiple; returns the padded tensor and the original size.

    Shape:
        - Input: ``(..., H, W)``.
        - Output: ``(..., H', W')`` with ``H' = ceil(H / multiple) · multiple``, likewise ``W'``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if h > ph and w > pw else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def flops_per_pixel(model: nn.Module, size: int = 256, in_channels: int = 3) -> float:
    """Floating-point operations per input pixel of one forward pass (2 per multiply-add of each convolution).

    Counted from the convolutions actually run on a ``size × size`` input (normalisation, activations, pooling
    and interpolation are not counted: they are a few percent).
    """
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * output.numel() * (module.in_channels // module.groups) * k

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return total / (size * size)
