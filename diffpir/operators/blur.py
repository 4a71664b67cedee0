"""Deblurring: circular convolution with a kernel, solved in closed form by FFT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from diffpir.operators.base import check_measurement, rho_view, work_dtype
from diffpir.operators.fft import KernelOperator


class Blur(KernelOperator):
    """``y = k * x``: circular ('wrap') convolution of every channel with an odd, centred kernel.

    Args:
        kernel: ``[kh, kw]`` shared by the batch, or ``[N, kh, kw]`` one per image (each shared by the
            channels); odd sizes, at most the image size, finite.
        normalize: divide the kernel by its sum (default). A kernel that does not sum to one is then
            normalised with a ``UserWarning`` saying so; pass ``normalize=False`` to use it unchanged.

    The FFTs run in float64 for float64 tensors, else in float32 (the proximal step: in the measurement's); the
    kernel's transfer function is cached per image size and device, and :meth:`prox_fn` transforms ``y`` once,
    so each step of a restoration costs two FFTs (a lone :meth:`prox` call, three).

    ``prox(z, y, rho) = argmin_x ||y - k * x||^2 + rho ||x - z||^2
    = F^-1[(conj(K) F(y) + rho F(z)) / (|K|^2 + rho)]`` with ``K = psf2otf(k)``.
    """

    def __init__(self, kernel: Tensor | np.ndarray, normalize: bool = True, **cg):
        super().__init__(kernel, normalize, **cg)

    def _check_image(self, x: Tensor, name: str) -> None:
        check_measurement(x, name)
        self._check_kernel_batch(x.shape[0])
        self._check_fits(*x.shape[-2:])

    def _filter(self, x: Tensor, conj: bool) -> Tensor:
        self._check_image(x, "x")
        h, w = x.shape[-2:]
        otf = self.otf(h, w, x)
        if conj:
            otf = otf.conj()
        out = torch.fft.irfft2(otf * torch.fft.rfft2(x.to(work_dtype(x))), s=(h, w))
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``k * x`` for ``x`` ``[N, C, H, W]``: same shape."""
        return self._filter(x, conj=False)

    def adjoint(self, y: Tensor) -> Tensor:
        """Correlation with ``k`` (convolution with the flipped kernel), ``[N, C, H, W]``."""
        return self._filter(y, conj=True)

    def _check_shape(self, y: Tensor) -> None:
        self._check_image(y, "y")

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """``z, rho -> F^-1[(conj(K) F(y) + rho F(z)) / (|K|^2 + rho)]``, all ``[N, C, H, W]``, ``rho`` a float or
        ``[N]``; ``conj(K) F(y)`` and ``|K|^2`` are computed here, once: two FFTs a call."""
        self._check_image(y, "y")
        h, w = y.shape[-2:]
        dt = work_dtype(y)
        otf = self.otf(h, w, y)
        ky = otf.conj() * torch.fft.rfft2(y.to(dt))
        k2 = otf.abs().square()

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            if z.shape != y.shape:
                raise ValueError(f"z has shape {tuple(z.shape)}, expected {tuple(y.shape)}")
            r = rho_view(rho, z)
            x = torch.fft.irfft2((ky + r * torch.fft.rfft2(z.to(dt))) / (k2 + r), s=(h, w))
            return x.to(z.dtype)

        return prox
