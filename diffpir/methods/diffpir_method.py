"""DiffPIR itself behind the :class:`~diffpir.methods.base.Method` interface.

:class:`DiffPIRMethod` takes the sampler's settings (:class:`~diffpir.sampler.DiffPIR`, all but ``schedule``) by
keyword; its signature (what ``inspect.signature``, the docs and the CLI's ``model.method.init_args`` show) is
derived from the sampler's, so the settings are written once, in :mod:`diffpir.sampler`. A subclass adds its own
parameters before ``**settings`` and may change some defaults through :attr:`DiffPIRMethod.SAMPLER_DEFAULTS`
(:class:`~diffpir.methods.blind.BlindDiffPIR`).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, get_type_hints

from torch import Tensor

from diffpir.methods.base import Method, schedule_of
from diffpir.methods.classical import Classical
from diffpir.sampler import DataOperator, DiffPIR, GeneratorArg, StartFn
from diffpir.schedule import NoiseSchedule

__all__ = ["DiffPIRMethod", "classical_start"]


def classical_start(y: Tensor, op: DataOperator, sigma_n: float) -> Tensor:
    """The start of ``init="classical"``: the classical baseline's restoration, clamped to [0, 1]."""
    return Classical()(y, op, None, sigma_n).clamp(0, 1).to(y.dtype)


def _derive_signature(cls: type) -> None:
    """Give ``cls.__init__`` the signature it really accepts: its own parameters, then the sampler's settings
    (keyword-only, defaults from ``cls.SAMPLER_DEFAULTS``) in place of ``**settings``, described by the sampler's
    docstring."""
    own = inspect.signature(cls.__init__)
    hints = get_type_hints(cls.__init__)
    kept = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in own.parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    sampler = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=cls.SAMPLER_DEFAULTS.get(name, p.default))
        for name, p in DiffPIR.PARAMETERS.items()
    ]
    cls.__init__.__signature__ = own.replace(parameters=[*kept, *sampler])
    # and the sampler's descriptions of them (what help texts show; the class docstring describes the rest)
    cls.__init__.__doc__ = DiffPIR.__doc__


class DiffPIRMethod(Method):
    """DiffPIR (Zhu et al. 2023) as a :class:`Method`: :class:`~diffpir.sampler.DiffPIR` built on the prior's
    schedule (rebuilt when a prior with another schedule comes in).

    Args:
        samples: restore this many times and return the mean (1: one sample, the paper's method). The mean of
            independent samples estimates the posterior mean, the restoration of least expected squared error:
            higher PSNR, less fine detail (each sample's texture is a guess that the mean averages out). The
            samples are drawn one after another from the same generator(s), so with one generator per image a
            result still does not depend on the batch; the callback sees the first sample's trajectory. Costs
            ``samples`` times the NFEs.
        **settings: the settings of :class:`~diffpir.sampler.DiffPIR`, by keyword (``steps``, ``lambda_``,
            ``zeta``, ``skip``, ``t_start``, ``eta``, ``guidance_scale``, ``clip_denoised``, ``init``, ``output``,
            ``batch_invariant``; see its docstring).
    """

    name = "diffpir"
    # Defaults of the sampler settings that differ from the sampler's own (a subclass's choice).
    SAMPLER_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            _derive_signature(cls)

    def __init__(self, samples: int = 1, **settings: Any):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        self.samples = samples
        self.settings: dict[str, Any] = DiffPIR.settings(settings, self.SAMPLER_DEFAULTS)
        # Validated now, on the default schedule; rebuilt for a prior with another one (sampler_for).
        self.sampler = DiffPIR(NoiseSchedule.linear(), **self.settings)

    def sampler_for(self, schedule: NoiseSchedule) -> DiffPIR:
        """The sampler on ``schedule`` (the cached one when the tables agree)."""
        cur = self.sampler.schedule
        if cur is not schedule and (
            cur.T != schedule.T or (cur.host("alphas_cumprod") != schedule.host("alphas_cumprod")).any()
        ):
            settings = dict(self.settings)
            if settings["t_start"] is not None and settings["t_start"] >= schedule.T:
                settings["t_start"] = None
            self.sampler = DiffPIR(schedule, **settings)
        return self.sampler

    @property
    def nfe(self) -> int:
        return self.samples * self.sampler.nfe

    def config(self) -> dict[str, Any]:
        return {**self.settings, "samples": self.samples}

    def start(self) -> StartFn | None:
        """What the sampler starts from besides its own estimates: with ``init="classical"`` the classical
        baseline's restoration (:class:`~diffpir.methods.Classical`), computed per image from ``(y, op, sigma_n)``."""
        return classical_start if self.settings["init"] == "classical" else None

    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        sampler = self.sampler_for(schedule_of(prior, "DiffPIR"))
        return self.sample_mean(sampler, y, op, prior, sigma_n, generator, callback)

    def sample_mean(
        self,
        sampler: DiffPIR,
        y: Tensor,
        op: DataOperator,
        prior: Any,
        sigma_n: float,
        generator: GeneratorArg,
        callback: Any,
    ) -> Tensor:
        """``sampler``'s restoration, or the mean of :attr:`samples` of them (see the class docstring)."""
        x = sampler(y, op, prior, sigma_n=sigma_n, generator=generator, callback=callback, x_init=self.start())
        if self.samples == 1:
            return x
        total = x.double()
        for _ in range(1, self.samples):
            total += sampler(y, op, prior, sigma_n=sigma_n, generator=generator, x_init=self.start())
        return (total / self.samples).to(x.dtype)


_derive_signature(DiffPIRMethod)
