"""Blind deblurring (``blind_diffpir``): the kernel step against exact maths, the method end to end on a tiny prior,
and ``configs/restore/deblur_blind.yaml`` through the ``diffpir-restore`` console script in both data modes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpir.io import write_png_atomic
from diffpir.methods import METHODS, BlindDiffPIR, build_method
from diffpir.methods.blind import (
    BlindStepState,
    align_images,
    centre_kernel,
    coarse_to_fine_kernel,
    edge_map,
    estimate_kernel,
    kernel_from_otf_space,
    kernel_least_squares,
    kernel_ncc,
    l0_smooth,
    project_simplex,
)
from diffpir.operators import BlindBlur, Blur, motion_kernel
from diffpir.restoration.tasks import Degradation, build_operator, degrade, image_generator, synthesize_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "restore" / "deblur_blind.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small FFTs: one thread is far faster than several on a shared machine (results do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def edges_image(n: int = 1, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant images of random rectangles plus faint texture ``[n, c, size, size]`` in [0, 1]
    (float64): sharp edges in every direction, a spectrum without zeros."""
    g = gen(seed)
    x = torch.full((n, c, size, size), 0.5, dtype=torch.float64)
    for i in range(n):
        for _ in range(12):
            t, l_ = torch.randint(0, size - 4, (2,), generator=g).tolist()
            h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
            x[i, :, t : t + h, l_ : l_ + w] = torch.rand(c, 1, 1, generator=g, dtype=torch.float64)
    return (x + 0.02 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def grad_images(x: torch.Tensor) -> list[torch.Tensor]:
    """Circular forward differences (horizontal, vertical), computed directly."""
    return [torch.roll(x, -1, dims=-1) - x, torch.roll(x, -1, dims=-2) - x]


# ---------------------------------------------------------------------------------------------------------
# The kernel step
# ---------------------------------------------------------------------------------------------------------
def test_project_simplex_is_the_euclidean_projection():
    v = torch.randn(6, 25, generator=gen(0), dtype=torch.float64) * 0.3
    p = project_simplex(v)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(6, dtype=torch.float64))
    # variational inequality of the projection: <v - p, q - p> <= 0 for every q in the simplex
    q = torch.rand(6, 200, 25, generator=gen(1), dtype=torch.float64)
    q = q / q.sum(-1, keepdim=True)
    assert ((v - p)[:, None] * (q - p[:, None])).sum(-1).max() <= 1e-12
    on = torch.rand(3, 9, generator=gen(2), dtype=torch.float64)
    on = on / on.sum(1, keepdim=True)
    assert torch.allclose(project_simplex(on), on)


