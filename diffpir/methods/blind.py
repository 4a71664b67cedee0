"""Blind deblurring: DiffPIR with the kernel estimated together with the image (:class:`BlindDiffPIR`).

``y = k * x + n`` with ``k`` unknown (circular convolution, non-negative, sums to one, supported on a
``kernel_size x kernel_size`` square around the centre). Three stages, all in this class; the DiffPIR sampler is
used unchanged and never branches on the task:

1. **Kernel initialisation**, coarse to fine (classical blind deconvolution in the manner of Xu, Zheng & Jia 2013):
   on an image pyramid of the grey ``y`` (factor ``1/sqrt(2)``), alternate an image step, L0-gradient deblurring
   with the current kernel (:func:`l0_deblur`: sharp edges, flat elsewhere, which is what makes the kernel
   identifiable), and the kernel step (:func:`estimate_kernel`) on the gradients of that image; on the coarse
   levels optionally only on the edges wider than a window (:func:`edge_map`, Xu & Jia 2010). The kernel is
   upsampled from level to level and re-centred on its centre of mass; at the end it is moved so that its centre of
   mass is the central pixel to sub-pixel accuracy (:func:`centre_kernel`).
2. **DiffPIR with kernel refinement**: the sampler runs with a blur whose kernel is the current estimate; every
   ``refine_every`` steps (from the step whose timestep is at most ``refine_below``) the sampler's callback takes a
   kernel step given the data-corrected ``x0_hat`` and the new kernel is used by the next data steps.
3. **Passes**: stage 2 again (``passes`` in all), each time after a kernel step given the previous restoration.
   With ``smooth_weight > 0`` every kernel step given a restoration sees it L0-smoothed (:func:`l0_smooth`): the
   salient edges that identify the kernel, without the texture and leftover blur that hold the kernel where it is.

**The kernel step** (:func:`estimate_kernel`) solves, for each image, with ``D_h, D_v`` circular forward
differences (``gradients=True``; the identity otherwise) and the channels sharing the kernel,

    ``min_k  sum_{c, d} ||(D_d x_c) * k - D_d y_c||^2 + a ||k||^2 + b sum_d ||D_d k||^2``,
    ``a = alpha E, b = beta E, E = sum_{c, d} ||D_d x_c||^2`` (weights relative to the energy of what is fitted),

first without constraints on the whole circular domain, in closed form in the Fourier domain,
``K = sum conj(X_cd) Y_cd / (sum |X_cd|^2 + a + b sum_d |D_d|^2)``, then on the constraint set
``{k >= 0, sum k = 1, k = 0 outside the support}`` by accelerated projected gradient (FISTA, step ``1 / L``,
``L`` the largest eigenvalue of the quadratic), started from the projection of the closed form; the projection
onto that set is the Euclidean projection onto the simplex (Duchi et al. 2008). Finally entries below
``threshold`` times the largest are set to zero and the kernel renormalised (a classical heuristic against
noise in the kernel; 0 turns it off).

Blind deconvolution cannot tell a shifted kernel from a shifted image: compare restorations to the truth after the
best integer alignment (:func:`align_images`), and kernels by their normalised cross-correlation at the best shift
(:func:`kernel_ncc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffpir.methods.base import check_inputs, schedule_of
from diffpir.methods.diffpir_method import DiffPIRMethod
from diffpir.operators.blur import Blur
from diffpir.operators.fft import psf2otf
from diffpir.sampler import DataOperator, EpsModel, GeneratorArg, StepState

__all__ = [
    "BlindDiffPIR",
    "BlindResult",
    "BlindStepState",
    "align_images",
    "centre_kernel",
    "coarse_to_fine_kernel",
    "edge_map",
    "estimate_kernel",
    "kernel_ncc",
    "kernel_from_otf_space",
    "kernel_least_squares",
    "l0_deblur",
    "l0_smooth",
    "project_simplex",
]


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------
def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` ``[N, M]`` onto ``{p >= 0, sum p = 1}`` (Duchi et al. 2008)."""
    u, _ = torch.sort(v, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1.0
    idx = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / idx > 0
    rho = (cond * idx).argmax(dim=1, keepdim=True)  # the last index where cond holds (cond is monotone)
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def kernel_from_otf_space(full: Tensor, size: int) -> Tensor:
    """The centred ``[N, size, size]`` window of kernels ``[N, H, W]`` laid out as :func:`psf2otf` pads them
    (centre at ``(0, 0)``, circular): the inverse of that padding on the support."""
    c = size // 2
    rolled = torch.roll(full, shifts=(c, c), dims=(-2, -1))
    return rolled[..., :size, :size]


def _diff_otfs(h: int, w: int, like: Tensor) -> Tensor:
    """Transfer functions ``[2, 1, 1, H, W // 2 + 1]`` of the circular forward differences
    ``(D_h x)[i, j] = x[i, j + 1] - x[i, j]`` and ``(D_v x)[i, j] = x[i + 1, j] - x[i, j]``."""
    d = torch.zeros(2, h, w, dtype=like.dtype, device=like.device)
    d[:, 0, 0] = -1.0
    d[0, 0, w - 1] = 1.0
    d[1, h - 1, 0] = 1.0
    return torch.fft.rfft2(d)[:, None, None]


def _centre_of_mass_shift(k: Tensor) -> Tensor:
    """Re-centre kernels ``[N, s, s]`` on their centre of mass by an integer shift (zeros shifted in)."""
    n, s, _ = k.shape
    c = (s - 1) / 2
    t = torch.arange(s, dtype=k.dtype, device=k.device)
    mass = k.sum(dim=(1, 2)).clamp_min(1e-12)
    cy = (k.sum(2) * t).sum(1) / mass
    cx = (k.sum(1) * t).sum(1) / mass
    out = torch.zeros_like(k)
    for i in range(n):
        dy, dx = round(c - float(cy[i])), round(c - float(cx[i]))
        src = k[i]
        ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
        xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
        out[i, yd, xd] = src[ys, xs]
    return out / out.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def centre_kernel(k: Tensor) -> Tensor:
    """Kernels ``[N, s, s]`` moved (bilinear resampling, zeros shifted in) so that their centre of mass is the
    central pixel exactly, renormalised to sum to one: the convention of the generated kernels, which fixes the
    sub-pixel part of the shift ambiguity (the restored image then sits where the truth does, to within the
    kernel error)."""
    n, s, _ = k.shape
    c = (s - 1) / 2
    t = torch.arange(s, dtype=k.dtype, device=k.device)
    mass = k.sum(dim=(1, 2)).clamp_min(1e-30)
    cy = (k.sum(2) * t).sum(1) / mass
    cx = (k.sum(1) * t).sum(1) / mass
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    gy = (yy[None] + (cy - c)[:, None, None]) * (2.0 / (s - 1)) - 1  # sample k at (i + cy - c, j + cx - c)
    gx = (xx[None] + (cx - c)[:, None, None]) * (2.0 / (s - 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(k[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    return out.clamp_min(0) / out.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)


def _resize_kernel(k: Tensor, size: int) -> Tensor:
    """Kernels ``[N, s, s]`` resampled (bilinear) to ``[N, size, size]``, non-negative, summing to one."""
    if k.shape[-1] != size:
        k = F.interpolate(k[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    k = k.clamp_min(0)
    return k / k.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _odd(v: float) -> int:
    n = max(3, int(round(v)))
    return n if n % 2 else n + 1


# --------------------------------------------------------------------------------------------------------
# The kernel step
# --------------------------------------------------------------------------------------------------------
def _kernel_normal_terms(
    x: Tensor, y: Tensor, alpha: float, beta: float, gradients: bool, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """``(A, B, E)``: the Fourier-domain normal equations ``A K = B`` of the kernel objective (``[N, H, W//2+1]``,
    A real) and the gradient energy E the weights are relative to. ``mask`` weights the gradients of ``x``."""
    h, w = x.shape[-2:]
    dt = torch.float64
    xf = torch.fft.rfft2(x.to(dt))  # [N, C, H, W']
    yf = torch.fft.rfft2(y.to(dt))
    if gradients:
        dd = _diff_otfs(h, w, xf.real)  # [2, 1, 1, H, W']
        xs, ys = dd * xf, dd * yf  # [2, N, C, H, W']
        if mask is not None:  # the masked gradients of x, M D_d x, in the spatial domain
            xs = torch.fft.rfft2(torch.fft.irfft2(xs, s=(h, w)) * mask.to(dt))
        dd2 = dd.abs().square().sum(0)[0, 0]  # [H, W']
    else:
        xs, ys = xf[None], yf[None]
        dd2 = _diff_otfs(h, w, xf.real).abs().square().sum(0)[0, 0]
    a_data = xs.abs().square().sum(dim=(0, 2))  # [N, H, W']
    b = (xs.conj() * ys).sum(dim=(0, 2))
    # Parseval for rfft2: the energy of x's (gradient) images, from the half spectrum with the doubled columns.
    weight = torch.full((w // 2 + 1,), 2.0, dtype=dt, device=x.device)
    weight[0] = 1.0
    if w % 2 == 0:
        weight[-1] = 1.0
    energy = (a_data * weight).sum(dim=(1, 2)) / (h * w)  # [N]
    a = a_data + (alpha * energy)[:, None, None] + (beta * energy)[:, None, None] * dd2
    # Frequencies the data do not see (e.g. the mean, on gradients) get K = 0 rather than 0 / 0 without weights.
    a = torch.maximum(a, 1e-12 * a.amax(dim=(1, 2), keepdim=True))  # per image: images stay independent
    return a, b, energy


def _check_mask(mask: Tensor | None, x: Tensor, gradients: bool) -> Tensor | None:
    if mask is None:
        return None
    if not gradients:
        raise ValueError("a gradient mask needs gradients=True")
    n, c, h, w = x.shape
    if mask.ndim != 4 or mask.shape[0] != n or mask.shape[1] not in (1, c) or mask.shape[-2:] != (h, w):
        raise ValueError(f"mask must be [N, 1 or C, H, W] = [{n}, 1 or {c}, {h}, {w}], got {tuple(mask.shape)}")
    return mask


def kernel_least_squares(
    x: Tensor, y: Tensor, alpha: float = 1e-3, beta: float = 1e-3, gradients: bool = True, mask: Tensor | None = None
) -> Tensor:
    """The unconstrained minimiser of the kernel objective (module docstring) over the whole circular domain,
    ``F^-1[sum conj(X_cd) Y_cd / (sum |X_cd|^2 + a + b sum_d |D_d|^2)]``: ``[N, H, W]`` float64 in the layout
    of :func:`~diffpir.operators.psf2otf` (centre at ``(0, 0)``; :func:`kernel_from_otf_space` crops it).
    ``mask`` as in :func:`estimate_kernel`."""
    a, b, _ = _kernel_normal_terms(x, y, alpha, beta, gradients, _check_mask(mask, x, gradients))
    return torch.fft.irfft2(b / a, s=tuple(x.shape[-2:]))


def estimate_kernel(
    x: Tensor,
    y: Tensor,
    size: int,
    alpha: float = 1e-3,
    beta: float = 1e-3,
    iterations: int = 30,
    threshold: float = 0.0,
    gradients: bool = True,
    init: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The kernel step: ``k`` ``[N, size, size]`` (float64, ``>= 0``, sums to one) with ``k * x ~ y``.

    See the module docstring for the objective. ``iterations = 0`` returns the projection of the unconstrained
    closed form; ``init`` (``[N, size, size]``) warm-starts the projected iterations instead.

    Args:
        x: the image estimate ``[N, C, H, W]`` (any scale: the weights are relative to its energy).
        y: the blurred measurement, same shape.
        size: the odd side of the support (at most the image size).
        alpha, beta: Tikhonov and gradient-penalty weights, relative to ``E = sum ||D x||^2`` (``sum ||x||^2``
            with ``gradients=False``).
        iterations: FISTA iterations of projected gradient on the constrained problem.
        threshold: entries below ``threshold * max`` are zeroed after the iterations (then renormalised).
        gradients: fit on the image gradients (default; far more robust) or on the images themselves.
        init: the starting kernel of the iterations (default: the projected closed form).
        mask: weights ``[N, 1 or C, H, W]`` (e.g. 0/1 from :func:`edge_map`) on the gradients of ``x``: the
            objective becomes ``sum ||(M D_d x_c) * k - D_d y_c||^2``, so only the selected edges of ``x`` explain
            ``y`` (Xu & Jia 2010). Needs ``gradients=True``; None: all gradients.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x and y must be [N, C, H, W] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    h, w = x.shape[-2:]
    if size % 2 == 0 or size < 1 or size > min(h, w):
        raise ValueError(f"kernel size must be odd and at most the image size {h}x{w}, got {size}")
    n = x.shape[0]
    a, b, _ = _kernel_normal_terms(x, y, alpha, beta, gradients, _check_mask(mask, x, gradients))
    if init is None:
        k = kernel_from_otf_space(torch.fft.irfft2(b / a, s=(h, w)), size)
        k = project_simplex(k.reshape(n, -1)).view(n, size, size)
    else:
        k = project_simplex(init.to(torch.float64).reshape(n, -1)).view(n, size, size)
    if iterations > 0:
        step = 1.0 / (2.0 * a.amax(dim=(1, 2))).view(n, 1, 1)

        def grad(kk: Tensor) -> Tensor:
            kf = psf2otf(kk, h, w)[:, 0]
            return kernel_from_otf_space(torch.fft.irfft2(2.0 * (a * kf - b), s=(h, w)), size)

        z, t = k, 1.0
        for _ in range(iterations):
            k_new = project_simplex((z - step * grad(z)).reshape(n, -1)).view(n, size, size)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            z = k_new + ((t - 1) / t_new) * (k_new - k)
            k, t = k_new, t_new
    if threshold > 0:
        k = torch.where(k >= threshold * k.amax(dim=(1, 2), keepdim=True), k, torch.zeros_like(k))
        k = k / k.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    return k


# --------------------------------------------------------------------------------------------------------
# The image step of the initialisation: L0-gradient deblurring
# --------------------------------------------------------------------------------------------------------
def l0_deblur(y: Tensor, kernel: Tensor, weight: float = 2e-3, beta_max: float = 1e5) -> Tensor:
    """``argmin_x ||k * x - y||^2 + weight ||grad x||_0`` approximately, by half-quadratic splitting (Xu et al.
    2011/2013): ``beta`` doubles from ``2 weight`` to ``beta_max``; each round thresholds the gradients
    (``|grad x|^2 < weight / beta`` set to zero) and solves the quadratic in ``x`` by FFT.

    ``y`` ``[N, C, H, W]``, ``kernel`` ``[N, kh, kw]``; returns ``[N, C, H, W]`` (float64).
    """
    if not weight > 0:
        raise ValueError(f"the L0 weight must be positive, got {weight}")
    h, w = y.shape[-2:]
    yd = y.to(torch.float64)
    kf = psf2otf(kernel.to(torch.float64), h, w)  # [N, 1, H, W']
    dd = _diff_otfs(h, w, yd)  # [2, 1, 1, H, W']
    num0 = kf.conj() * torch.fft.rfft2(yd)
    den0 = kf.abs().square()
    dd2 = dd.abs().square().sum(0)
    x = yd
    beta = 2 * weight
    while beta < beta_max:
        gh = torch.roll(x, -1, dims=-1) - x
        gv = torch.roll(x, -1, dims=-2) - x
        keep = (gh.square() + gv.square()).sum(1, keepdim=True) >= weight / beta  # channels together
        gh, gv = gh * keep, gv * keep
        num = num0 + beta * (dd[0].conj() * torch.fft.rfft2(gh) + dd[1].conj() * torch.fft.rfft2(gv))
        x = torch.fft.irfft2(num / (den0 + beta * dd2), s=(h, w))
        beta *= 2
    return x


def l0_smooth(x: Tensor, weight: float) -> Tensor:
    """L0 gradient smoothing (Xu et al. 2011): ``argmin_u ||u - x||^2 + weight ||grad u||_0`` approximately,
    :func:`l0_deblur` with the identity kernel. Keeps the salient edges, flattens texture and noise; the channels
    share their edges. ``x`` ``[N, C, H, W]``; returns float64."""
    identity = torch.ones(x.shape[0], 1, 1, dtype=torch.float64, device=x.device)
    return l0_deblur(x, identity, weight)


def edge_map(y: Tensor, fraction: float, window: int = 5) -> Tensor:
    """Xu & Jia's (2010) edge selection: a 0/1 mask ``[N, 1, H, W]`` of the ``fraction`` of pixels of the grey
    ``y`` ``[N, C, H, W]`` (intensities in [0, 1]) with the largest

        ``r = ||sum_W grad y|| / (sum_W ||grad y|| + 0.5)``   (sums over the ``window x window`` neighbourhood).

    ``r`` is large across an edge whose sides are wider than the window, where the gradients add up, and small on
    structures narrower than that (a thin line's two edges cancel), on texture and in flat regions (the 0.5).
    Narrow structures blurred by a kernel wider than themselves mislead the kernel step towards small kernels;
    weighting the image's gradients by this mask (:func:`estimate_kernel`'s ``mask``) leaves them out."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the edge fraction must lie in (0, 1], got {fraction}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the window must be odd and positive, got {window}")
    g = y.to(torch.float64).mean(dim=1, keepdim=True)
    gh, gv = torch.roll(g, -1, -1) - g, torch.roll(g, -1, -2) - g
    pad = (window // 2,) * 4

    def box(z: Tensor) -> Tensor:
        return F.avg_pool2d(F.pad(z, pad, mode="circular"), window, 1) * (window * window)

    r = torch.hypot(box(gh), box(gv)) / (box(torch.hypot(gh, gv)) + 0.5)
    q = torch.quantile(r.flatten(1), 1 - fraction, dim=1).view(-1, 1, 1, 1)
    return (r >= q).to(torch.float64)


def coarse_to_fine_kernel(
    y: Tensor,
    size: int,
    levels: int | None = None,
    iterations: int = 5,
    l0_weight: float = 4e-3,
    l0_weight_min: float = 1e-3,
    alpha: float = 1e-3,
    beta: float = 1e-3,
    kernel_iterations: int = 30,
    threshold: float = 0.05,
    edge_fraction: float = 1.0,
    edge_window: int = 5,
) -> Tensor:
    """The kernel initialisation: alternate :func:`l0_deblur` and :func:`estimate_kernel` (on gradients) from
    the coarsest to the finest level of a pyramid of the grey ``y`` ``[N, C, H, W]`` (factor ``1/sqrt(2)``,
    ``levels`` None: down to a kernel of about 5 px). The L0 weight decays by 0.9 per round down to
    ``l0_weight_min``. With ``edge_fraction < 1`` the kernel steps on every level but the finest use only the
    gradients of the L0 image at the ``edge_fraction`` of pixels that :func:`edge_map` selects from that level
    of ``y`` (``edge_window``). Returns ``[N, size, size]`` (float64)."""
    if not 0 < edge_fraction <= 1:
        raise ValueError(f"edge_fraction must lie in (0, 1], got {edge_fraction}")
    grey = y.to(torch.float64).mean(dim=1, keepdim=True)
    h, w = grey.shape[-2:]
    if levels is None:
        levels = max(1, 1 + int(math.floor(math.log(size / 5.0) / math.log(math.sqrt(2.0)))))
    k = None
    lam = l0_weight
    for lev in range(levels - 1, -1, -1):
        s = math.sqrt(0.5) ** lev
        ks = size if lev == 0 else _odd(size * s)
        hh, ww = max(ks, int(round(h * s))), max(ks, int(round(w * s)))
        yl = grey if lev == 0 else F.interpolate(grey, size=(hh, ww), mode="bilinear", antialias=True)
        if k is None:
            t = torch.arange(ks, dtype=torch.float64, device=y.device) - ks // 2
            g = torch.exp(-(t**2) / 2.0)
            k = (g[:, None] * g[None, :]).expand(y.shape[0], ks, ks).contiguous()
        k = _resize_kernel(k, ks)
        mask = edge_map(yl, edge_fraction, edge_window) if edge_fraction < 1 and lev > 0 else None
        for _ in range(iterations):
            x = l0_deblur(yl, k, lam)
            k = estimate_kernel(x, yl, ks, alpha, beta, kernel_iterations, threshold, init=k, mask=mask)
            k = _centre_of_mass_shift(k)
            lam = max(lam * 0.9, l0_weight_min)
    return k


# --------------------------------------------------------------------------------------------------------
# Evaluation helpers: alignment of images, kernel similarity
# --------------------------------------------------------------------------------------------------------
def align_images(restored: Tensor, truth: Tensor, max_shift: int = 4) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Crop ``restored`` and ``truth`` (``[N, C, H, W]``) to the pair with the least mean squared error over the
    integer shifts ``|dy|, |dx| <= max_shift`` of ``restored``: both lose a ``max_shift`` border (so every shift
    compares the same number of pixels, no wrap-around). Returns the crops and each image's ``(dy, dx)``."""
    s = int(max_shift)
    h, w = truth.shape[-2:]
    if s == 0:
        return restored, truth, [(0, 0)] * truth.shape[0]
    if h <= 2 * s or w <= 2 * s:
        raise ValueError(f"images of {h}x{w} are too small to align within {s} px")
    t = truth[..., s : h - s, s : w - s]
    best = torch.full((truth.shape[0],), float("inf"), device=truth.device, dtype=torch.float64)
    shifts = [(0, 0)] * truth.shape[0]
    out = restored[..., s : h - s, s : w - s].clone()
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            r = restored[..., s + dy : h - s + dy, s + dx : w - s + dx]
            err = (r.double() - t.double()).square().flatten(1).mean(1)
            for i in range(truth.shape[0]):
                if float(err[i]) < float(best[i]):
                    best[i] = err[i]
                    shifts[i] = (dy, dx)
                    out[i] = r[i]
    return out, t, shifts


def kernel_ncc(estimate: Tensor, truth: Tensor) -> Tensor:
    """The normalised cross-correlation of kernels at the best shift, ``max_s <k_est(. - s), k_true> /
    (||k_est|| ||k_true||)`` over all shifts (zero padding, no wrap-around), per kernel: ``[N]`` in [-1, 1]
    (1: identical up to a shift; non-negative kernels give values in [0, 1]).

    ``estimate`` and ``truth`` are ``[N, kh, kw]`` or ``[kh, kw]``, of any (odd or even) sizes."""
    a = estimate.to(torch.float64)
    b = truth.to(torch.float64)
    if a.ndim == 2:
        a = a[None]
    if b.ndim == 2:
        b = b[None]
    if a.shape[0] != b.shape[0]:
        a, b = torch.broadcast_tensors(a, b) if a.shape[-2:] == b.shape[-2:] else (a.expand(b.shape[0], -1, -1), b)
    ha, wa = a.shape[-2:]
    hb, wb = b.shape[-2:]
    hh, ww = ha + hb - 1, wa + wb - 1
    fa = torch.fft.rfft2(a, s=(hh, ww))
    fb = torch.fft.rfft2(b, s=(hh, ww))
    corr = torch.fft.irfft2(fa.conj() * fb, s=(hh, ww))  # every relative shift, no wrap-around
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    return corr.flatten(1).amax(dim=1) / norms.clamp_min(1e-30)


# --------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlindStepState(StepState):
    """:class:`~diffpir.sampler.StepState` plus the kernel estimate ``[N, kh, kw]`` used by this step's data
    step (and refined after it when ``refined``)."""

    kernel: Tensor | None = None
    refined: bool = False


class BlindResult(NamedTuple):
    """What :meth:`BlindDiffPIR.solve` returns: ``image`` ``[N, C, H, W]`` in [0, 1] (not clamped) and
    ``kernel`` ``[N, kh, kw]`` (non-negative, sums to one, float32)."""

    image: Tensor
    kernel: Tensor


class _LiveBlur(Blur):
    """A :class:`~diffpir.operators.Blur` whose kernel the method updates in place between steps: its
    ``prox_fn`` reads the current kernel at every call (the transfer function is re-computed after an update)."""

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        self._check_image(y, "y")
        return lambda z, rho: Blur.prox_fn(self, y)(z, rho)


class BlindDiffPIR(DiffPIRMethod):
    """Blind deblurring: DiffPIR with a kernel step alternating with the image step (see the module docstring).

    ``method(y, op, prior, sigma_n, generator) -> x`` as every :class:`~diffpir.methods.Method`; the kernel
    of the last call is :attr:`last_kernel` (``[N, kh, kw]``), and :meth:`solve` returns both. ``op`` only gives
    the support size when ``kernel_size`` is None (a :class:`~diffpir.operators.BlindBlur`'s ``kernel_size``, or
    the size of a :class:`~diffpir.operators.Blur`'s kernel); its kernel values are never read.

    Args:
        kernel_size: odd side of the kernel support (None: from ``op``).
        levels, init_iterations, l0_weight, l0_weight_min, edge_fraction, edge_window: the coarse-to-fine
            initialisation (:func:`coarse_to_fine_kernel`; ``init_iterations = 0`` skips it and starts from the
            identity; ``edge_fraction = 1`` uses every gradient, less selects edges by :func:`edge_map`).
        alpha, beta, kernel_iterations, threshold: the kernel step (:func:`estimate_kernel`).
        refine_every: a kernel step given ``x0_hat`` every this many sampler steps (0: keep the initial kernel).
        refine_below: refine only at timesteps ``t <= refine_below`` (``x0_hat`` is blurry at high noise).
        centre: move the initial kernel so that its centre of mass is the central pixel, to sub-pixel accuracy
            (:func:`centre_kernel`; bilinear).
        passes: run DiffPIR this many times; before each pass after the first, a kernel step given the previous
            pass's restoration (then centred as above). Each pass costs the sampler's NFEs.
        smooth_weight: before every kernel step given a restoration (between passes, and the refinements during
            sampling), smooth it by :func:`l0_smooth` with this weight: the salient edges identify the kernel,
            while texture the restoration got wrong and leftover blur pull it towards the kernel already used
            (the step's fixed point). 0 turns it off.
        estimate_lambda: the sampler's ``lambda_`` in the passes whose restoration feeds a kernel step (all but the
            last; None: ``lambda_``). A larger value trusts the data, and so the kernel in use, less: the
            restoration leans on the prior and does not reproduce that kernel's errors, which lets the kernel
            step leave its fixed point. The last pass, the one returned, keeps ``lambda_``.
        samples: the last pass only: the mean of this many samples with the final kernel
            (:class:`~diffpir.methods.DiffPIRMethod`'s ``samples``; with ``refine_every`` the first sample refines
            the kernel and the others use the refined one). The passes that feed a kernel step take one sample.
        **settings: the DiffPIR sampler's, by keyword, as :class:`~diffpir.methods.DiffPIRMethod` (the current
            kernel in the data step), with the defaults :attr:`SAMPLER_DEFAULTS` (20 steps from the classical
            restoration diffused to ``t_start = 400``, ``zeta = 1``).
    """

    name = "blind_diffpir"
    SAMPLER_DEFAULTS: ClassVar[dict[str, Any]] = {"steps": 20, "zeta": 1.0, "t_start": 400, "init": "classical"}
    # Restorations are compared to the truth after the best integer shift within this many pixels (a border
    # of that width is left out): blind deconvolution cannot tell a shifted image from a shifted kernel.
    align_shift: ClassVar[int] = 4

    def __init__(
        self,
        kernel_size: int | None = None,
        levels: int | None = None,
        init_iterations: int = 5,
        l0_weight: float = 4e-3,
        l0_weight_min: float = 1e-3,
        alpha: float = 1e-3,
        beta: float = 1e-3,
        kernel_iterations: int = 30,
        threshold: float = 0.05,
        refine_every: int = 0,
        refine_below: int = 400,
        centre: bool = True,
        passes: int = 1,
        smooth_weight: float = 0.0,
        edge_fraction: float = 1.0,
        edge_window: int = 5,
        estimate_lambda: float | None = None,
        samples: int = 1,
        **settings: Any,
    ):
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size}")
        if refine_every < 0 or init_iterations < 0 or kernel_iterations < 0:
            raise ValueError("refine_every, init_iterations and kernel_iterations must be >= 0")
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        if not smooth_weight >= 0:
            raise ValueError(f"smooth_weight must be >= 0, got {smooth_weight}")
        if not 0 < edge_fraction <= 1 or edge_window < 1 or edge_window % 2 == 0:
            raise ValueError(
                f"edge_fraction must lie in (0, 1] and edge_window be odd and positive, got {edge_fraction}, "
                f"{edge_window}"
            )
        if estimate_lambda is not None and not estimate_lambda > 0:
            raise ValueError(f"estimate_lambda must be positive (or None), got {estimate_lambda}")
        super().__init__(samples=samples, **settings)
        # the sampler of the passes that feed a kernel step (the same one when estimate_lambda is None)
        self._estimator = (
            self if estimate_lambda is None else DiffPIRMethod(**{**self.settings, "lambda_": float(estimate_lambda)})
        )
        self.kernel_args: dict[str, Any] = {
            "kernel_size": kernel_size,
            "levels": levels,
            "init_iterations": init_iterations,
            "l0_weight": l0_weight,
            "l0_weight_min": l0_weight_min,
            "alpha": alpha,
            "beta": beta,
            "kernel_iterations": kernel_iterations,
            "threshold": threshold,
            "refine_every": refine_every,
            "refine_below": refine_below,
            "centre": bool(centre),
            "passes": int(passes),
            "smooth_weight": float(smooth_weight),
            "edge_fraction": float(edge_fraction),
            "edge_window": int(edge_window),
            "estimate_lambda": None if estimate_lambda is None else float(estimate_lambda),
        }
        self.last_kernel: Tensor | None = None

    @property
    def nfe(self) -> int:
        return (self.kernel_args["passes"] - 1 + self.samples) * self.sampler.nfe

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.kernel_args}

    def extra_outputs(self) -> dict[str, Tensor]:
        """Per-image outputs of the last call besides the image: ``{"kernels": [N, kh, kw]}``."""
        return {} if self.last_kernel is None else {"kernels": self.last_kernel}

    def _kernel_size(self, op: DataOperator, y: Tensor) -> int:
        size = self.kernel_args["kernel_size"]
        if size is None:
            size = getattr(op, "kernel_size", None)
        if size is None and isinstance(op, Blur):
            size = max(op.kernel.shape[-2:])  # only its size
        if size is None:
            raise ValueError("BlindDiffPIR needs the kernel support: pass kernel_size or a BlindBlur operator")
        size = int(size)
        if size > min(y.shape[-2:]):
            raise ValueError(f"kernel_size {size} is larger than the image {y.shape[-2]}x{y.shape[-1]}")
        return size

    # -- the restoration --------------------------------------------------------------------------------------
    def initial_kernel(self, y: Tensor, size: int) -> Tensor:
        """The kernel before the diffusion stage ``[N, size, size]`` (float64): coarse to fine, or the identity."""
        ka = self.kernel_args
        if ka["init_iterations"] == 0:
            k = torch.zeros(y.shape[0], size, size, dtype=torch.float64, device=y.device)
            k[:, size // 2, size // 2] = 1.0
            return k
        k = coarse_to_fine_kernel(
            y,
            size,
            levels=ka["levels"],
            iterations=ka["init_iterations"],
            l0_weight=ka["l0_weight"],
            l0_weight_min=ka["l0_weight_min"],
            alpha=ka["alpha"],
            beta=ka["beta"],
            kernel_iterations=ka["kernel_iterations"],
            threshold=ka["threshold"],
            edge_fraction=ka["edge_fraction"],
            edge_window=ka["edge_window"],
        )
        return centre_kernel(k) if ka["centre"] else k

    def solve(
        self,
        y: Tensor,
        op: DataOperator,
        prior: EpsModel | None,
        sigma_n: float = 0.01,
        generator: GeneratorArg = None,
        callback: Callable[[StepState], None] | None = None,
    ) -> BlindResult:
        """Restore the image and estimate the kernel: :class:`BlindResult` ``(image, kernel)``."""
        check_inputs(y, op, sigma_n)
        sampler = self.sampler_for(schedule_of(prior, "BlindDiffPIR"))
        size = self._kernel_size(op, y)
        ka = self.kernel_args
        k0 = self.initial_kernel(y, size)
        live = _LiveBlur(k0.to(device=y.device, dtype=torch.float32), normalize=False)
        every, below = ka["refine_every"], ka["refine_below"]
        y32 = y.float()
        passes = ka["passes"]
        final_pass = [passes == 1]  # only the last pass is shown to the callback (one trajectory)

        def kernel_step(x0: Tensor) -> Tensor:
            """The kernel given the image estimate ``x0`` in [0, 1], warm-started from the current one."""
            if ka["smooth_weight"] > 0:
                x0 = l0_smooth(x0, ka["smooth_weight"]).to(x0.dtype)
            args = (ka["alpha"], ka["beta"], ka["kernel_iterations"], ka["threshold"])
            return estimate_kernel(x0, y32, size, *args, init=live.kernel.to(torch.float64))

        def step(state: StepState) -> None:
            refined = False
            kernel_used = live.kernel.detach().clone()
            last = state.t_next is None
            if every and not last and state.t <= below and state.index % every == 0:
                live.kernel.copy_(kernel_step((state.x0_hat.float() + 1) / 2).to(live.kernel.dtype))
                refined = True
            if callback is not None and final_pass[0]:
                base = {f.name: getattr(state, f.name) for f in fields(StepState)}
                kernel = live.kernel.clone() if refined else kernel_used
                callback(BlindStepState(**base, kernel=kernel, refined=refined))

        # every pass but the last feeds a kernel step: those run with estimate_lambda
        estimator = self._estimator.sampler_for(sampler.schedule)

        def run_pass() -> Tensor:
            if final_pass[0]:  # the returned pass: `samples` of them, averaged (the first one refines the kernel)
                return self.sample_mean(sampler, y, live, prior, sigma_n, generator, step)
            return estimator(y, live, prior, sigma_n=sigma_n, generator=generator, callback=step, x_init=self.start())

        x = run_pass()
        for i in range(1, passes):  # the kernel step given the last restoration, then DiffPIR with the new kernel
            k = kernel_step(x.clamp(0, 1).float())
            live.kernel.copy_((centre_kernel(k) if ka["centre"] else k).to(live.kernel.dtype))
            final_pass[0] = i == passes - 1
            x = run_pass()
        kernel = live.kernel.detach().float().clone()
        self.last_kernel = kernel
        return BlindResult(x, kernel)

    def restore(self, y: Tensor, op: DataOperator, prior: Any, sigma_n: float, generator: GeneratorArg, callback: Any):
        """The restored image (the kernel: :attr:`last_kernel`, or call :meth:`solve`)."""
        return self.solve(y, op, prior, sigma_n, generator, callback).image
