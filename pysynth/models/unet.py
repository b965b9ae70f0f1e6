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
        #: Pool and join through the compiled core (:func:`max_pool`, :func:`upsample_concat`; set on
        #: inference copies by :func:`fold_batchnorm`; the same values up to float rounding).
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for detection and segmentation (see the class' Shape)."""
        multiple = 2**self.config.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"input height and width must be divisible by {multiple}, got {tuple(x.shape[-2:])}")
        pool = max_pool if self.fused else _max_pool_reference
        join = upsample_concat if self.fused else upsample_concat_reference
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else pool(x))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(join(x, skips.pop()))
        return self.head(x)


def upsample_concat_reference(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The decoder's join: ``x`` upsampled bilinearly to ``skip``'s size, then ``skip``'s channels after it."""
    x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([x, skip], dim=1)


def _kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether the compiled core's channels-last kernels take these tensors (inference on a CPU, one image)."""
    first = tensors[0]
    return (
        first.dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling()
        and all(
            t.shape[0] == 1
            and t.dtype == first.dtype
            and t.device.type == "cpu"
            and not (torch.is_grad_enabled() and t.requires_grad)
            and t.is_contiguous(memory_format=torch.channels_last)
            for t in tensors
        )
    )


def _hwc(t: torch.Tensor):
    """The memory of a one-image channels-last tensor as a NumPy ``(h, w, c)`` array (bfloat16 as uint16)."""
    import numpy as np

    t = t[0].permute(1, 2, 0)
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


def _max_pool_reference(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, in one pass of the compiled core where it can be.

    The fast path (the conditions of :func:`upsample_concat`, even height and width) writes no indices, where
    PyTorch's CPU max pooling also writes an int64 index per output value. Exact (a maximum of stored values) where
    there are no NaNs, which PyTorch propagates and this kernel does not.
    """
    _, c, h, w = x.shape
    if h % 2 or w % 2 or not _kernel_applies(x):
        return F.max_pool2d(x, 2)
    from pysynth import _core

    out = torch.empty((1, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    kernel = _core.max_pool2x2 if x.dtype == torch.float32 else _core.max_pool2x2_bf16
    kernel(_hwc(x), _hwc(out), torch.get_num_threads())
    return out


def upsample_concat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """:func:`upsample_concat_reference` in one pass of the compiled core where it can be (else that function).

    The fast path takes float32 or bfloat16 (bf16 autocast) CPU tensors in channels-last layout, ``skip`` exactly
    twice ``x``'s size, one image, and no autograd (inference): it writes the upsampled and the skip channels
    straight into one channels-last tensor, where the reference materialises the upsampled map and copies both
    into the concatenation (on a 2,304² window these two passes were a third of the network's time). Values equal
    the reference's up to float rounding (the same 0.25 / 0.75 weights, summed in another order; bfloat16 computed
    in float32 and rounded once, to nearest even).
    """
    _, c1, h, w = x.shape
    c2 = skip.shape[1]
    if tuple(skip.shape[-2:]) != (2 * h, 2 * w) or not _kernel_applies(x, skip):
        return upsample_concat_reference(x, skip)
    from pysynth import _core

    out = torch.empty((1, c1 + c2, 2 * h, 2 * w), dtype=x.dtype, memory_format=torch.channels_last)
    kernel = _core.upsample2x_concat if x.dtype == torch.float32 else _core.upsample2x_concat_bf16
    kernel(_hwc(x), _hwc(skip), _hwc(out), torch.get_num_threads())
    return out


def fold_batchnorm(model: UNet) -> UNet:
    """A copy of a U-Net for inference with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is an affine map per channel, so it folds exactly into the preceding convolution's
    weights and bias; the copy computes the same function with one pass over each activation fewer. The copy's
    encoder pools through :func:`max_pool` and its decoder joins through :func:`upsample_concat` (the same values
    up to float rounding).
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    fused.fused = True  # pooling and joins in the compiled core (:func:`max_pool`, :func:`upsample_concat`)
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