@pytest.mark.parametrize("gradients,masked", [(True, False), (False, False), (True, True)])
def test_least_squares_kernel_solves_the_normal_equations(gradients, masked):
    """The Fourier closed form equals the dense solution of the regularised least squares over all H x W kernels;
    with a mask, of ``sum ||(M D_d x) * k - D_d y||^2`` (the mask on the image's gradients only)."""
    h = w = 8
    x = torch.rand(1, 2, h, w, generator=gen(3), dtype=torch.float64)
    y = torch.rand(1, 2, h, w, generator=gen(4), dtype=torch.float64)
    mask = (torch.rand(1, 1, h, w, generator=gen(5)) < 0.5).double() if masked else None
    alpha, beta = 0.03, 0.02
    full = kernel_least_squares(x, y, alpha, beta, gradients, mask=mask)[0].reshape(-1)

    def conv_matrix(img: torch.Tensor) -> torch.Tensor:
        """M with M @ k.flatten() = circular convolution img * k (k in psf2otf layout)."""
        cols = [torch.roll(img, shifts=(q // w, q % w), dims=(-2, -1)).reshape(-1) for q in range(h * w)]
        return torch.stack(cols, dim=1)

    xs = grad_images(x[0]) if gradients else [x[0]]
    if masked:
        xs = [g * mask[0] for g in xs]
    ys = grad_images(y[0]) if gradients else [y[0]]
    mats = [conv_matrix(xi[c]) for xi in xs for c in range(2)]
    rhs = [yi[c].reshape(-1) for yi in ys for c in range(2)]
    energy = sum(float(g.square().sum()) for g in xs)  # the energy of what is fitted
    eye = torch.eye(h * w, dtype=torch.float64)
    dmats = [  # D_d as matrices: column q is D_d of the basis kernel e_q
        torch.stack([gi.reshape(-1) for gi in grad_images(eye.reshape(h * w, h, w))[d]], dim=1) for d in range(2)
    ]
    normal = sum(m.T @ m for m in mats) + alpha * energy * eye + beta * energy * sum(d.T @ d for d in dmats)
    dense = torch.linalg.solve(normal, sum(m.T @ r for m, r in zip(mats, rhs)))
    assert torch.allclose(full, dense, atol=1e-10, rtol=1e-8)


def test_gradient_mask_of_ones_changes_nothing_and_bad_masks_raise():
    x = edges_image(2, seed=21)
    k = torch.stack([motion_kernel(9, 0.5, generator=gen(s)).double() for s in (22, 23)])
    y = Blur(k, normalize=False)(x) + 0.01 * torch.randn(x.shape, generator=gen(24), dtype=torch.float64)
    plain = estimate_kernel(x, y, 9, iterations=20, threshold=0.05)
    ones = estimate_kernel(x, y, 9, iterations=20, threshold=0.05, mask=torch.ones(2, 1, 32, 32))
    assert torch.allclose(plain, ones, atol=1e-12)
    with pytest.raises(ValueError, match="mask must be"):
        estimate_kernel(x, y, 7, mask=torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="gradients=True"):
        estimate_kernel(x, y, 7, gradients=False, mask=torch.ones(2, 1, 32, 32))


def test_edge_map_selects_wide_edges_and_leaves_out_thin_lines():
    """Xu & Jia's r on a wide rectangle and a 1 px line of the same contrast over faint texture: the mask keeps
    the gradients of the rectangle's outline (its windows see one edge) and leaves out the line's (its two edges
    cancel within the window), up to its ends."""
    size = 48
    x = torch.full((1, 3, size, size), 0.3, dtype=torch.float64)
    x[..., 8:40, 6:22] = 0.8
    x[..., 8:40, 34] = 0.8
    x = x + 0.01 * torch.rand(x.shape, generator=gen(25), dtype=torch.float64)
    grey = x.mean(1)[0]
    energy = sum(g.square() for g in grad_images(grey))
    rect = torch.zeros(size, size, dtype=torch.bool)
    rect[4:42, 3:25] = True
    line = torch.zeros(size, size, dtype=torch.bool)
    line[6:42, 32:36] = True

    def kept(m: torch.Tensor, region: torch.Tensor) -> float:
        return float((m * energy)[region].sum() / energy[region].sum())

    m = edge_map(x, 0.25)[0, 0]
    assert m.shape == (size, size) and set(m.unique().tolist()) == {0.0, 1.0}
    assert int(m.sum()) == pytest.approx(0.25 * size * size, abs=3)  # the fraction asked for
    assert kept(m, rect) > 0.99 and kept(m, line) < 0.1
    assert kept(edge_map(x, 0.05)[0, 0], line) == 0
    assert torch.equal(edge_map(x, 1.0), torch.ones(1, 1, size, size, dtype=torch.float64))
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"fraction": 0.3, "window": 4}):
        with pytest.raises(ValueError):
            edge_map(x, **bad)


def test_initialisation_uses_the_edge_selection_on_the_coarse_levels_only():
    x = edges_image(1, size=40, seed=26)
    k = motion_kernel(11, 0.5, generator=gen(27)).double()[None]
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(28), dtype=torch.float64)
    plain = coarse_to_fine_kernel(y, 11, iterations=2)
    selected = coarse_to_fine_kernel(y, 11, iterations=2, edge_fraction=0.3)
    assert not torch.allclose(plain, selected, atol=1e-6)  # the selection acts
    assert torch.equal(coarse_to_fine_kernel(y, 11, iterations=2, edge_fraction=1.0), plain)
    one_level = coarse_to_fine_kernel(y, 11, levels=1, iterations=2, edge_fraction=0.3)
    assert torch.equal(one_level, coarse_to_fine_kernel(y, 11, levels=1, iterations=2))  # finest: every edge
    method = BlindDiffPIR(init_iterations=2, edge_fraction=0.3, centre=False)
    assert torch.equal(method.initial_kernel(y, 11), selected)
    assert method.config()["edge_fraction"] == 0.3 and method.config()["edge_window"] == 5
    for bad in ({"edge_fraction": 0.0}, {"edge_fraction": 2.0}, {"edge_window": 2}):
        with pytest.raises(ValueError, match="edge_"):
            BlindDiffPIR(**bad)


