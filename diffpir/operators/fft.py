"""Circular convolution by FFT: kernel validation, ``psf2otf`` and a base class for kernel-based operators.

Convolution convention: ``(k * x)[i, j] = sum_{a, b} k[c_h + a, c_w + b] x[(i - a) mod H, (j - b) mod W]``
with the kernel centre ``(c_h, c_w) = (kh // 2, kw // 2)`` (a true convolution, as
``scipy.ndimage.convolve(..., mode='wrap')``, not a correlation; the same for symmetric kernels).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from diffpir.operators.base import Operator, check_batch, work_dtype


def as_kernel(kernel: Tensor | np.ndarray, normalize: bool = True, name: str = "kernel") -> Tensor:
    """Validate a blur kernel and return it as ``[Nk, kh, kw]`` (``Nk`` = 1 for a shared kernel).

    Args:
        kernel: ``[kh, kw]`` (shared by all images) or ``[N, kh, kw]`` (one per image), odd sizes, finite.
        normalize: divide each kernel by its sum (the blur then preserves the mean brightness). A kernel whose
            sum is off one by more than 1e-4 triggers a ``UserWarning`` saying so; a sum that is not positive
            raises. With ``normalize=False`` the kernel is used as given.
    """
    k = torch.as_tensor(np.asarray(kernel) if not isinstance(kernel, Tensor) else kernel)
    if not k.is_floating_point():
        k = k.float()
    if k.dtype not in (torch.float32, torch.float64):
        k = k.float()
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3:
        raise ValueError(f"{name} must be [kh, kw] or one per image [N, kh, kw], got shape {tuple(k.shape)}")
    kh, kw = k.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"{name} size {kh}x{kw} is even: kernels must have odd sizes so they have a centre pixel "
            f"(pad it with a row/column of zeros to {kh + 1 - kh % 2}x{kw + 1 - kw % 2})"
        )
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if normalize:
        sums = k.sum(dim=(1, 2))
        if bool((sums <= 1e-8 * k.abs().sum(dim=(1, 2)).clamp_min(1e-30)).any()):
            raise ValueError(
                f"{name} sums to {sums.tolist()} (not positive): it cannot be normalised to sum to one; "
                f"pass normalize=False to use it as it is"
            )
        if bool(((sums - 1).abs() > 1e-4).any()):
            warnings.warn(
                f"{name} sums to {[round(float(s), 6) for s in sums]}, not one: normalised to sum to one "
                f"(pass normalize=False to keep it as given)",
                UserWarning,
                stacklevel=3,
            )
        k = k / sums.view(-1, 1, 1)
    return k.contiguous()


def psf2otf(kernel: Tensor, height: int, width: int, full: bool = False) -> Tensor:
    """The transfer function of a centred kernel for circular convolution on ``height x width`` images.

    Pads ``kernel`` ``[Nk, kh, kw]`` with zeros to ``[Nk, H, W]``, rolls its centre ``(kh // 2, kw // 2)`` to
    ``(0, 0)`` and takes the 2-D FFT: ``rfft2`` (``[Nk, 1, H, W // 2 + 1]``) or, with ``full=True``, ``fft2``
    (``[Nk, 1, H, W]``). Then ``F(k * x) = otf * F(x)``. Each kernel's transfer function is computed on its own,
    so it does not depend on the other kernels of the batch.
    """
    nk, kh, kw = kernel.shape
    if kh > height or kw > width:
        raise ValueError(f"kernel {kh}x{kw} is larger than the image {height}x{width}")
    pad = kernel.new_zeros(nk, height, width)
    pad[:, :kh, :kw] = kernel
    pad = torch.roll(pad, shifts=(-(kh // 2), -(kw // 2)), dims=(1, 2))
    fft = torch.fft.fft2 if full else torch.fft.rfft2
    # One FFT per kernel: a batched FFT may round differently from a single one (MKL does for 2 transforms vs 1),
    # and the data step divides by |K|^2 + rho, so a kernel's transfer function must not depend on its batch.
    otf = torch.cat([fft(pad[i : i + 1]) for i in range(nk)])
    return otf[:, None]


class KernelOperator(Operator):
    """Base of the operators built on one circular-convolution kernel (shared or per image).

    Holds the kernel as a non-persistent buffer ``kernel`` ``[Nk, kh, kw]`` and caches its transfer function
    per ``(H, W, device, dtype, full)``; the cache is dropped when the module moves (``.to()``) and keyed on
    the kernel's version counter, so an in-place edit of ``kernel`` is seen.
    """

    kernel: Tensor

    def __init__(self, kernel: Tensor | np.ndarray, normalize: bool = True, **cg):
        super().__init__(**cg)
        self.register_buffer("kernel", as_kernel(kernel, normalize), persistent=False)
        self._otf_cache: dict[tuple, Tensor] = {}

    def _apply(self, fn, recurse=True):
        self._otf_cache = {}
        return super()._apply(fn, recurse)

    def otf(self, height: int, width: int, like: Tensor, full: bool = False) -> Tensor:
        """The cached transfer function for ``height x width`` images on ``like``'s device (see
        :func:`psf2otf`)."""
        dtype = work_dtype(like)
        # Inference tensors (built under torch.inference_mode) carry no version counter: they cannot be edited
        # in place outside inference mode anyway, so their identity is enough.
        version = -1 if self.kernel.is_inference() else self.kernel._version
        key = (height, width, like.device, dtype, full, id(self.kernel), version)
        otf = self._otf_cache.get(key)
        if otf is None:
            if len(self._otf_cache) > 8:
                self._otf_cache.clear()
            self._check_fits(height, width)
            otf = psf2otf(self.kernel.to(device=like.device, dtype=dtype), height, width, full)
            self._otf_cache[key] = otf
        return otf

    def select(self, index: int) -> Operator:
        """The operator of image ``index`` alone: a view of its kernel ``[1, kh, kw]`` (a shared kernel: itself), so
        that an in-place update of the batch's kernels (blind deblurring's refinements) reaches it; a view shares the
        version counter that keys the transfer-function cache."""
        if self.kernel.shape[0] == 1:
            return self
        return self._with_buffer("kernel", self.kernel[index : index + 1])

    def _check_fits(self, height: int, width: int) -> None:
        kh, kw = self.kernel.shape[-2:]
        if kh > height or kw > width:
            raise ValueError(
                f"kernel {kh}x{kw} is larger than the image {height}x{width}: use a smaller kernel or a larger image"
            )

    def _check_kernel_batch(self, n: int) -> None:
        check_batch(self.kernel.shape[0], n, "kernel", "[kh, kw]", "[N, kh, kw]")

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}"
