"""Blur kernels: Gaussian, random camera-shake motion, and user kernels read from files.

All kernels are ``[size, size]`` (odd), non-negative where generated, sum to one and are centred. Random
generators take a ``torch.Generator`` (or an int seed; 0 is a seed) and never use the global RNG.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffpir.operators.base import as_generator
from diffpir.operators.fft import as_kernel
from diffpir.operators.loading import load_array


def _check_size(size: int, minimum: int = 1) -> int:
    if isinstance(size, bool) or int(size) != size or size < minimum or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd integer >= {minimum}, got {size!r}")
    return int(size)


def gaussian_kernel(size: int = 61, std: float = 3.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The isotropic Gaussian ``k[i, j] ∝ exp(-((i - c)^2 + (j - c)^2) / (2 std^2))``, ``c = (size - 1) / 2``,
    normalised to sum to one (MATLAB's ``fspecial('gaussian', size, std)``). Shape ``[size, size]``."""
    size = _check_size(size)
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * std**2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).to(dtype)


def motion_kernel(
    size: int = 61,
    intensity: float = 0.5,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A random camera-shake kernel ``[size, size]``, in the spirit of Boracchi & Foi (2012) and the
    ``motionblur`` generator used by the paper (size 61, intensity 0.5).

    1. A trajectory of ``8 size`` samples: its length is ``size (0.15 + 0.45 u1 + 0.3 intensity u2)``; its
       heading starts at a random angle and turns by a constant random curvature, Gaussian jitter and rare
       impulsive jerks, all scaled by ``intensity`` (``intensity = 0``: a straight stroke); the speed varies
       randomly too, so the camera dwells longer on some parts.
    2. Every sample carries the same exposure time; the path is shifted so that its centre of mass is the
       kernel centre and shrunk if needed to stay 3 px inside the border.
    3. Rasterised with sub-pixel (bilinear) accumulation, blurred by a small Gaussian (std 0.5 px)
       and normalised.

    Non-negative, sums to one, centre of mass at the central pixel; deterministic for a given generator state.
    """
    size = _check_size(size, minimum=9)
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
    g = as_generator(generator)
    n = 8 * size

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # 1. trajectory
    u = rand(2)
    length = size * (0.15 + 0.45 * u[0] + 0.3 * intensity * u[1])
    heading0 = 2 * math.pi * rand(1)
    curvature = intensity * (2 * rand(1) - 1) * math.pi / n
    jitter = intensity * math.pi / math.sqrt(n) * randn(n)
    jerks = (rand(n) < 0.02 * intensity) * intensity * math.pi * (2 * rand(n) - 1)
    heading = heading0 + torch.cumsum(curvature + jitter + jerks, 0)
    speed = torch.exp(0.5 * intensity * randn(n))
    speed = speed * (length / speed.sum())
    steps = torch.polar(speed, heading)
    path = torch.cat([torch.zeros(1, dtype=steps.dtype), torch.cumsum(steps, 0)])
    # 2. equal exposure per sample: centre of mass to the kernel centre, keep a 3 px margin
    path = path - path.mean()
    c = (size - 1) / 2
    extent = float(torch.maximum(path.real.abs().max(), path.imag.abs().max()))
    if extent > c - 3:
        path = path * ((c - 3) / extent)
    px, py = path.real + c, path.imag + c
    # 3. bilinear splatting, slight blur, normalisation
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    k = torch.zeros(size, size, dtype=torch.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            k.index_put_((y0 + dy, x0 + dx), wy * wx, accumulate=True)
    t = torch.arange(-2, 3, dtype=torch.float64)
    g1 = torch.exp(-(t**2) / (2 * 0.5**2))
    g1 = g1 / g1.sum()
    k = F.conv2d(k[None, None], (g1[:, None] * g1[None, :])[None, None], padding=2)[0, 0]
    k = k.clamp_min(0)
    return (k / k.sum()).to(dtype)


def load_kernel(path: str | Path, normalize: bool = True) -> Tensor:
    """Read a kernel ``[kh, kw]`` (float32) from ``.npy``, ``.pt``/``.pth`` (``weights_only``) or an image
    file (grayscale, white = weight).

    With ``normalize`` (default) it is divided by its sum (a ``UserWarning`` naming the file when the sum is off
    one by more than 1e-3); raises ``ValueError`` naming the file when it is
    missing, unreadable, not 2-D, even-sized, non-finite, or (with ``normalize``) does not have a positive
    sum.
    """
    arr = load_array(path, "kernel")
    try:
        k = as_kernel(arr, normalize=False)[0]
    except ValueError as err:
        raise ValueError(f"kernel file {str(path)!r}: {err}") from err
    if normalize:
        total = float(k.sum())
        if not total > 0:
            raise ValueError(f"kernel file {str(path)!r} sums to {total}: it cannot be normalised to sum to one")
        if abs(total - 1.0) > 1e-3:
            msg = f"kernel file {str(path)!r} sums to {total:.6g}, not 1: normalised to sum to one"
            warnings.warn(msg, stacklevel=2)
        k = k / total
    return k.float()