def test_noiseless_kernel_is_recovered_exactly():
    """y = k * x without noise and weights: the least-squares kernel is k itself; the constraints hold for it, so
    the projected iterations leave it there."""
    x = edges_image(2, seed=5)
    k = torch.stack([motion_kernel(9, 0.5, generator=gen(s)).double() for s in (6, 7)])
    y = Blur(k, normalize=False)(x)
    closed = estimate_kernel(x, y, 9, alpha=0.0, beta=0.0, iterations=0, gradients=False)
    assert torch.allclose(closed, k, atol=1e-9)
    # on gradients the mean of k is unseen: sum-to-one fixes it; the iterations converge to k
    iterated = estimate_kernel(x, y, 9, alpha=0.0, beta=0.0, iterations=300, gradients=True)
    assert torch.allclose(iterated, k, atol=2e-4)
    assert float(kernel_ncc(iterated, k).min()) > 0.9999


def test_constrained_kernel_step_meets_the_kkt_conditions():
    """With noise and weights: non-negative, sums to one, zero off the support, and the KKT conditions of
    min f(k) on the simplex hold with f's gradient taken by autograd from a direct implementation of f."""
    size, hw = 9, 24
    x = edges_image(1, seed=8, size=hw)
    k_true = motion_kernel(size, 0.5, generator=gen(9)).double()
    y = Blur(k_true)(x) + 0.01 * torch.randn(x.shape, generator=gen(10), dtype=torch.float64)
    alpha, beta = 1e-3, 1e-3
    k = estimate_kernel(x, y, size, alpha, beta, iterations=1000, threshold=0.0)[0]
    assert (k >= 0).all() and abs(float(k.sum()) - 1) < 1e-12 and k.shape == (size, size)

    energy = sum(float(g.square().sum()) for g in grad_images(x))

    def objective(kk: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(hw, hw, dtype=torch.float64)
        pad = pad.index_put((torch.arange(size)[:, None], torch.arange(size)[None, :]), kk)
        pad = torch.roll(pad, (-(size // 2), -(size // 2)), (0, 1))  # centre to (0, 0)
        kf = torch.fft.fft2(pad)
        conv = [torch.fft.ifft2(torch.fft.fft2(g) * kf).real for g in grad_images(x)]
        data = sum(((c - d) ** 2).sum() for c, d in zip(conv, grad_images(y)))
        return data + alpha * energy * (kk**2).sum() + beta * energy * sum((g**2).sum() for g in grad_images(pad))

    kk = k.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(kk), kk)
    mu = float(g[k > 1e-9].mean())
    scale = float(g.abs().max())
    assert float((g[k > 1e-9] - mu).abs().max()) < 1e-3 * scale  # equal gradient on the active entries
    assert float(g.min()) > mu - 1e-3 * scale  # no entry at zero would lower f
    # and it is no worse than the truth or the projected closed form
    start = estimate_kernel(x, y, size, alpha, beta, iterations=0)[0]
    assert float(objective(k)) <= min(float(objective(k_true)), float(objective(start))) + 1e-9


def test_l0_smooth_keeps_the_edges_and_flattens_the_texture():
    g = gen(31)
    clean = torch.full((1, 3, 32, 32), 0.2, dtype=torch.float64)
    clean[..., 8:24, 4:20] = 0.8  # one rectangle: 2 x 16 edge pixels per direction
    clean[..., 1, 12:30] = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)[:, None]  # a 1-px line, per channel
    textured = clean + 0.02 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    u = l0_smooth(textured, 2e-3)
    assert u.dtype == torch.float64 and u.shape == clean.shape
    # the edges survive in place and the texture is gone: u is close to the clean image ...
    err_u, err_t = (u - clean).abs(), (textured - clean).abs()
    assert float(err_u.mean()) < 0.25 * float(err_t.mean()) and float(err_u.max()) < 0.1

    # ... with about as many gradient pixels as the clean image (the textured one has one everywhere)
    def count(img):
        return int(sum((d.abs() > 1e-2).any(1) for d in grad_images(img)).bool().sum())

    assert count(textured) == 32 * 32 and count(clean) <= count(u) <= 1.5 * count(clean)
    flat = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    assert torch.allclose(l0_smooth(flat, 1e-2), flat)
    with pytest.raises(ValueError, match="positive"):
        l0_smooth(flat, 0.0)


def test_kernel_ncc_and_alignment():
    k = motion_kernel(9, 0.5, generator=gen(11))
    shifted = torch.zeros(13, 13)
    shifted[1:10, 3:12] = k
    assert abs(float(kernel_ncc(shifted, k)[0]) - 1) < 1e-6
    box = torch.full((3, 3), 1 / 9)
    delta = torch.zeros(3, 3)
    delta[0, 2] = 1
    assert abs(float(kernel_ncc(box, delta)[0]) - 1 / 3) < 1e-9  # (1/9) / (1/3 * 1)
    x = torch.rand(2, 3, 20, 20, generator=gen(12))
    moved = torch.roll(x, shifts=(2, -1), dims=(-2, -1))
    a, b, shifts = align_images(moved, x, 3)
    assert shifts == [(2, -1), (2, -1)] and torch.equal(a, b) and a.shape[-2:] == (14, 14)


def test_centre_kernel_puts_the_centre_of_mass_on_the_central_pixel():
    k = torch.zeros(3, 11, 11, dtype=torch.float64)
    k[:, 3:7, 4:9] = torch.rand(3, 4, 5, generator=gen(24), dtype=torch.float64)  # off centre, away from the border
    out = centre_kernel(k)
    t = torch.arange(11, dtype=torch.float64)
    assert torch.allclose(out.sum((1, 2)), torch.ones(3, dtype=torch.float64)) and (out >= 0).all()
    assert torch.allclose((out.sum(2) * t).sum(1), torch.full((3,), 5.0, dtype=torch.float64), atol=1e-9)
    assert torch.allclose((out.sum(1) * t).sum(1), torch.full((3,), 5.0, dtype=torch.float64), atol=1e-9)
    two = torch.zeros(1, 5, 5, dtype=torch.float64)
    two[0, 2, 2:4] = 0.5  # centre of mass half a pixel right: bilinear gives 1/4, 1/2, 1/4
    assert torch.allclose(centre_kernel(two)[0, 2, 1:4], torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


def test_otf_space_crop_inverts_the_padding():
    from diffpir.operators import psf2otf

    k = torch.rand(2, 5, 5, generator=gen(13), dtype=torch.float64)
    full = torch.fft.irfft2(psf2otf(k, 12, 16)[:, 0], s=(12, 16))
    assert torch.allclose(kernel_from_otf_space(full, 5), k)


# ---------------------------------------------------------------------------------------------------------
# The method, end to end on a tiny prior
# ---------------------------------------------------------------------------------------------------------
def test_blind_method_estimates_the_kernel_and_never_reads_it(tiny_prior):
    x = edges_image(2, size=40, seed=14).float()
    k = torch.stack([motion_kernel(11, 0.5, generator=gen(s)) for s in (15, 16)])
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(17))
    method = build_method("blind_diffpir", steps=3, t_start=200)
    assert isinstance(method, BlindDiffPIR) and METHODS["blind_diffpir"] is BlindDiffPIR and method.nfe == 3
    states = []
    res = method.solve(y, BlindBlur(11), tiny_prior, 0.01, generator=[gen(1), gen(2)], callback=states.append)
    assert res.image.shape == x.shape and res.kernel.shape == (2, 11, 11)
    assert (res.kernel >= 0).all() and torch.allclose(res.kernel.sum((1, 2)), torch.ones(2), atol=1e-5)
    assert float(kernel_ncc(res.kernel, k).min()) > 0.8
    # the trajectory sees the kernel of every step
    assert len(states) == 3 and all(isinstance(s, BlindStepState) and s.kernel.shape == (2, 11, 11) for s in states)
    # __call__ is the same restoration; a Blur with any kernel values gives the same result (only its size is read)
    other = Blur(torch.rand(2, 11, 11, generator=gen(18)), normalize=False)
    again = method(y, other, tiny_prior, 0.01, generator=[gen(1), gen(2)])
    assert torch.allclose(again, res.image) and torch.allclose(method.last_kernel, res.kernel)
    # the restoration is consistent with its kernel: the blurred restoration is close to y
    resid = (Blur(res.kernel, normalize=False)(res.image.clamp(0, 1)) - y).square().mean().sqrt()
    assert float(resid) < float((y - x.mean()).square().mean().sqrt()) / 2


def test_kernel_refinement_during_sampling_keeps_the_constraints(tiny_prior):
    x = edges_image(1, size=32, seed=19).float()
    k = motion_kernel(9, 0.5, generator=gen(20))
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(21))
    method = BlindDiffPIR(steps=4, t_start=300, kernel_size=9, init_iterations=0, refine_every=1, refine_below=999)
    states = []
    res = method.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(0), callback=states.append)
    assert [s.refined for s in states] == [True, True, True, False]  # not after the last step
    prev = torch.zeros(1, 9, 9, dtype=torch.float64)
    prev[0, 4, 4] = 1.0  # init_iterations=0: the identity
    for s in states[:3]:  # each refinement is the kernel step given that step's x0_hat, warm-started
        expected = estimate_kernel((s.x0_hat + 1) / 2, y, 9, 1e-3, 1e-3, 30, 0.05, init=prev)
        assert torch.allclose(s.kernel.double(), expected, atol=1e-6)
        prev = s.kernel.double()
    assert torch.equal(states[3].kernel, states[2].kernel)
    assert (res.kernel >= 0).all() and abs(float(res.kernel.sum()) - 1) < 1e-5


