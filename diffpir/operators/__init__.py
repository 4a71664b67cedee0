"""Degradation operators ``y = H(x)`` with adjoints and closed-form proximal steps.

Every operator is a :class:`Operator` (an ``nn.Module``): ``forward(x)``, ``adjoint(y)``,
``prox_fn(y) -> (z, rho) -> argmin_x ||y - H x||^2 + rho ||x - z||^2`` (the y-only work done once; the one
place an operator writes its proximal step), ``prox(z, y, rho) = prox_fn(y)(z, rho)``, ``x_shape(y_shape)``,
``check(y)``, ``initial_estimate(y)``, ``official_start(y)`` (the official scripts' start) and
``select(index)`` (one image's operator). Images are ``[N, C, H, W]`` in [0, 1] space. ``OPERATORS`` builds a
small example of each kind.
"""

from diffpir.operators.base import Operator, as_generator
from diffpir.operators.blind import BlindBlur, delta_kernel
from diffpir.operators.blur import Blur
from diffpir.operators.fft import KernelOperator, as_kernel, psf2otf
from diffpir.operators.generic import LinearOperator, NonlinearOperator
from diffpir.operators.kernels import gaussian_kernel, load_kernel, motion_kernel
from diffpir.operators.masks import box_mask, load_mask, random_mask
from diffpir.operators.pointwise import Denoise, Inpaint
from diffpir.operators.registry import OPERATORS
from diffpir.operators.sr import Bicubic, Downsample, bicubic_kernel, imresize_matrix

__all__ = [
    "OPERATORS",
    "Bicubic",
    "BlindBlur",
    "Blur",
    "Denoise",
    "Downsample",
    "Inpaint",
    "KernelOperator",
    "LinearOperator",
    "NonlinearOperator",
    "Operator",
    "as_generator",
    "as_kernel",
    "bicubic_kernel",
    "box_mask",
    "delta_kernel",
    "gaussian_kernel",
    "imresize_matrix",
    "load_kernel",
    "load_mask",
    "motion_kernel",
    "psf2otf",
    "random_mask",
]
