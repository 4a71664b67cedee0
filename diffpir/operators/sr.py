"""Super-resolution degradations: kernel-then-decimate (USRNet closed form) and MATLAB-style bicubic
downsampling."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffpir.operators.base import Operator, Shape, check_measurement, rho_view, work_dtype
from diffpir.operators.fft import KernelOperator


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or int(scale) != scale or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _check_divides(scale: int, h: int, w: int) -> None:
    if h % scale or w % scale:
        raise ValueError(
            f"scale {scale} does not divide the image size {h}x{w}: crop or pad the image to a multiple of {scale}"
        )


def _upsample_bicubic(y: Tensor, scale: int, clamp: bool = True) -> Tensor:
    """Bicubic upsampling by ``scale`` (``torch`` interpolate, ``align_corners=False``: Keys' cubic with
    ``a = -0.75`` and replicated borders, as OpenCV's ``INTER_CUBIC``), clamped to [0, 1] unless ``clamp=False``."""
    if scale == 1:
        return y.clamp(0, 1) if clamp else y
    up = F.interpolate(y.to(work_dtype(y)), scale_factor=scale, mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) if clamp else up).to(y.dtype)


def _shift_pixel(x: Tensor, scale: int) -> Tensor:
    """``x`` resampled at ``(i + (s - 1) / 2, j + (s - 1) / 2)`` by bilinear interpolation, positions clipped to
    the image (the official ``utils_sisr.shift_pixel``): moves a centred upsampling onto the top-left sampling
    grid of :class:`Downsample`."""
    shift = (scale - 1) / 2
    for dim in (-2, -1):
        n = x.shape[dim]
        pos = (torch.arange(n, dtype=torch.float64) + shift).clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        w = (pos - lo).to(device=x.device, dtype=x.dtype)
        w = w.view(-1, 1) if dim == -2 else w
        x = x.index_select(dim, lo.to(x.device)) * (1 - w) + x.index_select(dim, hi.to(x.device)) * w
    return x