@pytest.mark.parametrize("smooth_weight", [0.0, 1e-2])
def test_a_second_pass_takes_the_kernel_step_on_the_first_restoration(tiny_prior, smooth_weight):
    x = edges_image(1, size=32, seed=22).float()
    k = motion_kernel(9, 0.5, generator=gen(23))
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(24))
    one = BlindDiffPIR(steps=3, t_start=200, kernel_size=9, init_iterations=0)
    two = BlindDiffPIR(steps=3, t_start=200, kernel_size=9, init_iterations=0, passes=2, smooth_weight=smooth_weight)
    assert (one.nfe, two.nfe) == (3, 6)
    g = gen(5)
    first = one.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=g)
    states = []
    res = two.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5), callback=states.append)
    # the second pass's kernel: the (centred) kernel step given the first pass's restoration (L0-smoothed with
    # smooth_weight > 0), warm-started
    given = first.image.clamp(0, 1)
    if smooth_weight:
        plain = centre_kernel(estimate_kernel(given, y, 9, 1e-3, 1e-3, 30, 0.05, init=first.kernel.double()))
        given = l0_smooth(given, smooth_weight).float()
    expected = centre_kernel(estimate_kernel(given, y, 9, 1e-3, 1e-3, 30, 0.05, init=first.kernel.double()))
    if smooth_weight:  # the smoothing changes this kernel, so skipping it would fail the check below
        assert float((expected - plain).abs().max()) > 0.1
    assert torch.allclose(res.kernel.double(), expected, atol=1e-6)
    # ... then DiffPIR again, continuing the same generator, with that kernel
    again = one.sampler_for(tiny_prior.schedule)(
        y, Blur(res.kernel, normalize=False), tiny_prior, sigma_n=0.01, generator=g, x_init=one.start()
    )
    assert torch.allclose(res.image, again, atol=1e-5)
    assert len(states) == 3 and all(torch.equal(s.kernel, res.kernel) for s in states)  # one trajectory: the last
    with pytest.raises(ValueError, match="passes"):
        BlindDiffPIR(passes=0)
    with pytest.raises(ValueError, match="smooth_weight"):
        BlindDiffPIR(smooth_weight=-1.0)


