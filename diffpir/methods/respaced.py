"""What DPS and DDNM share: both walk the DDPM chain respaced to ``steps`` timesteps
(:meth:`~diffpir.schedule.NoiseSchedule.respaced_steps`) and start each step from Tweedie's ``x0`` estimate."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffpir.schedule import RespacedStep


def predict_x0(prior: Any, x: Tensor, step: RespacedStep, clip: bool) -> tuple[Tensor, Tensor]:
    """``(eps, x0)``: the prior's noise prediction at ``x`` (``[N, C, H, W]``, the [-1, 1] scale) and timestep
    ``step.t``, and ``x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)``, clamped to [-1, 1] when ``clip``. Gradients flow
    through the prior when enabled (DPS)."""
    t_batch = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
    eps = prior(x, t_batch).to(x.dtype)
    x0 = (x - math.sqrt(1 - step.ab) * eps) / math.sqrt(step.ab)
    return eps, x0.clamp(-1.0, 1.0) if clip else x0


__all__ = ["predict_x0"]
