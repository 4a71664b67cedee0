"""Diffusion posterior sampling (DPS; Chung, Kim, Mccann, Klasky and Ye, ICLR 2023, Algorithm 1).

Each step runs the network with gradients on, forms ``x0_hat(x_t)`` (Tweedie), takes the DDPM ancestral step
``x'_{t-1} ~ q(x_{t-1} | x_t, x0_hat)`` and pulls it towards the measurement with the gradient of the residual
norm *through the network*:

    x_{t-1} = x'_{t-1} - zeta_t grad_{x_t} ||y - H(x0_hat(x_t))||^2,   zeta_t = zeta / ||y - H(x0_hat(x_t))||,

which is ``x'_{t-1} - scale * grad_{x_t} ||y - H(x0_hat)||`` with ``scale = 2 zeta``: the form (and the
``scale`` hyper-parameter) of the official code, whose configs use 0.3 for deblurring and SR, 0.5 for inpainting.
The residual is taken on the [-1, 1] scale (``2 (y - H(x0))``) as in the official code, one norm per image (the
official code takes one norm over the whole batch, which couples the images).

Any number of steps by respacing (guided-diffusion's ``space_timesteps``): ``steps`` timesteps evenly spread
over ``[0, T - 1]``; the respaced chain has ``alpha_bar`` at those timesteps, so ``beta_t = 1 - ab_t / ab_prev``.
The variance of the ancestral step is the posterior's (``"small"``: ``beta_t (1 - ab_prev) / (1 - ab_t)``) or
``beta_t`` (``"large"``); the official code uses the FFHQ net's learned variance, which lies between the two.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from diffpir.methods.base import Method, schedule_of
from diffpir.methods.respaced import predict_x0
from diffpir.operators.base import differentiable
from diffpir.sampler import DataOperator, GeneratorArg, StepState, randn
from diffpir.schedule import respaced_timesteps

__all__ = ["DPS", "respaced_timesteps"]


class DPS(Method):
    """Diffusion posterior sampling (module docstring).

    Args:
        steps: number of (respaced) DDPM steps = NFEs (the paper: 1000), each with one backward pass.
        scale: the official code's step size on ``grad ||y - H(x0_hat)||`` (``= 2 zeta`` of the paper).
        variance: ``"small"`` (posterior variance) or ``"large"`` (``beta_t``) for the ancestral step.
        clip_denoised: clamp ``x0_hat`` to [-1, 1] (the official code does; no gradient flows where clipped).
    """

    name = "dps"

    def __init__(
        self,
        steps: int = 1000,
        scale: float = 0.3,
        variance: Literal["small", "large"] = "small",
        clip_denoised: bool = True,
    ):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        if variance not in ("small", "large"):
            raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
        self.steps, self.scale, self.variance, self.clip_denoised = int(steps), float(scale), variance, clip_denoised

    @property
    def nfe(self) -> int:
        return self.steps

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "scale": self.scale,
            "variance": self.variance,
            "clip_denoised": self.clip_denoised,
        }

    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        steps = schedule_of(prior, "DPS").respaced_steps(self.steps)
        x_shape = op.x_shape(y.shape)
        # Lightning's predict runs under inference mode, whose tensors refuse autograd: step out of it and
        # work on normal copies (of y and of the operator's tensors).
        with torch.inference_mode(False), torch.enable_grad():
            y = y.detach().clone()
            op = differentiable(op)  # its mask or kernel may be an inference tensor too
            x = randn(x_shape, generator, y)
            for step in steps:
                ab_t, ab_prev = step.ab, step.ab_next
                beta = 1.0 - ab_t / ab_prev
                x = x.detach().requires_grad_(True)
                # 1. Tweedie's x0_hat through the network (graph kept for the measurement gradient).
                _, x0 = predict_x0(prior, x, step, self.clip_denoised)
                # 2. The measurement gradient: grad_x ||y - H(x0_hat(x))|| per image, residual on the [-1, 1] scale.
                resid = 2.0 * (y - op.forward((x0 + 1) / 2))
                norm = resid.flatten(1).norm(dim=1)
                (grad,) = torch.autograd.grad(norm.sum(), x)
                with torch.no_grad():
                    # 3. DDPM ancestral step from q(x_prev | x_t, x0_hat) on the respaced chain.
                    x0d = x0.detach()
                    coef_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
                    coef_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
                    x_prev = coef_x0 * x0d + coef_xt * x.detach()
                    if not step.last:
                        var = beta * (1 - ab_prev) / (1 - ab_t) if self.variance == "small" else beta
                        x_prev = x_prev + math.sqrt(var) * randn(x_shape, generator, y)
                    # 4. Pull towards the measurement: x_prev -= scale * grad ||r||  (= zeta_t grad ||r||^2).
                    x_prev = x_prev - self.scale * grad
                if callback is not None:
                    callback(StepState(step.index, step.t, step.t_next, float("nan"), x.detach(), x0d, x_prev.detach()))
                x = x_prev.detach()
        return ((x + 1) / 2).detach()