def test_estimate_lambda_applies_to_the_passes_that_feed_a_kernel_step_only(tiny_prior):
    x = edges_image(1, size=32, seed=25).float()
    k = motion_kernel(9, 0.5, generator=gen(26))
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(27))
    common = dict(steps=3, t_start=200, kernel_size=9, init_iterations=0, lambda_=7.0)
    # the first pass with lambda_ = 40 (it feeds the kernel step), the second (returned) with lambda_ = 7
    two = BlindDiffPIR(**common, passes=2, estimate_lambda=40.0)
    assert two.nfe == 6 and two.config()["estimate_lambda"] == 40.0
    res = two.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    g = gen(5)
    feeder = BlindDiffPIR(**{**common, "lambda_": 40.0})
    first = feeder.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=g)
    expected = centre_kernel(
        estimate_kernel(first.image.clamp(0, 1), y, 9, 1e-3, 1e-3, 30, 0.05, init=first.kernel.double())
    )
    assert torch.allclose(res.kernel.double(), expected, atol=1e-6)
    final = BlindDiffPIR(**common).sampler_for(tiny_prior.schedule)
    again = final(y, Blur(res.kernel, normalize=False), tiny_prior, sigma_n=0.01, generator=g, x_init=two.start())
    assert torch.allclose(res.image, again, atol=1e-5)
    # the same run with the default (None) differs: the first restoration, and so the kernel, change
    plain = BlindDiffPIR(**common, passes=2).solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    assert float((plain.kernel - res.kernel).abs().max()) > 1e-4
    # one pass: nothing feeds a kernel step, so the setting changes nothing
    one = BlindDiffPIR(**common, estimate_lambda=40.0).solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    ref = BlindDiffPIR(**common).solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    assert torch.equal(one.image, ref.image)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="estimate_lambda"):
            BlindDiffPIR(estimate_lambda=bad)


