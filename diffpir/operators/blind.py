"""Blur by an unknown kernel: the operator of blind deblurring (``deblur_blind``)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffpir.operators.blur import Blur


def delta_kernel(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``[size, size]`` identity kernel (one at the centre)."""
    if isinstance(size, bool) or int(size) != size or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= 1, got {size!r}")
    k = torch.zeros(size, size, dtype=dtype)
    k[size // 2, size // 2] = 1.0
    return k


class BlindBlur(Blur):
    """``y = k * x`` with ``k`` unknown, supported on ``kernel_size x kernel_size`` (odd) around the centre.

    It carries no true kernel: only the support bound blind methods search in (``kernel_size``) and a current
    estimate (``kernel``, the identity until set), with which :meth:`forward`, :meth:`adjoint` and :meth:`prox`
    work as for :class:`~diffpir.operators.Blur`. :class:`~diffpir.methods.BlindDiffPIR` estimates the kernel.

    Args:
        kernel_size: the odd side of the square support of the unknown kernel.
        kernel: an initial estimate ``[kh, kw]`` or ``[N, kh, kw]`` (None: the identity).
    """

    def __init__(self, kernel_size: int = 31, kernel: Tensor | None = None):
        if kernel is None:
            kernel = delta_kernel(kernel_size)
        super().__init__(kernel)
        self.kernel_size = int(kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, estimate={tuple(self.kernel.shape)}"


__all__ = ["BlindBlur", "delta_kernel"]