def bicubic_kernel(scale: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The blur kernel ``k`` for which :class:`Downsample` (``y[i] = (k * x)[s i]``, circular) equals MATLAB's
    bicubic ``imresize(x, 1/s)`` (:class:`Bicubic`) away from the borders.

    MATLAB takes output pixel ``i`` (0-based) at input position ``s i + (s - 1) / 2`` with the stretched cubic
    ``cubic(t / s) / s``, so ``k[m] = cubic((m + (s - 1) / 2) / s) / s`` along each axis (normalised, separable),
    centred on an odd grid just large enough for its support. The official code's closed form uses a 25x25
    kernel of this shape estimated from images (``kernels_bicubicx234.mat``), within 2e-3 of this one (peak 0.058).
    """
    s = _check_scale(scale)
    shift = (s - 1) / 2
    r = math.ceil(2 * s + shift)
    m = np.arange(-r, r + 1, dtype=np.float64)
    k1 = _cubic((m + shift) / s) / s
    k1 = k1 / k1.sum()
    return torch.from_numpy(np.outer(k1, k1)).to(dtype)


class _Downscaling:
    """What the two SR operators share: images ``s`` times the measurement's size (``x_shape``) and bicubic
    upsampling as the first guess. The operator sets ``scale`` (``s``)."""

    scale: int

    def x_shape(self, y_shape: Shape) -> torch.Size:
        n, c, h, w = y_shape
        return torch.Size((n, c, h * self.scale, w * self.scale))

    def initial_estimate(self, y: Tensor) -> Tensor:
        """Bicubic upsampling of ``y`` by ``s``, clamped to [0, 1]."""
        return _upsample_bicubic(y, self.scale)


class Downsample(_Downscaling, KernelOperator):
    """``y = (k * x) downsampled by s``: circular convolution, then the top-left sample of every ``s x s``
    block (``y[i, j] = (k * x)[s i, s j]``, as USRNet's ``downsample``).

    Args:
        scale: the integer factor ``s``; it must divide the image height and width.
        kernel: ``[kh, kw]`` or ``[N, kh, kw]`` (odd sizes; see :class:`~diffpir.operators.Blur`), or ``None``
            for the identity (pure decimation).
        normalize: divide the kernel by its sum (with a warning when it did not sum to one).

    ``prox(z, y, rho) = argmin_x ||y - S(k * x)||^2 + rho ||x - z||^2`` (``S``: the decimation) by the
    closed form of Zhang et al. 2020 (USRNet, after Zhao et al. 2016). With ``K = F(k)`` on the ``H x W``
    grid, ``d = conj(K) F(S^T y) + rho F(z)`` and ``mean_b`` the mean over the ``s x s`` blocks (each
    ``H/s x W/s``) of a spectrum, replicated back to ``H x W``:

        ``x = F^-1[(d - conj(K) mean_b(K d) / (mean_b(|K|^2) + rho)) / rho]``.

    It follows from Woodbury's identity, as ``F S^T S F^-1`` is ``1/s^2`` times the block-sum-and-replicate
    map.
    """

    def __init__(self, scale: int, kernel: Tensor | np.ndarray | None = None, normalize: bool = True, **cg):
        super().__init__(torch.ones(1, 1) if kernel is None else kernel, normalize, **cg)
        self.scale = _check_scale(scale)

    def _check_image(self, x: Tensor, name: str) -> None:
        check_measurement(x, name)
        self._check_kernel_batch(x.shape[0])
        _check_divides(self.scale, *x.shape[-2:])
        self._check_fits(*x.shape[-2:])

    def _check_shape(self, y: Tensor) -> None:
        self._check_kernel_batch(y.shape[0])
        kh, kw = self.kernel.shape[-2:]
        h, w = y.shape[-2] * self.scale, y.shape[-1] * self.scale
        if kh > h or kw > w:
            raise ValueError(
                f"kernel {kh}x{kw} is larger than the {h}x{w} image of a "
                f"{y.shape[-2]}x{y.shape[-1]} measurement at scale {self.scale}"
            )

    def _upsample_zero(self, y: Tensor) -> Tensor:
        n, c, h, w = y.shape
        s = self.scale
        u = y.new_zeros(n, c, h * s, w * s)
        u[..., ::s, ::s] = y
        return u

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` to ``[N, C, H/s, W/s]``."""
        self._check_image(x, "x")
        if self.kernel.shape[-2:] == (1, 1):  # pure decimation (times a per-image scalar): no FFT
            k = self.kernel.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            return k * x[..., :: self.scale, :: self.scale]
        h, w = x.shape[-2:]
        blurred = torch.fft.irfft2(self.otf(h, w, x) * torch.fft.rfft2(x.to(work_dtype(x))), s=(h, w))
        return blurred[..., :: self.scale, :: self.scale].to(x.dtype)

    def adjoint(self, y: Tensor) -> Tensor:
        """Zero-upsampling then correlation with ``k``: ``[N, C, h, w]`` to ``[N, C, s h, s w]``."""
        u = self._upsample_zero(y.to(work_dtype(y)))
        self._check_image(u, "x")
        if self.kernel.shape[-2:] == (1, 1):
            return (self.kernel.to(device=u.device, dtype=u.dtype).view(-1, 1, 1, 1) * u).to(y.dtype)
        h, w = u.shape[-2:]
        return torch.fft.irfft2(self.otf(h, w, u).conj() * torch.fft.rfft2(u), s=(h, w)).to(y.dtype)

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """The USRNet closed form (class docstring) for ``y`` ``[N, C, H/s, W/s]``: ``z, rho -> x``, ``z`` and ``x``
        ``[N, C, H, W]``; ``conj(K) F(S^T y)`` and the block means of ``|K|^2`` are computed here, once."""
        check_measurement(y, "y")
        self._check_shape(y)
        n, c, h, w = y.shape
        s = self.scale
        yf = y.to(work_dtype(y))
        k = self.otf(h * s, w * s, yf, full=True)
        ky = k.conj() * torch.fft.fft2(self._upsample_zero(yf))
        k2 = k.abs().square().view(k.shape[0], 1, s, h, s, w).mean(dim=(2, 4))

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            if z.shape != (n, c, h * s, w * s):
                raise ValueError(f"z has shape {tuple(z.shape)}, expected {(n, c, h * s, w * s)}")
            zf = z.to(yf.dtype)
            r = rho_view(rho, zf)
            d = ky + r * torch.fft.fft2(zf)
            q = ((k * d).view(n, c, s, h, s, w).mean(dim=(2, 4)) / (k2 + r)).repeat(1, 1, s, s)
            return torch.fft.ifft2((d - k.conj() * q) / r).real.to(z.dtype)

        return prox

    def initial_estimate(self, y: Tensor) -> Tensor:
        """Bicubic upsampling of ``y`` by ``s`` moved onto this operator's top-left sampling grid (``shift_pixel``,
        as the official scripts do), clamped to [0, 1]: the centred upsampling lies ``(s - 1) / 2`` pixels off."""
        return _shift_pixel(_upsample_bicubic(y, self.scale), self.scale).clamp(0, 1)

    def official_start(self, y: Tensor) -> tuple[Tensor, bool]:
        """The official start (``main_ddpir_sisr.py`` with ``classical_degradation``): the unclamped bicubic
        upsampling shifted onto the top-left sampling grid (``shift_pixel``), taken as clean."""
        return _shift_pixel(_upsample_bicubic(y, self.scale, clamp=False), self.scale), False

    def extra_repr(self) -> str:
        return f"scale={self.scale}, kernel={tuple(self.kernel.shape)}"


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    inner = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return inner + outer


def imresize_matrix(in_length: int, scale: float, antialias: bool = True) -> Tensor:
    """The ``[ceil(in_length * scale), in_length]`` float64 matrix of MATLAB's ``imresize(..., scale,
    'bicubic')`` along one axis.

    Follows MATLAB's ``contributions``: output pixel ``i`` (1-based) sits at input coordinate
    ``u = i / scale + (1 - 1 / scale) / 2``; when shrinking with antialiasing the cubic kernel is stretched to
    ``scale * cubic(scale * t)`` (support ``4 / scale``); the ``ceil(support) + 2`` taps from
    ``floor(u - support / 2)`` are weighted, normalised to sum to one, and taps outside the image are mirrored
    (symmetric padding: ``... 2 1 | 1 2 ... n | n n-1 ...``). Every row sums to one.
    """
    if in_length < 1 or scale <= 0:
        raise ValueError(f"in_length must be positive and scale positive, got {in_length}, {scale}")
    out_length = math.ceil(in_length * scale - 1e-9)
    width = 4.0
    if scale < 1 and antialias:
        width = width / scale

        def kernel(t: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * t)
    else:
        kernel = _cubic
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
    weights = kernel(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(1, in_length + 1), np.arange(in_length, 0, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_length)] - 1
    mat = np.zeros((out_length, in_length))
    np.add.at(mat, (np.repeat(np.arange(out_length), taps), idx.ravel()), weights.ravel())
    return torch.from_numpy(mat)


class Bicubic(_Downscaling, Operator):
    """``y = imresize(x, 1/s, 'bicubic')`` as MATLAB computes it (antialiased cubic, ``a = -0.5``, symmetric
    borders), written as separable matrices: ``y = W_h x W_w^T`` with ``W_h`` ``[H/s, H]``, ``W_w`` ``[W/s,
    W]`` (see :func:`imresize_matrix`; cached per size, device and dtype).

    ``prox(z, y, rho) = argmin_x ||y - W_h x W_w^T||^2 + rho ||x - z||^2``, solved exactly: with the float64
    eigendecompositions ``W_h^T W_h = U_h D_h U_h^T`` and ``W_w^T W_w = U_w D_w U_w^T`` (cached),
    ``x = U_h [(U_h^T W_h^T y W_w U_w + rho U_h^T z U_w) / (D_h D_w^T + rho)] U_w^T``.

    With ``data_step="kernel"`` the data step is instead the official code's: the closed form of
    :class:`Downsample` with :func:`bicubic_kernel` (circular blur then top-left decimation), which equals the
    bicubic downsampling away from the borders only.

    Args:
        scale: integer factor ``s`` dividing the image height and width.
        data_step: ``"exact"`` (default) or ``"kernel"`` (the official approximation).
    """

    def __init__(self, scale: int, data_step: Literal["exact", "kernel"] = "exact", **cg):
        super().__init__(**cg)
        self.scale = _check_scale(scale)
        if data_step not in ("exact", "kernel"):
            raise ValueError(f"data_step must be 'exact' or 'kernel', got {data_step!r}")
        self.data_step = data_step
        self._kernel_op = (
            Downsample(self.scale, bicubic_kernel(self.scale, torch.float64)) if data_step == "kernel" else None
        )
        self._mat_cache: dict[tuple, Tensor] = {}
        self._eig_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _apply(self, fn, recurse=True):
        self._mat_cache, self._eig_cache = {}, {}
        return super()._apply(fn, recurse)

    def matrix(self, length: int, like: Tensor) -> Tensor:
        """The cached ``[length / s, length]`` resizing matrix on ``like``'s device, in the work dtype."""
        key = (length, like.device, work_dtype(like))
        mat = self._mat_cache.get(key)
        if mat is None:
            mat = imresize_matrix(length, 1 / self.scale).to(device=like.device, dtype=key[2])
            self._mat_cache[key] = mat
        return mat

    def _eig(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (length, like.device, work_dtype(like))
        eig = self._eig_cache.get(key)
        if eig is None:
            mat = imresize_matrix(length, 1 / self.scale)
            d, u = torch.linalg.eigh(mat.T @ mat)
            eig = (
                u.to(device=like.device, dtype=key[2]),
                d.clamp_min(0).to(device=like.device, dtype=key[2]),
            )
            self._eig_cache[key] = eig
        return eig

    def _check_image(self, x: Tensor, name: str) -> None:
        check_measurement(x, name)
        _check_divides(self.scale, *x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` to ``[N, C, H/s, W/s]``."""
        self._check_image(x, "x")
        xf = x.to(work_dtype(x))
        return (self.matrix(x.shape[-2], xf) @ xf @ self.matrix(x.shape[-1], xf).T).to(x.dtype)

    def adjoint(self, y: Tensor) -> Tensor:
        """``W_h^T y W_w``: ``[N, C, h, w]`` to ``[N, C, s h, s w]``."""
        check_measurement(y, "y")
        yf = y.to(work_dtype(y))
        s = self.scale
        return (self.matrix(y.shape[-2] * s, yf).T @ yf @ self.matrix(y.shape[-1] * s, yf)).to(y.dtype)

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """The exact eigen-solution (class docstring) for ``y`` ``[N, C, H/s, W/s]``: ``z, rho -> x``, ``z`` and
        ``x`` ``[N, C, H, W]``; ``U_h^T W_h^T y W_w U_w`` is computed here, once: four small matmuls a call. With
        ``data_step="kernel"``: :class:`Downsample`'s closed form with :func:`bicubic_kernel`."""
        if self._kernel_op is not None:
            return self._kernel_op.prox_fn(y)
        check_measurement(y, "y")
        yf = y.to(work_dtype(y))
        uh, dh = self._eig(y.shape[-2] * self.scale, yf)
        uw, dw = self._eig(y.shape[-1] * self.scale, yf)
        rhs_y = uh.T @ self.adjoint(yf) @ uw
        dd = dh[:, None] * dw[None, :]

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            if z.shape[-2:] != rhs_y.shape[-2:] or z.shape[:2] != y.shape[:2]:
                raise ValueError(f"z has shape {tuple(z.shape)}, expected {(*y.shape[:2], *rhs_y.shape[-2:])}")
            zf = z.to(yf.dtype)
            r = rho_view(rho, zf)
            coef = (rhs_y + r * (uh.T @ zf @ uw)) / (dd + r)
            return (uh @ coef @ uw.T).to(z.dtype)

        return prox

    def official_start(self, y: Tensor) -> tuple[Tensor, bool]:
        """The official start (``main_ddpir_sisr.py``): the unclamped bicubic upsampling (OpenCV's
        ``INTER_CUBIC``), taken as clean (no ``t_y`` rescaling)."""
        return _upsample_bicubic(y, self.scale, clamp=False), False

    def extra_repr(self) -> str:
        return f"scale={self.scale}" + (", data_step='kernel'" if self._kernel_op is not None else "")
