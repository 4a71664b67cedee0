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

    The FFTs run in the input's dtype (float32 for half precision); the kernel's transfer function is cached
    per image size and device, so repeated :meth:`prox` calls cost three FFTs each.

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

    def prox(self, z: Tensor, y: Tensor, rho: float | Tensor) -> Tensor:
        """``F^-1[(conj(K) F(y) + rho F(z)) / (|K|^2 + rho)]``, all ``[N, C, H, W]``; ``rho`` float or
        ``[N]``."""
        self._check_image(z, "z")
        h, w = z.shape[-2:]
        dt = work_dtype(z)
        otf = self.otf(h, w, z)
        zf = z.to(dt)
        r = rho_view(rho, zf)
        num = otf.conj() * torch.fft.rfft2(y.to(dt)) + r * torch.fft.rfft2(zf)
        x = torch.fft.irfft2(num / (otf.abs().square() + r), s=(h, w))
        return x.to(z.dtype)

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """:meth:`prox` for a fixed ``y`` with ``conj(K) F(y)`` and ``|K|^2`` computed once: two FFTs a call."""
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
