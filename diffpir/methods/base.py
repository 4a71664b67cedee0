"""The common interface of every restoration method: ``method(y, op, prior, sigma_n, generator) -> x``.

A :class:`Method` restores images from measurements through the same operator (:mod:`diffpir.operators`) and
prior (:class:`~diffpir.prior.Prior`, or any eps-model with a ``schedule``) interfaces as the DiffPIR sampler,
so that benchmarks compare methods on equal terms. Methods may branch on the operator's type only where the
method itself is defined per task (the classical baselines); the diffusion methods never do.

Ranges: ``y`` and the result in [0, 1] (the result is not clamped); ``sigma_n`` on the [0, 1] scale; the prior
sees the [-1, 1] scale.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from diffpir.prior import eps_denoise
from diffpir.sampler import DataOperator, EpsModel, GeneratorArg, StepState, check_inputs

__all__ = ["Denoiser", "Method", "check_inputs", "eps_denoiser", "prior_denoiser", "schedule_of"]

# D(x, sigma): x [N, C, H, W] on the [-1, 1] scale, sigma a float on that scale -> estimate of the clean x.
Denoiser = Callable[[Tensor, float], Tensor]


class Method(ABC):
    """A restoration method: ``method(y, op, prior, sigma_n=0.05, generator=None) -> x``.

    Attributes:
        name: the registry name (:data:`diffpir.methods.METHODS`).
        uses_prior: whether ``prior`` is used (the classical baselines and the FFDNet PnP ignore it).
    """

    name: ClassVar[str] = ""
    uses_prior: ClassVar[bool] = True

    @property
    @abstractmethod
    def nfe(self) -> int:
        """Network evaluations per image (0 for the classical baselines). DPS adds one backward pass each."""

    def __call__(
        self,
        y: Tensor,
        op: DataOperator,
        prior: EpsModel | None = None,
        sigma_n: float = 0.05,
        generator: GeneratorArg = None,
        callback: Callable[[StepState], None] | None = None,
    ) -> Tensor:
        """Restore ``x`` from ``y = H(x) + n``: checks the inputs (:func:`check_inputs`), then :meth:`restore`.

        Args:
            y: measurements ``[N, C, h, w]`` in [0, 1] (noisy, unclipped).
            op: the degradation (:class:`~diffpir.operators.Operator`).
            prior: an eps-model ``prior(x_t, t)`` with a ``schedule`` (a :class:`~diffpir.prior.Prior`,
                :class:`~diffpir.analytic.GaussianPrior`), or None for methods that need none.
            sigma_n: measurement noise std on the [0, 1] scale.
            generator: one ``torch.Generator``, or one per image (each image then restores as it would alone).
            callback: called with a :class:`~diffpir.sampler.StepState` after each iteration (iterative
                methods; the classical baselines never call it).
        Returns:
            ``[N, C, H, W]`` restored images in [0, 1] space (not clamped).
        """
        check_inputs(y, op, sigma_n)
        return self.restore(y, op, prior, float(sigma_n), generator, callback)

    @abstractmethod
    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        """The method proper, on checked inputs (arguments as :meth:`__call__`; ``callback`` may be None)."""

    def config(self) -> dict[str, Any]:
        """The method's hyper-parameters (primitive values), for logs and result tables."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def schedule_of(prior: Any, method: str):
    """The prior's :class:`~diffpir.schedule.NoiseSchedule` (``prior.schedule``), or a ``ValueError``."""
    sched = getattr(prior, "schedule", None)
    if sched is None:
        raise ValueError(
            f"{method} needs a diffusion prior with a noise schedule (a diffpir Prior or GaussianPrior), "
            f"got {type(prior).__name__}"
        )
    return sched


def eps_denoiser(prior: EpsModel, schedule) -> Denoiser:
    """The Gaussian denoiser ``D(x, sigma)`` of any eps-model with ``schedule``: :func:`diffpir.prior.eps_denoise`
    (what :meth:`diffpir.prior.Prior.denoise` runs), with ``sigma = 0`` returning ``x`` unevaluated."""
    return lambda x, sigma: x if sigma <= 0 else eps_denoise(prior, schedule, x, float(sigma))


def prior_denoiser(prior: Any) -> Denoiser:
    """``prior.denoise`` when the prior has one (a :class:`~diffpir.prior.Prior`), else :func:`eps_denoiser`."""
    if callable(getattr(prior, "denoise", None)):
        return lambda x, sigma: prior.denoise(x, float(sigma))
    return eps_denoiser(prior, schedule_of(prior, "a diffusion denoiser"))
