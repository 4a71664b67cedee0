"""``OPERATORS``: one small example instance of every operator kind, for tests and demos.

Each entry is a factory ``(n=2, c=3, h=12, w=16, generator=None) -> Operator`` building an operator for a
batch of ``n`` images ``[n, c, h, w]`` (``h``, ``w`` even and at least 6) with **per-image** parameters where
the operator takes them (``*_shared`` entries use one parameter for the whole batch). Values are seeded by
``generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffpir.operators.base import Operator, as_generator
from diffpir.operators.blur import Blur
from diffpir.operators.generic import LinearOperator, NonlinearOperator
from diffpir.operators.kernels import gaussian_kernel
from diffpir.operators.masks import random_mask
from diffpir.operators.pointwise import Denoise, Inpaint
from diffpir.operators.sr import Bicubic, Downsample

Factory = Callable[..., Operator]
Gen = torch.Generator | int | None


def _random_kernels(n: int, kh: int, kw: int, generator: Gen) -> Tensor:
    """``n`` asymmetric positive kernels ``[n, kh, kw]`` summing to one (asymmetry tells convolution from
    correlation)."""
    k = torch.rand(n, kh, kw, generator=as_generator(generator)) + 0.1
    return k / k.sum(dim=(1, 2), keepdim=True)


def _pool_down(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def _pool_up(y: Tensor) -> Tensor:
    return y.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1) / 4


def _double(shape: torch.Size) -> torch.Size:
    n, c, h, w = shape
    return torch.Size((n, c, 2 * h, 2 * w))


def _squash(x: Tensor) -> Tensor:
    return 0.5 * torch.tanh(2 * x)


def _denoise(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Denoise()


def _inpaint(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Inpaint(random_mask(h, w, 0.5, as_generator(generator), channels=n).view(n, 1, h, w))


def _inpaint_channels(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Inpaint(random_mask(h, w, 0.5, as_generator(generator), channels=n * c).view(n, c, h, w))


def _inpaint_shared(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Inpaint(random_mask(h, w, 0.5, as_generator(generator)))


def _blur(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Blur(_random_kernels(n, 3, 5, generator))


def _blur_shared(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Blur(gaussian_kernel(5, 1.0))


def _downsample(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Downsample(2, _random_kernels(n, 5, 3, generator))


def _decimate(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Downsample(2)


def _bicubic(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return Bicubic(2)


def _linear(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return LinearOperator(_pool_down, _pool_up, _double)


def _nonlinear(n: int = 2, c: int = 3, h: int = 12, w: int = 16, generator: Gen = None) -> Operator:
    return NonlinearOperator(_squash, steps=20)


OPERATORS: dict[str, Factory] = {
    "denoise": _denoise,
    "inpaint": _inpaint,
    "inpaint_channels": _inpaint_channels,
    "inpaint_shared": _inpaint_shared,
    "blur": _blur,
    "blur_shared": _blur_shared,
    "downsample": _downsample,
    "decimate": _decimate,
    "bicubic": _bicubic,
    "linear": _linear,
    "nonlinear": _nonlinear,
}
