"""Pixel-wise degradations: denoising (identity) and inpainting (a mask)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from diffpir.operators.base import Operator, check_batch, check_measurement, rho_view


class Denoise(Operator):
    """``y = x`` (plus noise): Gaussian denoising.

    ``prox(z, y, rho) = argmin_x ||y - x||^2 + rho ||x - z||^2 = (y + rho z) / (1 + rho)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """``z, rho -> (y + rho z) / (1 + rho)``, all ``[N, C, H, W]``; ``rho`` float or ``[N]``."""

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            r = rho_view(rho, z)
            return (y + r * z) / (1 + r)

        return prox


class Inpaint(Operator):
    """``y = M * x``: a mask multiplies the image pixel by pixel (``y`` has the image's size, zeros where
    missing).

    Args:
        mask: values in [0, 1], **1 = known pixel, 0 = missing** (soft values are allowed and act as weights).
            Shapes: ``[H, W]`` or ``[1|C, H, W]`` (shared by the batch) or ``[N, 1|C, H, W]`` (one per image);
            one channel is shared by all colour channels.

    ``prox(z, y, rho) = argmin_x ||y - M x||^2 + rho ||x - z||^2 = (M y + rho z) / (M^2 + rho)`` (``M^2 = M``
    for a binary mask).
    """

    mask: Tensor

    def __init__(self, mask: Tensor | np.ndarray, **cg):
        super().__init__(**cg)
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
        m = m.to(torch.float64 if m.dtype == torch.float64 else torch.float32)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None]
        if m.ndim != 4:
            raise ValueError(
                f"mask must be [H, W], [1|C, H, W] or one per image [N, 1|C, H, W], got shape {tuple(m.shape)}"
            )
        if not bool(torch.isfinite(m).all()) or bool(((m < 0) | (m > 1)).any()):
            raise ValueError("mask values must lie in [0, 1] (1 = known pixel, 0 = missing)")
        self.register_buffer("mask", m.contiguous(), persistent=False)

    def _check_image(self, x: Tensor, name: str) -> None:
        n, c, h, w = x.shape
        mn, mc, mh, mw = self.mask.shape
        if (mh, mw) != (h, w):
            raise ValueError(
                f"mask size {mh}x{mw} does not match the {name} size {h}x{w}: give a mask of the image's size"
            )
        check_batch(mn, n, "mask", "[1|C, H, W]", "[N, 1|C, H, W]")
        if mc not in (1, c):
            raise ValueError(f"mask has {mc} channels but the {name} has {c}: give a mask with 1 or {c} channels")

    def _mask(self, like: Tensor) -> Tensor:
        return self.mask.to(device=like.device, dtype=like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_measurement(x, "x")
        self._check_image(x, "image")
        return self._mask(x) * x

    def adjoint(self, y: Tensor) -> Tensor:
        return self.forward(y)

    def _check_shape(self, y: Tensor) -> None:
        self._check_image(y, "measurement")

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """``z, rho -> (M y + rho z) / (M^2 + rho)``, all ``[N, C, H, W]``; ``rho`` float or ``[N]`` (the mask in
        ``z``'s dtype and device)."""

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            self._check_image(z, "image")
            m = self._mask(z)
            r = rho_view(rho, z)
            return (m * y + r * z) / (m * m + r)

        return prox

    def initial_estimate(self, y: Tensor) -> Tensor:
        """``y`` at known pixels, the mean of the known pixels (per image and channel) where missing."""
        m = self._mask(y).expand_as(y)
        mean = (m * y).sum((2, 3), keepdim=True) / (m * m).sum((2, 3), keepdim=True).clamp_min(1e-8)
        return (m * y + (1 - m) * mean).clamp(0, 1)

    def official_start(self, y: Tensor) -> tuple[Tensor, bool]:
        """The official start (``main_ddpir_inpainting.py``): ``M y``, the missing pixels at 0 (-1 for the
        network), not clamped, noisy."""
        return self._mask(y) * y, True

    def select(self, index: int) -> Operator:
        """The operator of image ``index`` alone: its own mask (a shared mask: itself)."""
        if self.mask.shape[0] == 1:
            return self
        return self._with_buffer("mask", self.mask[index : index + 1])  # a view, as Operator.select says

    def extra_repr(self) -> str:
        return f"mask={tuple(self.mask.shape)}"
