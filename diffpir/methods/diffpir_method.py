"""DiffPIR itself behind the :class:`~diffpir.methods.base.Method` interface (a thin wrapper of the sampler)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from diffpir.methods.base import Method, schedule_of
from diffpir.sampler import DataOperator, DiffPIR, GeneratorArg
from diffpir.schedule import NoiseSchedule

__all__ = ["DiffPIRMethod"]


class DiffPIRMethod(Method):
    """DiffPIR (Zhu et al. 2023) as a :class:`Method`: :class:`~diffpir.sampler.DiffPIR` built on the prior's
    schedule (rebuilt when a prior with another schedule comes in).

    Args: those of :class:`~diffpir.sampler.DiffPIR` (``steps``, ``lambda_``, ``zeta``, ``skip``, ``t_start``,
    ``eta``, ``guidance_scale``, ``clip_denoised``, ``init``, ``output``, ``batch_invariant``), or ``sampler=`` an
    existing sampler to wrap.
    """

    name = "diffpir"

    def __init__(
        self,
        steps: int = 100,
        lambda_: float = 7.0,
        zeta: float = 0.3,
        skip: Literal["quad", "uniform"] = "quad",
        t_start: int | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        clip_denoised: bool = True,
        init: Literal["auto", "noise", "measurement", "classical", "official"] = "auto",
        output: Literal["x0_pred", "x0_hat", "iterate"] = "x0_pred",
        batch_invariant: bool = False,
        sampler: DiffPIR | None = None,
    ):
        self.kwargs: dict[str, Any] = {
            "steps": steps,
            "lambda_": lambda_,
            "zeta": zeta,
            "skip": skip,
            "t_start": t_start,
            "eta": eta,
            "guidance_scale": guidance_scale,
            "clip_denoised": clip_denoised,
            "init": init,
            "output": output,
            "batch_invariant": batch_invariant,
        }
        if sampler is not None:
            self.kwargs = sampler.config()
        # Validate now, on the default schedule, unless a sampler was given.
        self.sampler = sampler if sampler is not None else DiffPIR(NoiseSchedule.linear(), **self.kwargs)

    def sampler_for(self, schedule: NoiseSchedule) -> DiffPIR:
        """The sampler on ``schedule`` (the cached one when the tables agree)."""
        cur = self.sampler.schedule
        if cur is not schedule and (
            cur.T != schedule.T or (cur.host("alphas_cumprod") != schedule.host("alphas_cumprod")).any()
        ):
            kwargs = dict(self.kwargs)
            if kwargs["t_start"] is not None and kwargs["t_start"] >= schedule.T:
                kwargs["t_start"] = None
            self.sampler = DiffPIR(schedule, **kwargs)
        return self.sampler

    @property
    def nfe(self) -> int:
        return self.sampler.nfe

    def config(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        sampler = self.sampler_for(schedule_of(prior, "DiffPIR"))
        return sampler(y, op, prior, sigma_n=sigma_n, generator=generator, callback=callback)
