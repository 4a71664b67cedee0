"""The DDPM noise schedule, built once in float64, and the sampling step sequences of DiffPIR.

Conventions (those of guided-diffusion and the official DiffPIR code):

- ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` with images in [-1, 1];
- ``sigma_bar_t = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)`` is the noise level of step ``t`` "on the image"
  (the std of ``x_t / sqrt(alpha_bar_t) - x0``), on the [-1, 1] scale.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

Skip = Literal["quad", "uniform"]


def respaced_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over ``[0, T - 1]`` (rounded; both ends included), decreasing: the
    respacing of guided-diffusion's ``space_timesteps`` that DPS and DDNM run on."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {steps}")
    if steps == 1:
        return [T - 1]
    return sorted({int(round(v)) for v in np.linspace(0, T - 1, steps)}, reverse=True)


class RespacedStep(NamedTuple):
    """Step ``index`` of a respaced chain: from timestep ``t`` to ``t_next`` (None on the last step), with
    ``alpha_bar`` at both as floats (``ab_next = 1`` after the last step, the clean image)."""

    index: int
    t: int
    t_next: int | None
    ab: float
    ab_next: float

    @property
    def last(self) -> bool:
        return self.t_next is None


class NoiseSchedule(nn.Module):
    """A discrete DDPM schedule of ``T`` steps with its derived tables, registered as float64 buffers.

    Being a module, the tables move with the model they belong to (``.to(device)``); they are never cast
    by ``.half()``/``.to(dtype)`` because :meth:`_apply` keeps them in float64.

    Tables (all ``[T]``, float64): ``betas``, ``alphas_cumprod`` (alpha_bar), ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod`` and ``sigma_bar``.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sigma_bar: Tensor

    def __init__(self, betas: Tensor | np.ndarray):
        super().__init__()
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt(), persistent=False)
        self.register_buffer("sigma_bar", ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt(), persistent=False)
        # Host copies for the sampler's per-step scalars: no device sync in the sampling loop.
        self._host = {k: getattr(self, k).cpu().numpy().copy() for k in self._tables()}

    @staticmethod
    def _tables() -> tuple[str, ...]:
        return (
            "betas",
            "alphas_cumprod",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "sigma_bar",
        )

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The linear schedule of DDPM / guided-diffusion (T = 1000, betas 1e-4 .. 0.02)."""
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        return cls(np.linspace(beta_start, beta_end, T, dtype=np.float64))

    def _apply(self, fn, recurse=True):
        # Follow the surrounding model's device but never its dtype: the tables stay float64.
        for k, b in self._buffers.items():
            if b is None:
                continue
            moved = fn(b)
            self._buffers[k] = moved if moved.dtype == b.dtype else b.to(moved.device)
        return self

    @property
    def T(self) -> int:
        return len(self.betas)

    def host(self, name: str) -> np.ndarray:
        """A float64 numpy copy of one table (``'sigma_bar'``, ``'sqrt_alphas_cumprod'``, ...)."""
        return self._host[name]

    # -- one gather helper ------------------------------------------------------------------------------
    def extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at integer steps ``t`` (shape [N]), shaped [N, 1, 1, ...] to broadcast with ``like``,
        in ``like``'s dtype and device."""
        table = getattr(self, name)
        out = table.to(t.device)[t.long()]
        return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Diffuse ``x0`` (in [-1, 1]) to step ``t``: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``(x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``."""
        return (x_t - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self.extract(
            "sqrt_alphas_cumprod", t, x_t
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """``(x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)``."""
        return (x_t - self.extract("sqrt_alphas_cumprod", t, x_t) * x0) / self.extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def timestep_for_sigma(self, sigma: float | Tensor) -> Tensor:
        """The timestep(s) whose ``sigma_bar`` (on the [-1, 1] scale) is nearest to ``sigma`` (on the CPU, ``sigma``'s
        shape; an exact tie goes to the lower timestep). ``sigma_bar`` increases with ``t``, so this is a binary
        search among the midpoints of neighbouring levels."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        table = torch.as_tensor(self._host["sigma_bar"])
        mids = 0.5 * (table[1:] + table[:-1])
        return torch.searchsorted(mids, sigma.reshape(-1).contiguous()).reshape(sigma.shape)

    # -- step sequences -----------------------------------------------------------------------------------
    def timesteps(self, steps: int, skip: Skip = "quad", t_start: int | None = None) -> list[int]:
        """The decreasing timesteps DiffPIR visits, as the official code builds them.

        ``quad``: ``seq = int(sqrt(linspace(0, L^2, steps)))`` with its last entry minus 1, where
        ``L = t_start + 1`` (``T`` by default); step ``i`` runs at the timestep whose ``sigma_bar`` is nearest to
        ``sigma_bar[t_start - seq[i]]``, i.e. at ``t_start - seq[i]``. ``steps`` timesteps in all.
        For ``T = 1000, steps = 100``: 999, 899, 857, ..., 10, 5, 0.

        ``uniform``: ``seq = i * (L // steps)`` for ``i < steps``, then ``L - 1`` appended when the stride
        exceeds 1 (as the official code does): ``steps + 1`` timesteps, e.g. 999, 989, ..., 9, 0.
        """
        T = self.T
        t_start = T - 1 if t_start is None else int(t_start)
        if not 0 < t_start < T:
            raise ValueError(f"t_start must lie in [1, {T - 1}], got {t_start}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        L = t_start + 1
        if steps > L:
            raise ValueError(f"steps={steps} exceeds the {L} timesteps available below t_start={t_start}")
        if skip == "quad":
            seq = [int(s) for s in np.sqrt(np.linspace(0, L**2, steps))]
            seq[-1] = seq[-1] - 1
        elif skip == "uniform":
            stride = L // steps
            seq = [i * stride for i in range(steps)]
            if stride > 1:
                seq.append(L - 1)
        else:
            raise ValueError(f"skip must be 'quad' or 'uniform', got {skip!r}")
        out = [t_start - s for s in seq]
        if steps == 1:
            out = [t_start]
        # Strictly decreasing and unique (duplicates can occur for very dense quad sequences).
        dedup: list[int] = []
        for t in out:
            if not dedup or t < dedup[-1]:
                dedup.append(t)
        return dedup

    def respaced_steps(self, steps: int) -> list[RespacedStep]:
        """The steps of the chain respaced to ``steps`` timesteps (:func:`respaced_timesteps`), with their
        ``alpha_bar`` values: the respaced chain has ``beta_t = 1 - ab / ab_next`` (guided-diffusion's respacing)."""
        ts = respaced_timesteps(self.T, steps)
        ab = self._host["alphas_cumprod"]
        nxt = [*ts[1:], None]
        return [
            RespacedStep(i, t, tn, float(ab[t]), 1.0 if tn is None else float(ab[tn]))
            for i, (t, tn) in enumerate(zip(ts, nxt, strict=True))
        ]

    def extra_repr(self) -> str:
        b = self._host["betas"]
        return f"T={self.T}, beta_start={b[0]:.3g}, beta_end={b[-1]:.3g}"


__all__ = ["NoiseSchedule", "RespacedStep", "Skip", "respaced_timesteps"]