def test_samples_average_the_last_pass_only(tiny_prior):
    x = edges_image(1, size=32, seed=25).float()
    k = motion_kernel(9, 0.5, generator=gen(26))
    y = Blur(k)(x) + 0.01 * torch.randn(x.shape, generator=gen(27))
    common = dict(steps=3, t_start=200, kernel_size=9, init_iterations=0, passes=2, estimate_lambda=30.0)
    ref = BlindDiffPIR(**common).solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    three = BlindDiffPIR(**common, samples=3)
    assert three.nfe == (1 + 3) * 3 and three.config()["samples"] == 3
    res = three.solve(y, BlindBlur(9), tiny_prior, 0.01, generator=gen(5))
    assert torch.equal(res.kernel, ref.kernel)  # the passes that feed the kernel step take one sample
    # the image: the reference's last pass, then two more draws with the same kernel, continuing the generator
    g = gen(5)
    BlindDiffPIR(**{**common, "passes": 1, "lambda_": 30.0}).solve(y, BlindBlur(9), tiny_prior, 0.01, generator=g)
    final = BlindDiffPIR(**common).sampler_for(tiny_prior.schedule)
    op = Blur(ref.kernel, normalize=False)
    draws = [final(y, op, tiny_prior, sigma_n=0.01, generator=g, x_init=three.start()) for _ in range(3)]
    torch.testing.assert_close(draws[0], ref.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.image, sum(draws) / 3, atol=1e-5, rtol=0)
    assert float((res.image - ref.image).abs().max()) > 1e-3


def test_blind_task_hides_the_kernel():
    spec = Degradation(task="deblur_blind", sigma_n=0.01, kernel_size=15)
    params = synthesize_params(spec, "img", 32, 32, seed=0)
    assert params["kernel"].shape == (15, 15)
    motion = synthesize_params(Degradation(task="deblur_motion", kernel_size=15), "img", 32, 32, seed=0)
    assert torch.equal(params["kernel"], motion["kernel"])  # deblur_motion's kernel generator
    op = build_operator(spec, {k: v[None] for k, v in params.items()})
    assert isinstance(op, BlindBlur) and op.kernel_size == 15
    x = torch.rand(3, 32, 32, generator=gen(22))
    y = degrade(spec, x, params, gen(23))
    expected = Blur(params["kernel"])(x[None])[0] + 0.01 * torch.randn(3, 32, 32, generator=gen(23))
    assert torch.allclose(y, expected)


# ---------------------------------------------------------------------------------------------------------
# The config through the console script, both data modes
# ---------------------------------------------------------------------------------------------------------
def _restore_exe() -> str:
    exe = Path(sys.executable).with_name("diffpir-restore")
    return str(exe) if exe.is_file() else (shutil.which("diffpir-restore") or "diffpir-restore")


