"""DDNM and DDNM+ (Wang, Yu and Zhang, ICLR 2023): zero-shot restoration by range-null-space decomposition.

Each step replaces the range-space part of the network's ``x0|t`` by the measurement's:

    x0_hat = A^+ y + (I - A^+ A) x0|t = x0|t - A^+ (A x0|t - y),

then moves to the next timestep. What is implemented here:

- **The pseudo-inverse through the operator's prox.** For a linear ``A``,
  ``prox(z, y, rho) = argmin_x ||y - A x||^2 + rho ||x - z||^2 -> z + A^+ (y - A z)`` as ``rho -> 0``: exactly the
  range-null-space step, for every operator with a prox (closed forms for inpainting, blur, SR; conjugate gradients
  otherwise). A small ``pinv_rho`` (relative to ``||A||^2 = 1`` for our brightness-preserving operators) makes it
  a Tikhonov-regularised pseudo-inverse, filter factors ``s^2 / (s^2 + rho)`` on the singular values ``s``: this
  plays the role of the official code's truncation of tiny singular values (deblurring is otherwise unstable).
  The projection runs in float64 (the SR closed form divides by ``rho``).
- **DDNM+ noise handling** (``sigma_n > 0``). DDNM+ (the paper's eq. 17-19, the official code's ``Lambda``)
  shrinks the correction per singular direction of ``A``: ``x0_hat = x0|t - Sigma_t A^+ (A x0|t - y)`` with
  ``lambda_i = min(1, s_i c_t)``, ``c_t = sigma sqrt(1 - eta^2) / (a sigma_y)``, where ``a = sqrt(ab_{t'})`` and
  ``sigma = sqrt(1 - ab_{t'})`` are the next step's signal and noise scales and ``sigma_y = 2 sigma_n`` (the
  [-1, 1] scale): directions where ``y``'s noise ``sigma_y / s_i`` exceeds the step's noise are only partly trusted.
  Operators here expose no SVD, only a prox, so two forms are offered:

  * ``noise_rule="tikhonov"`` (default): the prox with ``rho_t = 1 / c_t^2``, i.e. filter factors
    ``s_i^2 c_t^2 / (s_i^2 c_t^2 + 1)`` in place of ``min(1, s_i c_t)`` (1 where ``s_i c_t >> 1``, vanishing where
    ``s_i c_t << 1``, the noise it lets in at most half the step's); the update then adds the step's full noise.
    This works for every operator with a prox, blur included (for which the scalar rule fails).
  * ``noise_rule="scalar"``: the paper's simplified ``Sigma_t = lambda_t I``: if ``sigma >= a sigma_y`` then
    ``lambda_t = 1`` and the update's noise is ``gamma = sqrt(sigma^2 - (a sigma_y)^2)``, else ``lambda_t =
    sigma / (a sigma_y)`` and ``gamma = 0``. Sound when ``A^+`` does not amplify noise (inpainting, denoising,
    decimation); on deblurring it lets ``A^+ n`` through.

  On the last step (``sigma = 0``) both make no correction, as in the official code. With ``sigma_n = 0`` both are
  plain DDNM.
- **The update** follows the official code's DDIM-style step (``eta = 0.85``, 100 uniformly respaced steps by
  default) rather than the paper's ancestral sampling; the last step returns ``x0_hat``. The "time-travel" trick
  (DDNM+'s back-and-forth resampling) is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from diffpir.methods.base import Method, schedule_of
from diffpir.methods.respaced import predict_x0
from diffpir.sampler import DataOperator, GeneratorArg, StepState, randn

__all__ = ["DDNM", "range_null_projection"]


def range_null_projection(op: DataOperator, y: Tensor) -> Callable[[Tensor, float], Tensor]:
    """``(z, rho) -> prox(z, y, rho)`` in float64: ``z + A^+ (y - A z)`` for ``rho -> 0`` (module docstring).

    ``z`` on the [0, 1] scale, ``[N, C, H, W]``; the result comes back in ``z``'s dtype.
    """
    prox = op.prox_fn(y.to(torch.float64))

    def project(z: Tensor, rho: float) -> Tensor:
        return prox(z.to(torch.float64), rho).to(z.dtype)

    return project


class DDNM(Method):
    """DDNM / DDNM+ (module docstring).

    Args:
        steps: respaced timesteps = NFEs (the official code: 100).
        eta: share of fresh noise in the DDIM-style update (official 0.85).
        pinv_rho: the Tikhonov weight of the pseudo-inverse (``0 < pinv_rho``; 1e-4 by default), a floor on the
            prox weight in every rule.
        noise_rule: ``"tikhonov"`` (default) or ``"scalar"``: the DDNM+ noise handling when ``sigma_n > 0``;
            ``"none"``: plain DDNM whatever the noise (it copies the noise of ``y`` into the result).
        clip_denoised: clamp ``x0|t`` to [-1, 1].
    """

    name = "ddnm"

    def __init__(
        self,
        steps: int = 100,
        eta: float = 0.85,
        pinv_rho: float = 1e-4,
        noise_rule: Literal["tikhonov", "scalar", "none"] = "tikhonov",
        clip_denoised: bool = True,
    ):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not 0.0 <= eta < 1.0:
            raise ValueError(f"eta must lie in [0, 1), got {eta}")
        if not (pinv_rho > 0 and math.isfinite(pinv_rho)):
            raise ValueError(f"pinv_rho must be a positive number, got {pinv_rho}")
        if noise_rule not in ("tikhonov", "scalar", "none"):
            raise ValueError(f"noise_rule must be 'tikhonov', 'scalar' or 'none', got {noise_rule!r}")
        self.steps, self.eta, self.pinv_rho = int(steps), float(eta), float(pinv_rho)
        self.noise_rule, self.clip_denoised = noise_rule, bool(clip_denoised)

    @property
    def nfe(self) -> int:
        return self.steps

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "eta": self.eta, "pinv_rho": self.pinv_rho, "noise_rule": self.noise_rule}

    def _rule(self, a: float, s: float, sigma_y: float) -> tuple[float, float, float]:
        """``(lambda_t, rho_t, gamma)``: the share of the correction, the prox weight and the update's noise std."""
        if sigma_y == 0 or self.noise_rule == "none":
            return 1.0, self.pinv_rho, s
        if self.noise_rule == "tikhonov":
            if s == 0:
                return 0.0, math.inf, 0.0
            c = s * math.sqrt(1 - self.eta**2) / (a * sigma_y)
            return 1.0, max(self.pinv_rho, 1.0 / c**2), s
        if s >= a * sigma_y:
            return 1.0, self.pinv_rho, math.sqrt(max(s * s - (a * sigma_y) ** 2, 0.0))
        return s / (a * sigma_y), self.pinv_rho, 0.0

    @torch.no_grad()
    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        steps = schedule_of(prior, "DDNM").respaced_steps(self.steps)
        x_shape = op.x_shape(y.shape)
        project = range_null_projection(op, y)
        sigma_y = 2.0 * float(sigma_n)

        x = randn(x_shape, generator, y)
        for step in steps:
            # 1. x0|t from the network.
            eps, x0 = predict_x0(prior, x, step, self.clip_denoised)
            # 2. How much to trust y on this step (DDNM+), from the next step's scales a, s.
            a, s = math.sqrt(step.ab_next), math.sqrt(1.0 - step.ab_next)
            lam, rho, gamma = self._rule(a, s, sigma_y)
            # 3. Range-null-space step on the [0, 1] scale: x0_hat = x0 - lam A^+ (A x0 - y).
            x0_hat = x0
            if lam > 0 and math.isfinite(rho):
                u0 = (x0 + 1) / 2
                x0_hat = x0 + lam * 2.0 * (project(u0, rho) - u0)
            if callback is not None:
                callback(StepState(step.index, step.t, step.t_next, rho, x, x0, x0_hat))
            if step.last:
                x = x0_hat
                break
            # 4. DDIM-style move to the next timestep (official code): a x0_hat + gamma (eta z + sqrt(1-eta^2) eps).
            x = a * x0_hat
            if gamma > 0:
                noise = math.sqrt(1 - self.eta**2) * eps
                if self.eta > 0:
                    noise = noise + self.eta * randn(x_shape, generator, y)
                x = x + gamma * noise
        return (x + 1) / 2
