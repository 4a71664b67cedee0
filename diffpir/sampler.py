"""The DiffPIR sampler (Zhu et al. 2023, Algorithm 1), following the official code's conventions.

Each step alternates a diffusion denoising step (the prior) with a closed-form data-proximal step (the operator's
``prox``), then re-noises to the next timestep. The sampler never branches on the task: everything
task-specific lives in the operator.

Ranges: ``y`` and the result are in [0, 1]; ``sigma_n`` is the std of the measurement noise on the [0, 1] scale;
the eps-model sees ``x_t`` on the network's [-1, 1] scale. The data step runs on the [0, 1] scale.

The penalty of the data step is the official code's ``rho_t = lambda * sigma^2 / sigma_bar_t^2`` with
``sigma = max(sigma_n, 0.001)`` on the [0, 1] scale and ``sigma_bar_t`` on the [-1, 1] scale, for the objective
``||y - H x||^2 + rho_t ||x - x0_pred||^2`` (deepinv's ``gamma = 1 / (2 rho_t)`` differs by a factor 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from diffpir.schedule import NoiseSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


class DataOperator(Protocol):
    """What the sampler needs of a degradation (see :mod:`diffpir.operators`)."""

    def prox(self, z: Tensor, y: Tensor, rho: float | Tensor) -> Tensor: ...

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]: ...

    def x_shape(self, y_shape: torch.Size) -> torch.Size: ...

    def check(self, y: Tensor) -> None: ...

    def initial_estimate(self, y: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class StepState:
    """What the sampler hands its callback at each step (all on the [-1, 1] scale, ``[N, C, H, W]``).

    ``x_t`` is the iterate entering the step, ``x0_pred`` the prior's estimate of x0, ``x0_hat`` the
    data-corrected estimate (equal to ``x0_pred`` on the last step, which has no data step).
    """

    index: int
    t: int
    t_next: int | None
    rho: float
    x_t: Tensor
    x0_pred: Tensor
    x0_hat: Tensor


def randn(shape: torch.Size | Sequence[int], generator: GeneratorArg, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` from one generator, or one generator per image (``len == N``).

    Per-image generators make every image's noise independent of the batch it is in.
    """
    shape = torch.Size(shape)
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images: pass one per image")
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=like.dtype) for g in generator]
    ).to(like.device)


INITS = ("auto", "noise", "measurement", "classical")