FAST = [
    "--model.method.steps",
    "2",
    "--model.lpips",
    "false",
    "--model.method.init_iterations",
    "2",
    "--data.degradation.kernel_size",
    "9",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trajectory.every",
    "1",
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [_restore_exe(), "predict", "--config", str(CONFIG), *args, *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_kernels(out: Path, names: list[str]) -> None:
    for name in names:
        k = np.load(out / "kernels" / f"{name}.npy")
        assert k.ndim == 2 and k.shape == (9, 9) and (k >= 0).all() and abs(float(k.sum()) - 1) < 1e-4
        assert (out / "kernels" / f"{name}.png").is_file()


@pytest.mark.slow  # about a minute per console-script run on a shared 2-core CPU
def test_cli_benchmark_mode(prior_file, tmp_path):
    out = tmp_path / "bench"
    _run(["--model.prior", str(prior_file), "--writer.output_dir", str(out), "--data.limit", "2", "--data.crop", "32"])
    _check_kernels(out, ["astronaut", "chelsea"])
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"psnr", "ssim", "kernel_ncc"} <= set(header) and len(rows) == 3
    ncc = [float(r.split(",")[header.index("kernel_ncc")]) for r in rows[1:]]
    assert all(0 < v <= 1 + 1e-9 for v in ncc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 2 and summary["settings"]["model"]["method"]["class_path"].endswith("BlindDiffPIR")
    # the kernel estimate per logged step in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    tags = ea.Tags()["images"]
    assert "trajectory/astronaut/kernel" in tags and len(ea.Images("trajectory/astronaut/kernel")) == 2


@pytest.mark.slow  # about a minute per console-script run on a shared 2-core CPU
def test_cli_real_mode(prior_file, tmp_path):
    spec = Degradation(task="deblur_blind", sigma_n=0.01, kernel_size=9)
    blurred, sharp, kernels = tmp_path / "blurred", tmp_path / "sharp", tmp_path / "kernels"
    kernels.mkdir()
    for i, name in enumerate(["a", "b"]):
        x = edges_image(1, size=32, seed=30 + i)[0].float()
        params = synthesize_params(spec, name, 32, 32, seed=0)
        y = degrade(spec, x, params, image_generator(0, name, "noise"))
        write_png_atomic(y.clamp(0, 1), blurred / f"{name}.png")
        write_png_atomic(x, sharp / f"{name}.png")
        np.save(kernels / f"{name}.npy", params["kernel"].numpy())
    common = ["--model.prior", str(prior_file), "--data.mode", "real", "--data.images", str(blurred)]
    # without the truth: restorations and kernels, no metrics
    out = tmp_path / "real"
    _run([*common, "--writer.output_dir", str(out)])
    _check_kernels(out, ["a", "b"])
    assert json.loads((out / "summary.json").read_text())["count_with_truth"] == 0
    # with the truth and the true kernels: image metrics and kernel NCC
    out2 = tmp_path / "real_truth"
    _run(
        [
            *common,
            "--data.truth",
            str(sharp),
            "--data.degradation.kernel",
            str(kernels),
            "--writer.output_dir",
            str(out2),
        ]
    )
    _check_kernels(out2, ["a", "b"])
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["count_with_truth"] == 2 and 0 < summary["mean"]["kernel_ncc"] <= 1 + 1e-9


def test_bench_script_smoke(prior_file, tmp_path):
    """bench/blind_deblur.py end to end on stand-in photos and the tiny prior: every row, the goals, the files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("blind_deblur", ROOT / "bench" / "blind_deblur.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i, name in enumerate(["motorcycle", "china", "flower"]):
        write_png_atomic(edges_image(1, size=48, seed=40 + i)[0].float(), tmp_path / "data" / "eval" / f"{name}.png")
    out = tmp_path / "results"
    args = ["--prior", str(prior_file), "--data", str(tmp_path / "data"), "--size", "40", "--crops", "1"]
    args += ["--steps", "2", "--method-args", '{"init_iterations": 1}', "--out-dir", str(out)]
    assert bench.main(args) == 0
    res = json.loads((out / "blind_deblur.json").read_text())
    assert res["meta"]["images"] == 3 and set(res["rows"]) == set(bench.ROWS)
    assert len(res["goals"]) == 3 and (out / "blind_deblur.md").is_file()
    # the config's 7 passes, the last one the mean of 8 samples; the non-blind row takes the same 8 samples
    assert (res["meta"]["nfe"], res["meta"]["nfe_nonblind"]) == ((6 + 8) * 2, 8 * 2)
    from diffpir.metrics import psnr

    crops = dict(bench.crops("eval", tmp_path / "data", 40, 1))
    spec = Degradation(task="deblur_blind", sigma_n=0.01, kernel_size=31, motion_intensity=0.5)
    for row in res["per_image"]:
        assert 0 < row["blind_diffpir"]["kernel_ncc"] <= 1 + 1e-9
        # the blurred row is the CLI's benchmark measurement, scored as documented (aligned, uint8 PSNR)
        x = crops[row["key"]]
        y = degrade(spec, x, synthesize_params(spec, row["key"], 40, 40, 0), image_generator(0, row["key"], "noise"))
        a, b, _ = align_images(y[None].clamp(0, 1), x[None], 4)
        assert abs(row["blurred"]["psnr"] - float(psnr(a, b)[0])) < 1e-9


def test_the_python_example_in_the_docs_uses_the_configs_settings():
    """docs/restoration.md builds BlindDiffPIR "with the config's settings": every setting the config changes from
    the class default is passed, with the config's value (the defaults are one plain pass)."""
    import ast
    import inspect

    import yaml

    text = (ROOT / "docs" / "restoration.md").read_text()
    start = text.index("method = BlindDiffPIR(")
    call = ast.parse(text[start : text.index(")", start) + 1]).body[0].value
    example = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    config = yaml.safe_load((ROOT / "configs" / "restore" / "deblur_blind.yaml").read_text())
    args = config["model"]["method"]["init_args"]
    defaults = {
        **BlindDiffPIR().config(),
        **{
            name: p.default
            for name, p in inspect.signature(BlindDiffPIR).parameters.items()
            if p.default is not p.empty
        },
    }
    changed = {k: v for k, v in args.items() if v != defaults.get(k, object())}
    assert changed, "the config changes no default: the comparison would be empty"
    assert {k: example.get(k) for k in changed} == changed
    assert all(args.get(k, defaults.get(k)) == v for k, v in example.items()), example


def test_batch_invariant_runs_see_the_live_kernel_updates():
    """The sampler's batch_invariant mode splits the batch into per-image operators; the kernel refinements write into
    the live kernel in place, and every per-image operator must see them (a copy once kept the stale kernel: the two
    modes then differed by 0.16)."""
    from diffpir.analytic import GaussianPrior
    from diffpir.methods.blind import _LiveBlur
    from diffpir.operators import gaussian_kernel
    from diffpir.sampler import DiffPIR
    from diffpir.schedule import NoiseSchedule

    f = torch.fft.fftfreq(32, dtype=torch.float64)
    schedule = NoiseSchedule.linear()
    prior = GaussianPrior(0.05 / (f[:, None] ** 2 + f[None, :] ** 2 + 0.01) / 32, schedule)
    x = ((prior.sample(2, 1, torch.Generator().manual_seed(1)) + 1) / 2).float()
    true_kernel = gaussian_kernel(9, 2.0)
    y = Blur(true_kernel)(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    delta = torch.zeros(2, 9, 9)
    delta[:, 4, 4] = 1
    out = {}
    for invariant in (False, True):
        live = _LiveBlur(delta.clone(), normalize=False)

        def refine(state, live=live):  # what BlindDiffPIR's refinement does: a new kernel, in place
            if state.index == 0:
                live.kernel.copy_(true_kernel.expand(2, 9, 9))

        sampler = DiffPIR(schedule, steps=20, t_start=400, init="measurement", batch_invariant=invariant)
        gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        out[invariant] = sampler(y, live, prior, sigma_n=0.01, generator=gens, callback=refine)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    stale = DiffPIR(schedule, steps=20, t_start=400, init="measurement")(
        y,
        Blur(delta),
        prior,
        sigma_n=0.01,
        generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
    )
    assert float((out[True] - stale).abs().max()) > 0.05  # the update reached the per-image operators
