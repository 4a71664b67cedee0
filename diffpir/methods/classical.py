"""Classical (prior-free) baselines, one per operator family.

- Deblurring (:class:`~diffpir.operators.Blur`): **Wiener deconvolution** by FFT (circular, like the operator),
  ``u = mu + F^-1[conj(K) F(y - mu) / (|K|^2 + NSR(f))]`` with ``mu`` the image mean. ``NSR(f) = sigma^2 / P(f)``
  from a given signal spectrum ``P`` (then it *is* the posterior mean of the Gaussian image model, see
  :func:`wiener_deconvolve`), or a natural-image power law ``P(f) ~ 1 / (|f|^2 + f0^2)`` whose scale is chosen
  per image by the unbiased predictive risk estimator (UPRE, a SURE variant that needs no ground truth), or, in
  benchmarks, by the truth (:meth:`Classical.oracle`).
- Super-resolution: ``op.initial_estimate(y)`` (bicubic upsampling).
- Inpainting (:class:`~diffpir.operators.Inpaint`): **harmonic fill**: the missing pixels solve Laplace's
  equation with the known pixels as boundary values (5-point graph Laplacian, no flux across the image border),
  by conjugate gradients; or mean fill (``inpaint="mean"``).
- Denoising (:class:`~diffpir.operators.Denoise`): **Gaussian smoothing** whose width is chosen per image by
  Stein's unbiased risk estimate (SURE; identity when ``sigma_n = 0``).
- Any other operator: ``op.initial_estimate(y)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffpir.methods.base import Method, check_inputs
from diffpir.operators import Blur, Denoise, Inpaint
from diffpir.sampler import DataOperator, GeneratorArg

__all__ = [
    "Classical",
    "NSR_SCALES",
    "SMOOTH_STDS",
    "gaussian_smooth",
    "harmonic_fill",
    "power_law_nsr",
    "wiener_deconvolve",
]

NSR_SCALES: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 4, 51))
SMOOTH_STDS: tuple[float, ...] = tuple(float(v) for v in np.linspace(0.0, 3.0, 31))
QUANT_SIGMA = 0.5 / 255  # a floor on the noise std: uint8 quantisation noise is about 0.29/255


# --------------------------------------------------------------------------------------------------------
# Wiener deconvolution
# --------------------------------------------------------------------------------------------------------
def _blur_otf(op: Blur, y: Tensor) -> Tensor:
    """The full complex transfer function ``[Nk, 1, H, W]`` in float64."""
    return op.otf(y.shape[-2], y.shape[-1], y.to(torch.float64), full=True)


def power_law_nsr(h: int, w: int, f0: float | None = None, device: torch.device | None = None) -> Tensor:
    """The shape ``|f|^2 + f0^2`` (``[H, W]``, float64, frequencies in cycles per pixel) of the NSR of a power-law
    signal spectrum ``P(f) ~ 1 / (|f|^2 + f0^2)``; ``f0`` defaults to ``1 / max(H, W)``."""
    f0 = 1.0 / max(h, w) if f0 is None else float(f0)
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=device)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=device)[None, :]
    return fy**2 + fx**2 + f0**2


def wiener_deconvolve(
    y: Tensor,
    op: Blur,
    sigma_n: float,
    nsr: Tensor | float | None = None,
    signal_spectrum: Tensor | None = None,
    mean: Tensor | float | None = None,
) -> Tensor:
    """Wiener deconvolution ``u = mu + F^-1[conj(K) F(y - K(0) mu) / (|K|^2 + NSR)]`` (circular, float64).

    Args:
        y: blurred measurements ``[N, C, H, W]`` in [0, 1].
        op: the :class:`~diffpir.operators.Blur` that made them.
        sigma_n: noise std on the [0, 1] scale.
        nsr: the noise-to-signal ratio: a float, or ``[H, W]`` / broadcastable to ``[N, C, H, W]``.
        signal_spectrum: instead of ``nsr``: the signal's power spectrum ``P(f)`` (eigenvalues of its covariance
            in the orthonormal DFT, [0, 1] scale), ``NSR = sigma_n^2 / P``. With the true spectrum and mean of a
            stationary Gaussian image model this is the exact posterior mean ``E[u | y]``.
        mean: the signal mean ``mu`` (float or ``[N, C, 1, 1]``); None: the mean of ``y`` per image and channel.
    Returns:
        ``[N, C, H, W]`` in ``y``'s dtype.
    """
    if (nsr is None) == (signal_spectrum is None):
        raise ValueError("give exactly one of nsr and signal_spectrum")
    yd = y.to(torch.float64)
    otf = _blur_otf(op, y)
    if signal_spectrum is not None:
        nsr = float(sigma_n) ** 2 / signal_spectrum.to(device=y.device, dtype=torch.float64)
    if mean is None:
        mean = yd.mean(dim=(-2, -1), keepdim=True) / otf[..., :1, :1].real
    k0 = otf[..., :1, :1].real  # the kernel's sum (1 for a normalised kernel)
    num = otf.conj() * torch.fft.fft2(yd - k0 * mean)
    den = otf.abs().square() + torch.as_tensor(nsr, dtype=torch.float64, device=y.device)
    return (torch.fft.ifft2(num / den).real + mean).to(y.dtype)


def _upre_scale(y: Tensor, op: Blur, sigma: float, shape: Tensor, scales: Sequence[float]) -> Tensor:
    """Per image, the scale ``a`` of ``NSR = a * shape`` minimising the unbiased predictive risk estimate
    ``||K u_a - y||^2 + 2 sigma^2 tr(K G_a) - n sigma^2`` (``G_a`` the Wiener filter): ``[N]`` float64."""
    yd = y.to(torch.float64)
    otf = _blur_otf(op, y)
    k2 = otf.abs().square()
    yc = torch.fft.fft2(yd - yd.mean(dim=(-2, -1), keepdim=True))
    power = yc.abs().square()
    npix = y.shape[-2] * y.shape[-1]
    risks = []
    for a in scales:
        nsr = a * shape
        resid = (power * (nsr / (k2 + nsr)).square()).sum(dim=(1, 2, 3)) / npix  # Parseval: ||K u - y||^2
        trace = (k2 / (k2 + nsr)).expand_as(power).sum(dim=(1, 2, 3))
        risks.append(resid + 2 * sigma**2 * trace)
    best = torch.stack(risks, dim=1).argmin(dim=1)
    return torch.as_tensor(scales, dtype=torch.float64, device=y.device)[best]


# --------------------------------------------------------------------------------------------------------
# Harmonic fill
# --------------------------------------------------------------------------------------------------------
def _laplacian(u: Tensor) -> Tensor:
    """The 5-point graph Laplacian ``(L u)_i = sum_{j ~ i} (u_i - u_j)`` on the image grid (no edges across the
    border: Neumann), per channel. Symmetric positive semi-definite."""
    out = torch.zeros_like(u)
    dx = u[..., :, 1:] - u[..., :, :-1]
    dy = u[..., 1:, :] - u[..., :-1, :]
    out[..., :, :-1] -= dx
    out[..., :, 1:] += dx
    out[..., :-1, :] -= dy
    out[..., 1:, :] += dy
    return out


def _cg(apply: Callable[[Tensor], Tensor], b: Tensor, x: Tensor, tol: float, max_iter: int) -> Tensor:
    """Batched conjugate gradients on ``apply(x) = b`` (one system per image of ``[N, ...]``)."""

    def dot(a: Tensor, c: Tensor) -> Tensor:
        return (a * c).flatten(1).sum(1)

    shape = (-1,) + (1,) * (b.ndim - 1)
    r = b - apply(x)
    p = r.clone()
    rs = dot(r, r)
    target = tol**2 * dot(b, b).clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(max_iter):
        active = rs > target
        if not bool(active.any()):
            break
        ap = apply(p)
        alpha = torch.where(active, rs / dot(p, ap).clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * ap
        rs_new = dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        p = torch.where(active.view(shape), r + beta.view(shape) * p, p)
        rs = torch.where(active, rs_new, rs)
    return x


def harmonic_fill(y: Tensor, mask: Tensor, tol: float = 1e-8, max_iter: int = 5000) -> Tensor:
    """Fill the missing pixels of ``y`` with the harmonic interpolant of the known ones.

    Solves ``(L u)_i = 0`` at every missing pixel ``i`` with ``u`` fixed to the known values elsewhere (``L`` the
    5-point graph Laplacian, Neumann at the image border), by conjugate gradients on the missing pixels, from
    the mean fill. Harmonic functions of the grid (e.g. linear ramps, away from the image border) are reproduced
    exactly.

    Args:
        y: ``[N, C, H, W]`` measurements ``M x`` in [0, 1].
        mask: broadcastable to ``y`` (``[N|1, 1|C, H, W]``), 1 = known; pixels with ``mask > 0.5`` count as known,
            with value ``y / mask``.
    Returns:
        ``[N, C, H, W]`` in ``y``'s dtype.
    """
    yd = y.to(torch.float64)
    m = mask.to(device=y.device, dtype=torch.float64).expand_as(yd)
    known = (m > 0.5).to(torch.float64)
    miss = 1.0 - known
    values = torch.where(known > 0, yd / m.clamp_min(1e-12), torch.zeros_like(yd))
    count = known.sum(dim=(-2, -1), keepdim=True)
    mean = (values * known).sum(dim=(-2, -1), keepdim=True) / count.clamp_min(1.0)
    mean = torch.where(count > 0, mean, torch.full_like(mean, 0.5))
    b = -miss * _laplacian(values * known)
    u = _cg(lambda v: miss * _laplacian(miss * v), b, miss * mean, tol, max_iter)
    return (values * known + miss * u).to(y.dtype)


# --------------------------------------------------------------------------------------------------------
# Gaussian smoothing with a SURE-chosen width
# --------------------------------------------------------------------------------------------------------
def _gaussian_response(h: int, w: int, std: float, device: torch.device) -> Tensor:
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=device)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=device)[None, :]
    return torch.exp(-2 * math.pi**2 * std**2 * (fy**2 + fx**2))


def gaussian_smooth(y: Tensor, std: float | Tensor) -> Tensor:
    """Circular Gaussian smoothing (transfer function ``exp(-2 pi^2 std^2 |f|^2)``); ``std`` in pixels, a float or
    ``[N]`` (one per image)."""
    yd = y.to(torch.float64)
    stds = torch.as_tensor(std, dtype=torch.float64).reshape(-1).tolist()
    if len(stds) == 1:
        stds = stds * y.shape[0]
    out = [
        torch.fft.ifft2(torch.fft.fft2(yd[i : i + 1]) * _gaussian_response(*y.shape[-2:], s, y.device)).real
        for i, s in enumerate(stds)
    ]
    return torch.cat(out).to(y.dtype)


def _sure_std(y: Tensor, sigma: float, stds: Sequence[float]) -> Tensor:
    """Per image, the std minimising SURE ``||H y - y||^2 + 2 sigma^2 tr(H) - n sigma^2`` of the smoother ``H``."""
    yf = torch.fft.fft2(y.to(torch.float64))
    npix = y.shape[-2] * y.shape[-1]
    risks = []
    for s in stds:
        g = _gaussian_response(*y.shape[-2:], s, y.device)
        resid = (yf.abs().square() * (1 - g).square()).sum(dim=(1, 2, 3)) / npix
        risks.append(resid + 2 * sigma**2 * float(g.mean()) * y[0].numel())
    best = torch.stack(risks, dim=1).argmin(dim=1)
    return torch.as_tensor(stds, dtype=torch.float64)[best.cpu()]


# --------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------
class Classical(Method):
    """The classical baseline of each task (module docstring); no prior, no network.

    Args:
        inpaint: ``"harmonic"`` (default) or ``"mean"`` fill.
        wiener_nsr: a fixed NSR for the Wiener filter; None (default): the power-law NSR, scaled by UPRE.
        nsr_scales: the scales UPRE (or :meth:`oracle`) chooses from.
        smooth_stds: the Gaussian widths (pixels) SURE (or :meth:`oracle`) chooses from when denoising.
    """

    name = "classical"
    uses_prior = False

    def __init__(
        self,
        inpaint: Literal["harmonic", "mean"] = "harmonic",
        wiener_nsr: float | None = None,
        nsr_scales: Sequence[float] = NSR_SCALES,
        smooth_stds: Sequence[float] = SMOOTH_STDS,
    ):
        if inpaint not in ("harmonic", "mean"):
            raise ValueError(f"inpaint must be 'harmonic' or 'mean', got {inpaint!r}")
        if wiener_nsr is not None and not (wiener_nsr >= 0 and math.isfinite(wiener_nsr)):
            raise ValueError(f"wiener_nsr must be a finite number >= 0, got {wiener_nsr}")
        self.inpaint, self.wiener_nsr = inpaint, wiener_nsr
        self.nsr_scales, self.smooth_stds = tuple(nsr_scales), tuple(smooth_stds)

    @property
    def nfe(self) -> int:
        return 0

    def config(self) -> dict[str, Any]:
        return {"inpaint": self.inpaint, "wiener_nsr": self.wiener_nsr}

    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        sigma = max(float(sigma_n), QUANT_SIGMA)
        if isinstance(op, Blur):
            if self.wiener_nsr is not None:
                return wiener_deconvolve(y, op, sigma_n, nsr=self.wiener_nsr)
            shape = power_law_nsr(*y.shape[-2:], device=y.device)
            scale = _upre_scale(y, op, sigma, shape, self.nsr_scales).view(-1, 1, 1, 1)
            return wiener_deconvolve(y, op, sigma_n, nsr=scale * shape)
        if isinstance(op, Inpaint):
            if self.inpaint == "mean":
                return op.initial_estimate(y)
            return harmonic_fill(y, op.mask)
        if isinstance(op, Denoise):
            if sigma_n == 0:
                return y.clone()
            return gaussian_smooth(y, _sure_std(y, sigma, self.smooth_stds))
        return op.initial_estimate(y)

    @torch.no_grad()
    def oracle(self, y: Tensor, op: DataOperator, sigma_n: float, truth: Tensor) -> Tensor:
        """The same baseline with its one parameter tuned per image on the ground truth (least MSE): the Wiener
        NSR scale (deblurring) or the smoothing width (denoising); other tasks have none and run as usual."""
        check_inputs(y, op, sigma_n)
        if isinstance(op, Blur):
            shape = power_law_nsr(*y.shape[-2:], device=y.device)
            cands = [wiener_deconvolve(y, op, sigma_n, nsr=a * shape) for a in self.nsr_scales]
        elif isinstance(op, Denoise):
            cands = [gaussian_smooth(y, s) for s in self.smooth_stds]
        else:
            return self(y, op, None, sigma_n)
        errs = torch.stack([(c.clamp(0, 1) - truth).square().flatten(1).mean(1) for c in cands], dim=1)
        best = errs.argmin(dim=1)
        return torch.stack([cands[int(b)][i] for i, b in enumerate(best)])