class DiffPIR:
    """DiffPIR sampling (Algorithm 1 of Zhu et al. 2023).

    Args:
        schedule: the diffusion schedule the eps-model was trained with.
        steps: number of sampling steps (NFEs; ``uniform`` adds the final step at t = 0 like the official code).
        lambda_: weight of the data term, ``rho_t = lambda_ * max(sigma_n, 0.001)^2 / sigma_bar_t^2``.
        zeta: share of fresh noise when re-noising (0: deterministic/DDIM-like, 1: all fresh noise).
        skip: ``"quad"`` (finer steps near t = 0, the official default) or ``"uniform"``.
        t_start: first timestep; below ``T - 1`` the start is ``y``'s initial estimate diffused to ``t_start``.
        eta: DDIM stochasticity of the deterministic part (official ``eta``; 0 by default).
        guidance_scale: ``x0_hat <- x0_pred + s (x0_hat - x0_pred)`` (official ``guidance_scale``; 1 = plain).
        clip_denoised: clip ``x0_pred`` to [-1, 1] as the official code does.
        init: ``"noise"`` starts from pure noise at ``t_start``; ``"measurement"`` diffuses
            ``op.initial_estimate(y)`` to ``t_start`` as the official code does: as ``x`` at ``t_y``, the timestep
            whose ``sigma_bar`` is nearest ``2 sigma_n`` (the noise ``y`` already has), adding only the missing
            noise; ``"classical"`` diffuses the classical baseline's restoration
            (:class:`~diffpir.baselines.Classical`: Wiener deconvolution, harmonic fill, bicubic upsampling or SURE
            smoothing, by operator), a better start than ``y`` itself that suits a lower ``t_start``. ``"auto"``
            (default) uses ``"measurement"`` when ``t_start < T - 1`` and ``"noise"`` otherwise.
        final_data_step: also take the data step on the last step and return its ``x0_hat``, as Algorithm 1 of the
            paper writes it (the official code returns the last ``x0_pred``). For noiseless inpainting it keeps the
            known pixels to within ``rho / (1 + rho)`` (about 1%) of their gap to the prediction.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 100,
        lambda_: float = 7.0,
        zeta: float = 0.3,
        skip: Literal["quad", "uniform"] = "quad",
        t_start: int | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        clip_denoised: bool = True,
        init: Literal["auto", "noise", "measurement", "classical"] = "auto",
        final_data_step: bool = False,
    ):
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        if lambda_ <= 0 or not math.isfinite(lambda_):
            raise ValueError(f"lambda_ must be a positive number, got {lambda_}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        self.schedule = schedule
        self.steps = steps
        self.lambda_ = float(lambda_)
        self.zeta = float(zeta)
        self.skip = skip
        self.t_start = schedule.T - 1 if t_start is None else int(t_start)
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.clip_denoised = clip_denoised
        self.init = init
        self.final_data_step = bool(final_data_step)
        # Validates steps / skip / t_start once, at construction.
        self.timesteps = schedule.timesteps(steps, skip, self.t_start)

    # The hyper-parameters, in signature order: what config() returns and what wrappers and configs pass on.
    PARAMS = (
        "steps",
        "lambda_",
        "zeta",
        "skip",
        "t_start",
        "eta",
        "guidance_scale",
        "clip_denoised",
        "init",
        "final_data_step",
    )

    def config(self) -> dict[str, Any]:
        """The hyper-parameters (:attr:`PARAMS`) as given to the constructor (``t_start`` resolved)."""
        return {k: getattr(self, k) for k in self.PARAMS}

    def initial_estimate(self, y: Tensor, op: DataOperator, sigma_n: float) -> Tensor:
        """The image-shaped start in [0, 1] that ``init`` diffuses to ``t_start``: ``op.initial_estimate(y)``, or
        with ``init="classical"`` the classical baseline's restoration."""
        if self.init == "classical":
            from diffpir.baselines.classical import Classical  # noqa: PLC0415 (baselines build on the sampler)

            return Classical()(y, op, None, sigma_n).clamp(0, 1).to(y.dtype)
        return op.initial_estimate(y)

    def __repr__(self) -> str:
        return (
            f"DiffPIR(steps={self.steps}, lambda_={self.lambda_}, zeta={self.zeta}, skip={self.skip!r}, "
            f"t_start={self.t_start}, eta={self.eta}, guidance_scale={self.guidance_scale}, init={self.init!r}, "
            f"final_data_step={self.final_data_step})"
        )

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return len(self.timesteps)

    def rhos(self, sigma_n: float) -> list[float]:
        """The data-step penalty ``rho_t`` of each step (the last one is used only with ``final_data_step``)."""
        sigma = max(float(sigma_n), 0.001)
        sb = self.schedule.host("sigma_bar")
        return [self.lambda_ * sigma**2 / float(sb[t]) ** 2 for t in self.timesteps]

    @torch.no_grad()
    def __call__(
        self,
        y: Tensor,
        op: DataOperator,
        eps_model: EpsModel,
        sigma_n: float = 0.05,
        generator: GeneratorArg = None,
        callback: Callable[[StepState], None] | None = None,
        x_init: Tensor | None = None,
    ) -> Tensor:
        """Restore ``x`` from ``y = H(x) + n``.

        Args:
            y: measurement ``[N, C, h, w]`` in [0, 1] (as ``op`` produces it).
            op: the degradation, with ``prox_fn``, ``x_shape``, ``check`` and ``initial_estimate``.
            eps_model: ``eps_model(x_t, t)``, x_t ``[N, C, H, W]`` in [-1, 1], t int64 ``[N]`` -> eps.
            sigma_n: measurement noise std on the [0, 1] scale.
            generator: a ``torch.Generator`` for the whole batch, or a list with one per image (then each image
                restores exactly as it would alone).
            callback: called after each step with a :class:`StepState`.
            x_init: optional start ``x`` in [0, 1] (image-shaped) replacing ``op.initial_estimate(y)``.
        Returns:
            the restored images ``[N, C, H, W]`` in [0, 1] (not clamped beyond the prior's own clipping).
        """
        if not torch.is_tensor(y) or y.ndim != 4:
            raise ValueError(f"y must be a tensor of shape [N, C, H, W], got {getattr(y, 'shape', type(y))}")
        if not torch.is_floating_point(y):
            raise ValueError(f"y must be a floating-point tensor in [0, 1], got dtype {y.dtype}")
        if not math.isfinite(sigma_n) or sigma_n < 0:
            raise ValueError(f"sigma_n must be a finite number >= 0, got {sigma_n}")
        op.check(y)  # shapes, channels, batch, non-finite values
        sched = self.schedule
        sa, s1a = sched.host("sqrt_alphas_cumprod"), sched.host("sqrt_one_minus_alphas_cumprod")
        betas = sched.host("betas")
        ts, rhos = self.timesteps, self.rhos(sigma_n)
        n = y.shape[0]
        x_shape = op.x_shape(y.shape)

        # 3. Start: pure noise at t_start, or the measurement's estimate diffused to t_start.
        t0 = ts[0]
        noise = randn(x_shape, generator, y)
        init = self.init if self.init != "auto" else ("measurement" if t0 < sched.T - 1 else "noise")
        if init != "noise" or x_init is not None:
            est = x_init if x_init is not None else self.initial_estimate(y, op, sigma_n)
            if est.shape != x_shape:
                raise ValueError(f"x_init has shape {tuple(est.shape)}, expected {tuple(x_shape)}")
            if init == "measurement" and x_init is None:
                # The official start: y already carries noise of std 2 sigma_n (network scale), so it stands for
                # x at t_y (sigma_bar[t_y] ~ 2 sigma_n) and is diffused from t_y to t_start with the missing noise.
                t_y = int(sched.timestep_for_sigma(2 * float(sigma_n)))
                ratio = float(sa[t0]) / float(sa[t_y])
                std = math.sqrt(max(float(s1a[t0]) ** 2 - ratio**2 * float(s1a[t_y]) ** 2, 0.0))
                x = ratio * (2 * est - 1) + std * noise
            else:
                x = float(sa[t0]) * (2 * est - 1) + float(s1a[t0]) * noise
        else:
            x = noise

        prox = op.prox_fn(y)  # y-only work (e.g. conj(K) F(y)) done once
        for i, t in enumerate(ts):
            last = i == len(ts) - 1
            a_t, s_t = float(sa[t]), float(s1a[t])
            t_batch = torch.full((n,), t, device=y.device, dtype=torch.long)
            # 4a. Prior step (eq. 12a): x0 from the predicted noise.
            eps = eps_model(x, t_batch).to(x.dtype)
            x0_pred = torch.sub(x, eps, alpha=s_t).div_(a_t)
            if self.clip_denoised:
                x0_pred.clamp_(-1.0, 1.0)
            # 4b. Data step (eq. 12b) on the [0, 1] scale; skipped on the last step (official code) unless
            # final_data_step (Algorithm 1 of the paper).
            if last and not self.final_data_step:
                x0_hat = x0_pred
            else:
                x0_hat = prox(x0_pred.add(1.0).mul_(0.5), rhos[i]).mul(2.0).sub_(1.0)
                if self.guidance_scale != 1.0:
                    x0_hat = torch.lerp(x0_pred, x0_hat, self.guidance_scale)
            if callback is not None:
                callback(StepState(i, t, None if last else ts[i + 1], rhos[i], x, x0_pred, x0_hat))
            if last:
                x = x0_hat
                break
            # 4c. eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t), the noise x0_hat implies; 4d. re-noise:
            # x' = sqrt(ab') x0_hat + sqrt(1 - zeta) (d eps_hat + eta_sigma z1) + sqrt(zeta) sqrt(1 - ab') z2,
            # with d = sqrt(1 - ab' - eta_sigma^2), folded into x' = c x_t + (sqrt(ab') - c sqrt(ab_t)) x0_hat + ...
            t_next = ts[i + 1]
            s_next = float(s1a[t_next])
            eta_sigma = self.eta * s_next / s_t * math.sqrt(float(betas[t]))
            c = math.sqrt(1 - self.zeta) * math.sqrt(max(s_next**2 - eta_sigma**2, 0.0)) / s_t
            x = torch.mul(x, c).add_(x0_hat, alpha=float(sa[t_next]) - c * a_t)
            if eta_sigma > 0:
                x.add_(randn(x_shape, generator, y), alpha=math.sqrt(1 - self.zeta) * eta_sigma)
            if self.zeta > 0:
                x.add_(randn(x_shape, generator, y), alpha=math.sqrt(self.zeta) * s_next)
        return (x + 1) / 2


__all__ = ["INITS", "DiffPIR", "StepState", "EpsModel", "DataOperator", "randn"]
