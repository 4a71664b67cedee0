"""The DiffPIR sampler (Zhu et al. 2023, Algorithm 1), following the official code's conventions.

Each step alternates a diffusion denoising step (the prior) with a closed-form data-proximal step (the operator's
``prox``), then re-noises to the next timestep. The sampler never branches on the task: everything
task-specific lives in the operator.

Ranges: ``y`` and the result are in [0, 1]; ``sigma_n`` is the std of the measurement noise on the [0, 1] scale;
the eps-model sees ``x_t`` on the network's [-1, 1] scale. The data step runs on the [0, 1] scale.

The penalty of the data step is the official code's ``rho_t = lambda * sigma^2 / sigma_bar_t^2`` with
``sigma = max(sigma_n, 0.001)`` on the [0, 1] scale and ``sigma_bar_t`` on the [-1, 1] scale, for the objective
``||y - H x||^2 + rho_t ||x - x0_pred||^2`` (deepinv's ``gamma = 1 / (2 rho_t)`` differs by a factor 2).

The official scripts (``main_ddpir_deblur.py``, ``main_ddpir_sisr.py``, ``main_ddpir_inpainting.py`` of
yuanzhi-zhu/DiffPIR) are reproduced by ``init="official"`` and ``output="iterate"`` (see :class:`DiffPIR`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args, get_type_hints

import torch
from torch import Tensor

from diffpir.schedule import NoiseSchedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
# A start computed from the measurement: ``(y, op, sigma_n) -> x`` in [0, 1], image-shaped (see DiffPIR.__call__).
StartFn = Callable[[Tensor, "DataOperator", float], Tensor]


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
    data-corrected estimate. On the last step ``x0_hat`` is what the sampler returns: ``x0_pred`` (no data step),
    its data step (``output="x0_hat"``) or the iterate ``x_t`` itself (``output="iterate"``).
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


# The sampler's choices, spelled once (the methods that wrap the sampler take its signature, see DiffPIRMethod).
Skip = Literal["quad", "uniform"]
Init = Literal["auto", "noise", "measurement", "classical", "official"]
Output = Literal["x0_pred", "x0_hat", "iterate"]
INITS: tuple[str, ...] = get_args(Init)
OUTPUTS: tuple[str, ...] = get_args(Output)
# Below this many steps a start from pure noise (t_start = T - 1) is far from converged (docs/restoration.md).
FEW_STEPS = 20


def check_inputs(y: Tensor, op: DataOperator, sigma_n: float) -> None:
    """The checks every restoration runs first (this sampler and every :class:`~diffpir.methods.Method`):
    ``op.check(y)`` (a floating ``[N, C, h, w]`` tensor that fits the operator, finite values:
    :func:`diffpir.operators.base.check_measurement` and the operator's own checks) and ``sigma_n >= 0``, finite."""
    op.check(y)
    if not (math.isfinite(sigma_n) and sigma_n >= 0):
        raise ValueError(f"sigma_n must be a finite number >= 0, got {sigma_n}")


def official_start(op: DataOperator, y: Tensor) -> tuple[Tensor, bool]:
    """The official scripts' image-shaped start ``[N, C, H, W]`` (in [0, 1] units, not clamped) and whether it
    carries ``y``'s noise (then it is diffused from ``t_y``, else treated as clean): ``op.official_start(y)``, or
    for an operator without one its :meth:`initial_estimate` as a noisy start."""
    fn = getattr(op, "official_start", None)
    if fn is not None:
        return fn(y)
    return op.initial_estimate(y), True


def select_image(op: DataOperator, index: int) -> DataOperator:
    """The operator of image ``index`` alone (``op.select(index)``; an operator without ``select`` is taken to
    share its parameters across the batch)."""
    fn = getattr(op, "select", None)
    return fn(index) if fn is not None else op


class DiffPIR:
    """DiffPIR sampling (Algorithm 1 of Zhu et al. 2023).

    Args:
        schedule: the diffusion schedule the eps-model was trained with.
        steps: number of sampling steps (NFEs; ``uniform`` adds the final step at t = 0 like the official code).
        lambda_: weight of the data term, ``rho_t = lambda_ * max(sigma_n, 0.001)^2 / sigma_bar_t^2``.
        zeta: share of fresh noise when re-noising (0: deterministic/DDIM-like, 1: all fresh noise).
        skip: ``"quad"`` (finer steps near t = 0, the official default) or ``"uniform"``.
        t_start: first timestep (None: ``T - 1``); below it the start that ``init`` names is diffused to ``t_start``.
        eta: DDIM stochasticity of the deterministic part (official ``eta``; 0 by default).
        guidance_scale: ``x0_hat <- x0_pred + s (x0_hat - x0_pred)`` (official ``guidance_scale``; 1 = plain).
        clip_denoised: clip ``x0_pred`` to [-1, 1] as the official code does.
        init: ``"noise"`` starts from pure noise at ``t_start``; ``"measurement"`` diffuses
            ``op.initial_estimate(y)`` (clamped to [0, 1]: ``y``, the bicubic upsampling, the mean-filled image) to
            ``t_start`` as ``x`` at ``t_y``, the timestep whose ``sigma_bar`` is nearest ``2 sigma_n`` (the noise
            ``y`` already has), adding only the missing noise; ``"classical"`` diffuses a classical restoration
            that the caller gives as ``x_init`` (the sampler knows no task; :class:`~diffpir.methods.DiffPIRMethod`
            passes the classical baseline's: Wiener deconvolution, harmonic fill, bicubic upsampling or SURE
            smoothing, by operator), a better start than ``y`` itself that suits a lower ``t_start`` (the fast
            recipe, ``configs/restore/*_fast.yaml``); ``"official"`` starts as the official
            scripts do, at any ``t_start`` including ``T - 1``: ``y`` unclamped from ``t_y`` (deblurring,
            denoising), ``y`` with the missing pixels at 0 from ``t_y`` (inpainting), the unclamped bicubic
            upsampling of ``y`` as a clean image (super-resolution; see ``op.official_start``). ``"auto"``
            (default) uses ``"measurement"`` when ``t_start < T - 1`` and ``"noise"`` otherwise.
        output: what the last step returns. The last step always evaluates the prior and never re-noises.
            ``"x0_pred"`` (default): the prior's last prediction, without a data step. ``"x0_hat"``: the last
            prediction after a data step too, as Algorithm 1 of the paper writes it (for noiseless inpainting it
            keeps the known pixels to within ``rho / (1 + rho)``, about 1%, of their gap to the prediction).
            ``"iterate"``: the last iterate ``x_t`` itself (``t`` the last timestep, 0 by default), as the official
            scripts save it (their ``x = x0`` line is commented out); it keeps the noise of ``sigma_bar_t``
            (0.005 on the [0, 1] scale at ``t = 0``).
        batch_invariant: run every image on its own, in lockstep (the prior, the data step and the noise of
            image ``i`` see exactly the tensors they would see if it were restored alone), so that with one
            generator per image the result is bitwise the one of the image alone, whatever batch it is in. Off
            (default), the batch runs together and an image's result equals its result alone to round-off only:
            the prior's convolutions may round differently for different batch sizes (oneDNN on AVX2, cuDNN);
            docs/reliability.md gives the measured size of that difference.
    """

    # The hyper-parameters by name, in signature order (all but ``schedule``; set below the class, from __init__).
    PARAMETERS: ClassVar[dict[str, inspect.Parameter]]
    PARAMS: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 100,
        lambda_: float = 7.0,
        zeta: float = 0.3,
        skip: Skip = "quad",
        t_start: int | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        clip_denoised: bool = True,
        init: Init = "auto",
        output: Output = "x0_pred",
        batch_invariant: bool = False,
    ):
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        if lambda_ <= 0 or not math.isfinite(lambda_):
            raise ValueError(f"lambda_ must be a positive number, got {lambda_}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
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
        self.output = output
        self.batch_invariant = bool(batch_invariant)
        # Validates steps / skip / t_start once, at construction.
        self.timesteps = schedule.timesteps(steps, skip, self.t_start)
        self._check_step_count()

    def _check_step_count(self) -> None:
        """Refuse one step from pure noise; warn, with the fix, when few steps start from pure noise."""
        if self.t_start < self.schedule.T - 1:
            return
        fast = (
            "configs/restore/<task>_fast.yaml, or a late start from the classical restoration: "
            "init='classical', t_start=400, zeta=1.0 (--model.method.init classical --model.method.t_start 400 "
            "--model.method.zeta 1.0)"
        )
        if len(self.timesteps) < 2:
            raise ValueError(
                f"steps={self.steps} from t_start={self.t_start} evaluates the prior once, on pure noise, and returns "
                f"that single guess: use steps >= {FEW_STEPS} (the paper: 100), or for a few steps {fast}"
            )
        if self.steps < FEW_STEPS:
            warnings.warn(
                f"DiffPIR with steps={self.steps} from pure noise (t_start={self.t_start}) is far from converged and "
                f"can come out worse than the measurement: use steps >= {FEW_STEPS} (the paper: 100), or for a few "
                f"steps {fast}",
                UserWarning,
                stacklevel=3,
            )

    def config(self) -> dict[str, Any]:
        """The hyper-parameters (:attr:`PARAMS`) as given to the constructor (``t_start`` resolved)."""
        return {k: getattr(self, k) for k in self.PARAMS}

    @classmethod
    def settings(cls, given: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every hyper-parameter (:attr:`PARAMS`): ``given``, else ``defaults``, else the constructor's default.
        Raises ``TypeError`` naming a key that is not one (as a call with an unknown keyword would)."""
        unknown = sorted(set(given) - set(cls.PARAMS))
        if unknown:
            raise TypeError(f"unexpected sampler setting(s) {unknown}; the settings are {list(cls.PARAMS)}")
        return {name: given.get(name, (defaults or {}).get(name, cls.PARAMETERS[name].default)) for name in cls.PARAMS}

    def __repr__(self) -> str:
        return (
            f"DiffPIR(steps={self.steps}, lambda_={self.lambda_}, zeta={self.zeta}, skip={self.skip!r}, "
            f"t_start={self.t_start}, eta={self.eta}, guidance_scale={self.guidance_scale}, init={self.init!r}, "
            f"output={self.output!r}, batch_invariant={self.batch_invariant})"
        )

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return len(self.timesteps)

    def rhos(self, sigma_n: float) -> list[float]:
        """The data-step penalty ``rho_t`` of each step (the last one is used only with ``output="x0_hat"``)."""
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
        x_init: Tensor | StartFn | None = None,
    ) -> Tensor:
        """Restore ``x`` from ``y = H(x) + n``.

        Args:
            y: measurement ``[N, C, h, w]`` in [0, 1] (as ``op`` produces it).
            op: the degradation, with ``prox_fn``, ``x_shape``, ``check`` and ``initial_estimate`` (and, for
                ``init="official"`` and ``batch_invariant``, ``official_start`` and ``select``).
            eps_model: ``eps_model(x_t, t)``, x_t ``[N, C, H, W]`` in [-1, 1], t int64 ``[N]`` -> eps.
            sigma_n: measurement noise std on the [0, 1] scale.
            generator: a ``torch.Generator`` for the whole batch, or a list with one per image (then each image's
                noise does not depend on the batch: its result equals its result alone bitwise with
                ``batch_invariant``, to round-off without).
            callback: called after each step with a :class:`StepState` of the whole batch.
            x_init: optional start ``x`` in [0, 1] (image-shaped) replacing the ``init`` estimate, taken as clean;
                or a function ``x_init(y, op, sigma_n)`` giving it (called per image with ``batch_invariant``).
                ``init="classical"`` needs one (the caller's classical restoration: :class:`~diffpir.methods.
                DiffPIRMethod` passes it; the sampler itself knows no task).
        Returns:
            the restored images ``[N, C, H, W]`` in [0, 1] (not clamped beyond the prior's own clipping).
        """
        check_inputs(y, op, sigma_n)
        n = y.shape[0]
        if x_init is None and self.init == "classical":
            raise ValueError(
                "init='classical' starts from a classical restoration, which the sampler does not compute: pass it "
                "as x_init (a tensor or a function of (y, op, sigma_n)), or use diffpir.methods.DiffPIRMethod"
            )
        if torch.is_tensor(x_init) and x_init.shape != op.x_shape(y.shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(op.x_shape(y.shape))}")
        if self.batch_invariant and n > 1:
            # Each image alone: its own (contiguous, freshly allocated) tensors, operator and generator.
            per_gen = isinstance(generator, Sequence) and not isinstance(generator, torch.Generator)
            if per_gen and len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for a batch of {n} images: pass one per image")
            parts = [
                (
                    y[i : i + 1].clone(),
                    select_image(op, i),
                    [generator[i]] if per_gen else generator,
                    x_init[i : i + 1].clone() if torch.is_tensor(x_init) else x_init,
                )
                for i in range(n)
            ]
        else:
            parts = [(y, op, generator, x_init)]

        sched = self.schedule
        sa, s1a = sched.host("sqrt_alphas_cumprod"), sched.host("sqrt_one_minus_alphas_cumprod")
        betas = sched.host("betas")
        ts, rhos = self.timesteps, self.rhos(sigma_n)
        xs = [self._start(yp, opp, sigma_n, gp, xp) for yp, opp, gp, xp in parts]
        proxes = [opp.prox_fn(yp) for yp, opp, _, _ in parts]  # y-only work (e.g. conj(K) F(y)) done once
        final_prox = self.output == "x0_hat"
        for i, t in enumerate(ts):
            last = i == len(ts) - 1
            a_t, s_t = float(sa[t]), float(s1a[t])
            states = []
            for j, ((yp, _, gp, _), prox) in enumerate(zip(parts, proxes, strict=True)):
                x = xs[j]
                t_batch = torch.full((x.shape[0],), t, device=y.device, dtype=torch.long)
                # 4a. Prior step (eq. 12a): x0 from the predicted noise (clipped as the official code does).
                eps = eps_model(x, t_batch).to(x.dtype)
                x0_pred = torch.sub(x, eps, alpha=s_t).div_(a_t)
                if self.clip_denoised:
                    x0_pred.clamp_(-1.0, 1.0)
                # 4b. Data step (eq. 12b) on the [0, 1] scale; skipped on the last step (official code) unless
                # output="x0_hat" (Algorithm 1 of the paper).
                if last and not final_prox:
                    # no data step; the step's estimate is what the sampler returns
                    x0_hat = x if self.output == "iterate" else x0_pred
                else:
                    x0_hat = prox(x0_pred.add(1.0).mul_(0.5), rhos[i]).mul(2.0).sub_(1.0)
                    if self.guidance_scale != 1.0:
                        x0_hat = torch.lerp(x0_pred, x0_hat, self.guidance_scale)
                states.append((x, x0_pred, x0_hat))
                if last:
                    if self.output != "iterate":  # "iterate": x stays the last iterate (the official scripts)
                        xs[j] = x0_hat
                    continue
                xs[j] = self._renoise(x, x0_hat, a_t, s_t, t, ts[i + 1], gp, yp, sa, s1a, betas)
            if callback is not None:
                x_t, x0_pred, x0_hat = states[0] if len(states) == 1 else map(torch.cat, zip(*states, strict=True))
                callback(StepState(i, t, None if last else ts[i + 1], rhos[i], x_t, x0_pred, x0_hat))
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        return (x + 1) / 2

    def _start(
        self, y: Tensor, op: DataOperator, sigma_n: float, generator: GeneratorArg, x_init: Tensor | StartFn | None
    ) -> Tensor:
        """3. The start at ``t_start`` on the [-1, 1] scale: pure noise, or an image-shaped estimate diffused."""
        sched = self.schedule
        sa, s1a = sched.host("sqrt_alphas_cumprod"), sched.host("sqrt_one_minus_alphas_cumprod")
        t0 = self.timesteps[0]
        x_shape = op.x_shape(y.shape)
        noise = randn(x_shape, generator, y)
        init = self.init if self.init != "auto" else ("measurement" if t0 < sched.T - 1 else "noise")
        if init == "noise" and x_init is None:
            return noise
        if x_init is not None:  # a given start (init="classical": the caller's restoration) is taken as clean
            est, noisy = (x_init(y, op, sigma_n) if callable(x_init) else x_init), False
        elif init == "official":
            est, noisy = official_start(op, y)
        else:  # measurement
            est, noisy = op.initial_estimate(y), True
        if est.shape != x_shape:
            raise ValueError(f"the start has shape {tuple(est.shape)}, expected {tuple(x_shape)}")
        if noisy:
            # y already carries noise of std 2 sigma_n (network scale), so it stands for x at t_y
            # (sigma_bar[t_y] ~ 2 sigma_n) and is diffused from t_y to t_start with the missing noise only.
            t_y = int(sched.timestep_for_sigma(2 * float(sigma_n)))
            ratio = float(sa[t0]) / float(sa[t_y])
            std = math.sqrt(max(float(s1a[t0]) ** 2 - ratio**2 * float(s1a[t_y]) ** 2, 0.0))
            return ratio * (2 * est - 1) + std * noise
        return float(sa[t0]) * (2 * est - 1) + float(s1a[t0]) * noise

    def _renoise(self, x, x0_hat, a_t, s_t, t, t_next, generator, like, sa, s1a, betas) -> Tensor:
        """4c-d. ``eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)``, the noise ``x0_hat`` implies, then
        ``x' = sqrt(ab') x0_hat + sqrt(1 - zeta) (d eps_hat + eta_sigma z1) + sqrt(zeta) sqrt(1 - ab') z2`` with
        ``d = sqrt(1 - ab' - eta_sigma^2)``, folded into ``x' = c x_t + (sqrt(ab') - c sqrt(ab_t)) x0_hat + ...``."""
        s_next = float(s1a[t_next])
        eta_sigma = self.eta * s_next / s_t * math.sqrt(float(betas[t]))
        c = math.sqrt(1 - self.zeta) * math.sqrt(max(s_next**2 - eta_sigma**2, 0.0)) / s_t
        x = torch.mul(x, c).add_(x0_hat, alpha=float(sa[t_next]) - c * a_t)
        if eta_sigma > 0:
            x.add_(randn(x.shape, generator, like), alpha=math.sqrt(1 - self.zeta) * eta_sigma)
        if self.zeta > 0:
            x.add_(randn(x.shape, generator, like), alpha=math.sqrt(self.zeta) * s_next)
        return x


# The hyper-parameters, in signature order (all but ``schedule``): what config() returns and wrappers pass on.
# Annotations resolved to types, so that signatures derived from these (DiffPIRMethod's) are read alike anywhere.
_hints = get_type_hints(DiffPIR.__init__)
DiffPIR.PARAMETERS = {
    name: p.replace(annotation=_hints[name]) for name, p in list(inspect.signature(DiffPIR).parameters.items())[1:]
}
DiffPIR.PARAMS = tuple(DiffPIR.PARAMETERS)

__all__ = [
    "FEW_STEPS",
    "INITS",
    "OUTPUTS",
    "Init",
    "Output",
    "Skip",
    "StartFn",
    "check_inputs",
    "DiffPIR",
    "StepState",
    "EpsModel",
    "DataOperator",
    "official_start",
    "randn",
    "select_image",
]
