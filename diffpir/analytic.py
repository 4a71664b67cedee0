"""An analytic prior: a stationary Gaussian image model whose eps and posterior are exact.

``x0 ~ N(m, C)`` on the network's [-1, 1] scale, with ``C`` circulant (diagonal in the orthonormal 2-D DFT, with
eigenvalues ``spectrum[f]``), independently per channel. Then ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` is Gaussian
with covariance ``ab C + (1 - ab) I``, and the exact MMSE noise prediction is

    E[eps | x_t] = sqrt(1 - ab) (ab C + (1 - ab) I)^-1 (x_t - sqrt(ab) m).

For circular deblurring ``y = k (*) u + n`` of ``u = (x0 + 1) / 2`` (the [0, 1] scale), the posterior is Gaussian
too and its mean is closed form. This bounds what a sampler can achieve, which is how the tests use it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffpir.schedule import NoiseSchedule


def power_law_spectrum(h: int, w: int, f0: float = 0.05, power: float = 1.5, variance: float = 0.25) -> Tensor:
    """A natural-image-like spectrum ``1 / (1 + |f|^2 / f0^2)^power``, scaled to a per-pixel ``variance``."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    s = 1.0 / (1.0 + (fy**2 + fx**2) / f0**2) ** power
    return s / s.mean() * variance


class GaussianPrior(nn.Module):
    """The exact eps-model of a stationary Gaussian image model (an ``eps_model(x_t, t)`` for the sampler).

    Args:
        spectrum: ``[H, W]`` eigenvalues of the covariance in the orthonormal DFT (float64, > 0).
        schedule: the diffusion schedule whose ``alpha_bar`` defines ``x_t``.
        mean: the scalar mean ``m`` of every pixel on the [-1, 1] scale.
    """

    def __init__(self, spectrum: Tensor, schedule: NoiseSchedule, mean: float = 0.0):
        super().__init__()
        if spectrum.ndim != 2 or not bool((spectrum > 0).all()):
            raise ValueError("spectrum must be a positive [H, W] tensor")
        self.register_buffer("spectrum", spectrum.to(torch.float64))
        self.schedule = schedule
        self.mean = float(mean)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact ``E[eps | x_t]`` for ``x_t`` ``[N, C, H, W]`` and integer ``t`` ``[N]``."""
        ab = self.schedule.extract("alphas_cumprod", t, x_t.double())
        r = x_t.double() - ab.sqrt() * self.mean
        eps = torch.fft.ifft2(torch.fft.fft2(r) * (1 - ab).sqrt() / (ab * self.spectrum + 1 - ab)).real
        return eps.to(x_t.dtype)

    eps = forward

    def sample(self, n: int, channels: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images ``x0`` on the [-1, 1] scale (float64)."""
        h, w = self.spectrum.shape
        z = torch.randn(n, channels, h, w, generator=generator, dtype=torch.float64)
        return torch.fft.ifft2(torch.fft.fft2(z) * self.spectrum.sqrt()).real + self.mean

    def posterior_mean_deblur(self, y: Tensor, otf: Tensor, sigma_n: float) -> Tensor:
        """Exact ``E[u | y]`` on the [0, 1] scale for ``y = k (*) u + n``, ``n ~ N(0, sigma_n^2)``.

        ``otf`` is the DFT of the kernel padded to ``[H, W]`` with its centre rolled to (0, 0), so that
        ``k (*) u = ifft2(otf * fft2(u))``.
        """
        p = self.spectrum / 4  # covariance of u = (x0 + 1) / 2
        mu = (self.mean + 1) / 2
        y = y.double()
        resid = torch.fft.fft2(y - mu * otf[0, 0].real)  # k (*) constant = constant * sum(k) = otf[0, 0]
        u = p * otf.conj() * resid / (otf.abs() ** 2 * p + sigma_n**2)
        return torch.fft.ifft2(u).real + mu


__all__ = ["GaussianPrior", "power_law_spectrum"]
