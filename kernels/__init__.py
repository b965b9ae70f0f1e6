"""Triton GPU kernels, each behind a ``torch.library`` op with a PyTorch implementation used on the CPU.

Importing this package never requires Triton or a GPU; :func:`triton_available` says whether kernels can run.
"""

from __future__ import annotations

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether Triton is installed and can run here (a CUDA/ROCm GPU, or ``TRITON_INTERPRET=1`` on the CPU)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
