"""Operators: maths identities over the ``OPERATORS`` registry, closed forms against dense solves, kernels,
masks, MATLAB bicubic, and the error messages users see."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffpir.operators import (
    OPERATORS,
    Bicubic,
    BlindBlur,
    Blur,
    Denoise,
    Downsample,
    Inpaint,
    NonlinearOperator,
    Operator,
    box_mask,
    gaussian_kernel,
    imresize_matrix,
    load_kernel,
    load_mask,
    motion_kernel,
    random_mask,
)

DT = torch.float64
N, C, H, W = 2, 2, 8, 12
LINEAR = [name for name, make in OPERATORS.items() if make().linear]
RHOS = [0.01, 1.0, 10.0, "per-image"]


def build(name: str, h: int = H, w: int = W) -> Operator:
    return OPERATORS[name](n=N, c=C, h=h, w=w, generator=0)


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rho_value(rho: float | str) -> float | torch.Tensor:
    return torch.tensor([0.05, 5.0], dtype=DT) if rho == "per-image" else rho


def measure(op: Operator, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy measurement of a random image and another random image ``z``."""
    x = rand(N, C, h, w, seed=1)
    y = op(x)
    y = y + 0.05 * torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    return y, rand(N, C, h, w, seed=3)


def dense(op: Operator, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix ``[M, D]`` of a linear operator on flattened batches of ``shape``, column by column."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=DT).view(d, *shape)
    return torch.stack([op(basis[i]).flatten() for i in range(d)], dim=1)


def save_png(img: torch.Tensor, path) -> None:
    Image.fromarray(img.numpy()).save(path)


def objective(op: Operator, x, z, y, rho) -> torch.Tensor:
    r = rho.view(-1, 1, 1, 1) if isinstance(rho, torch.Tensor) else rho
    return (y - op(x)).square().sum() + (r * (x - z).square()).sum()


# ------------------------------------------------------------------------------------------------------------
# Identities over the registry
@pytest.mark.parametrize("name", LINEAR)
def test_adjoint(name):
    op = build(name)
    x = rand(N, C, H, W, seed=4)
    y = op(x)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    lhs, rhs = (y * v).sum(), (x * op.adjoint(v)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("name", LINEAR)
def test_prox_equals_dense_solve_and_cg(name, rho):
    h, w = 6, 8
    op = build(name, h, w)
    y, z = measure(op, h, w)
    rho = rho_value(rho)
    hd = dense(op, (N, C, h, w))
    r = (rho.view(-1, 1, 1, 1) * torch.ones(N, C, h, w, dtype=DT)).flatten() if torch.is_tensor(rho) else rho
    a = hd.T @ hd + torch.diag(r * torch.ones(hd.shape[1], dtype=DT))
    expected = torch.linalg.solve(a, hd.T @ y.flatten() + r * z.flatten()).view(N, C, h, w)
    assert torch.allclose(op.prox(z, y, rho), expected, atol=1e-9)
    op.cg_tol, op.cg_max_iter = 1e-12, 1000
    assert torch.allclose(op.prox_cg(z, y, rho), expected, atol=1e-7)


VARIANTS = {
    **OPERATORS,
    "bicubic_kernel": lambda **kw: Bicubic(2, data_step="kernel"),
    "blind_blur": lambda **kw: BlindBlur(3, gaussian_kernel(3, 0.8)),
}


@pytest.mark.parametrize("dtype", [DT, torch.float32])
@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_prox_is_prox_fn_to_the_bit(name, rho, dtype):
    """Each operator writes its proximal step once, as ``prox_fn(y)``; ``prox(z, y, rho)`` is ``prox_fn(y)(z, rho)``
    exactly, and one ``prox_fn(y)`` serves many ``z`` and ``rho``."""
    h, w = 12, 16  # room for the 11x11 kernel of bicubic_kernel
    op = VARIANTS[name](n=N, c=C, h=h, w=w, generator=0)
    y, z = (t.to(dtype) for t in measure(op, h, w))
    rho = rho_value(rho)
    fn = op.prox_fn(y)
    z2 = rand(N, C, h, w, seed=9).to(dtype)
    for zz in (z, z2, z):
        out = fn(zz, rho)
        assert out.dtype == dtype and out.shape == zz.shape
        assert torch.equal(out, op.prox(zz, y, rho)), name
    assert not torch.equal(fn(z, rho), fn(z2, rho))


def test_an_operator_writes_its_prox_once():
    """A subclass implements ``prox_fn`` and gets ``prox``; one that defines ``prox`` is refused at class creation
    with a message saying what to write instead."""

    class Scale(Operator):
        def forward(self, x):
            return 2 * x

        def adjoint(self, y):
            return 2 * y

        def prox_fn(self, y):
            return lambda z, rho: (2 * y + rho * z) / (4 + rho)

    y, z = rand(N, C, H, W, seed=1), rand(N, C, H, W, seed=2)
    assert torch.equal(Scale().prox(z, y, 0.5), (2 * y + 0.5 * z) / 4.5)
    cg = Scale(cg_tol=1e-12).prox_cg(z, y, 0.5)
    assert torch.allclose(Scale().prox(z, y, 0.5), cg, atol=1e-12)
    with pytest.raises(TypeError, match=r"Twice defines prox\(z, y, rho\): implement prox_fn\(y\)"):

        class Twice(Blur):
            def prox(self, z, y, rho):
                return z


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("name", LINEAR)
def test_prox_objective_gradient_vanishes(name, rho):
    op = build(name)
    y, z = measure(op)
    rho = rho_value(rho)
    x = op.prox(z, y, rho).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(op, x, z, y, rho), x)
    z = z.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(objective(op, z, z.detach(), y, rho), z)
    assert grad.abs().max() < 1e-9 * max(1.0, float(grad_z.abs().max()))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_measurement_checks_and_initial_estimate(name):
    op = build(name)
    y = op(rand(N, C, H, W))
    op.check(y)
    x0 = op.initial_estimate(y)
    assert x0.shape == (N, C, H, W) == op.x_shape(y.shape)
    assert x0.dtype == DT and 0 <= float(x0.min()) and float(x0.max()) <= 1


@pytest.mark.parametrize("name", list(OPERATORS))
def test_float32_in_float32_out(name):
    op = build(name)
    x = rand(N, C, H, W).float()
    y = op(x)
    p = op.prox(x, y, 1.0)
    assert y.dtype == p.dtype == torch.float32
    assert torch.allclose(p, op.prox(x.double(), y.double(), 1.0).float(), atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Per-image parameters and definitions
def test_per_image_parameters_act_image_by_image():
    x = rand(N, C, H, W)
    ops = {
        "blur": lambda op, i: Blur(op.kernel[i]),
        "downsample": lambda op, i: Downsample(2, op.kernel[i]),
        "inpaint": lambda op, i: Inpaint(op.mask[i]),
        "inpaint_channels": lambda op, i: Inpaint(op.mask[i]),
    }
    for name, single in ops.items():
        op = build(name)
        y, z = measure(op)
        for i in range(N):
            one = single(op, i)
            assert torch.allclose(op(x)[i], one(x[i : i + 1])[0], atol=1e-12), name
            assert torch.allclose(op.prox(z, y, 0.3)[i], one.prox(z[i : i + 1], y[i : i + 1], 0.3)[0]), name
        assert not torch.allclose(op(x)[0], single(op, 1)(x[:1])[0]), f"{name}: parameters should differ"


def test_blur_is_circular_convolution_with_centred_kernel():
    k = rand(3, 5, seed=7)
    op = Blur(k, normalize=False)
    x = rand(1, 1, H, W)
    expected = torch.zeros_like(x)
    for a in range(-1, 2):
        for b in range(-2, 3):
            expected += k[1 + a, 2 + b] * torch.roll(x, shifts=(a, b), dims=(2, 3))
    assert torch.allclose(op(x), expected, atol=1e-12)


def test_downsample_is_blur_then_top_left_sample():
    k = gaussian_kernel(5, 1.2, dtype=DT)
    x = rand(N, C, H, W)
    assert torch.allclose(Downsample(2, k)(x), Blur(k)(x)[..., ::2, ::2], atol=1e-12)
    assert torch.equal(Downsample(4)(x), x[..., ::4, ::4])


def test_denoise_and_inpaint_prox_formulas():
    y, z = rand(N, C, H, W, seed=1), rand(N, C, H, W, seed=2)
    assert torch.allclose(Denoise().prox(z, y, 3.0), (y + 3 * z) / 4)
    mask = random_mask(H, W, 0.5, generator=0)
    known = mask.bool().expand(N, C, H, W)
    x = Inpaint(mask).prox(z, mask * y, 1e-9)
    assert torch.allclose(x[known], y[known], atol=1e-8)
    assert torch.allclose(x[~known], z[~known])


def test_inpaint_soft_mask_prox_equals_dense_solve():
    h, w = 4, 6
    op = Inpaint(rand(N, 1, h, w, seed=9))
    y, z = rand(N, C, h, w, seed=1), rand(N, C, h, w, seed=2)
    hd = dense(op, (N, C, h, w))
    expected = torch.linalg.solve(
        hd.T @ hd + 0.5 * torch.eye(hd.shape[1], dtype=DT), hd.T @ y.flatten() + 0.5 * z.flatten()
    )
    assert torch.allclose(op.prox(z, y, 0.5), expected.view(N, C, h, w), atol=1e-12)


def test_inpaint_initial_estimate_fills_missing_with_mean_of_known():
    mask = torch.ones(H, W)
    mask[2:5, 3:9] = 0
    y = Inpaint(mask)(rand(1, C, H, W))
    x0 = Inpaint(mask).initial_estimate(y)
    mean = y.sum((2, 3)) / mask.sum()
    assert torch.allclose(x0[:, :, 3, 4], mean)
    assert torch.equal(x0[:, :, 0], y[:, :, 0])


def test_otf_is_cached_and_follows_in_place_kernel_edits():
    op = build("blur")
    x = rand(N, C, H, W)
    assert op.otf(H, W, x) is op.otf(H, W, x)
    y = op(x)
    with torch.no_grad():
        op.kernel.fill_(0).select(1, 1).select(1, 2).fill_(1)  # identity kernel
    assert not torch.allclose(op(x), y)
    assert torch.allclose(op(x), x, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Generic operators
def test_linear_operator_uses_cg():
    op = build("linear")
    op.cg_tol = 1e-12
    y, z = measure(op)
    x = op.prox(z, y, 0.5)
    assert op.last_cg_iterations >= 1
    (grad,) = torch.autograd.grad(objective(op, x.requires_grad_(True), z, y, 0.5), x)
    assert grad.abs().max() < 1e-9


def test_nonlinear_prox_decreases_objective_even_under_no_grad():
    op = build("nonlinear")
    x_true = rand(N, C, H, W, seed=4)
    y, z = op(x_true), rand(N, C, H, W, seed=5)
    with torch.no_grad():
        x = op.prox(z, y, 0.1)
    assert objective(op, x, z, y, 0.1) < 0.5 * objective(op, z, z, y, 0.1)


@pytest.mark.parametrize("rho", [0.5, 2.0, torch.tensor([0.5, 2.0], dtype=DT)])
def test_nonlinear_prox_on_a_linear_function_approaches_the_closed_form(rho):
    # ||K|| <= 1, so each step contracts the error by at least 1 / (1 + rho)
    blur = build("blur")
    y, z = measure(blur)
    op = NonlinearOperator(blur.forward, steps=100)
    assert torch.allclose(op.prox(z, y, rho), blur.prox(z, y, rho), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Kernels
def test_gaussian_kernel_matches_the_formula():
    k = gaussian_kernel(61, 3.0, dtype=DT)
    i = torch.arange(61, dtype=DT) - 30
    ref = torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / 18)
    assert torch.allclose(k, ref / ref.sum(), atol=1e-15)
    assert abs(float(k.sum()) - 1) < 1e-12 and k.argmax() == 30 * 61 + 30


def _centre_of_mass(k: torch.Tensor) -> tuple[float, float]:
    t = torch.arange(k.shape[0], dtype=DT)
    k = k.double()
    return float((k.sum(1) * t).sum() / k.sum()), float((k.sum(0) * t).sum() / k.sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_motion_kernel_properties(seed):
    k = motion_kernel(61, 0.5, generator=seed)
    assert k.shape == (61, 61) and k.dtype == torch.float32
    assert float(k.min()) >= 0 and abs(float(k.double().sum()) - 1) < 1e-5
    cy, cx = _centre_of_mass(k)
    assert abs(cy - 30) < 1e-3 and abs(cx - 30) < 1e-3
    assert (k > 1e-4).sum() > 20  # a stroke, not a dot
    assert torch.equal(k, motion_kernel(61, 0.5, generator=torch.Generator().manual_seed(seed)))


def test_motion_kernel_seeds():
    k0 = motion_kernel(31, 0.5, generator=0)
    assert not torch.equal(k0, motion_kernel(31, 0.5, generator=1))
    g = torch.Generator().manual_seed(0)
    first, second = motion_kernel(31, 0.5, generator=g), motion_kernel(31, 0.5, generator=g)
    assert torch.equal(first, k0) and not torch.equal(first, second)
    state = torch.random.get_rng_state()
    motion_kernel(31, 1.0, generator=5)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG must not be used"


def test_load_kernel_formats(tmp_path):
    k = gaussian_kernel(7, 1.0, dtype=DT)
    np.save(tmp_path / "k.npy", 2 * k.numpy())
    torch.save(2 * k, tmp_path / "k.pt")
    for f in ("k.npy", "k.pt"):
        assert torch.allclose(load_kernel(tmp_path / f).double(), k, atol=1e-7)
    save_png((k / k.max() * 255).round().to(torch.uint8), tmp_path / "k.png")
    img = load_kernel(tmp_path / "k.png")
    assert abs(float(img.sum()) - 1) < 1e-6 and torch.allclose(img.double(), k, atol=2e-3)
    np.save(tmp_path / "even.npy", np.ones((4, 4)))
    with pytest.raises(ValueError, match="even"):
        load_kernel(tmp_path / "even.npy")
    with pytest.raises(ValueError, match="does not exist"):
        load_kernel(tmp_path / "missing.npy")


def test_blur_kernel_not_summing_to_one_is_normalised_with_a_warning():
    k = gaussian_kernel(5, 1.0)
    with pytest.warns(UserWarning, match="sums to .*normalised"):
        op = Blur(2 * k)
    assert torch.allclose(op.kernel[0], k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(Blur(2 * k, normalize=False).kernel[0], 2 * k)
        Blur(k)
    with pytest.raises(ValueError, match="cannot be normalised"):
        Blur(k - k.mean())


# ------------------------------------------------------------------------------------------------------------
# Bicubic (MATLAB imresize)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_matrix_rows_and_constants(scale):
    mat = imresize_matrix(12 * scale, 1 / scale)
    assert mat.shape == (12, 12 * scale)
    assert torch.allclose(mat.sum(1), torch.ones(12, dtype=DT), atol=1e-14)
    op = Bicubic(scale)
    assert torch.allclose(op(torch.full((1, 3, 6 * scale, 9 * scale), 0.3, dtype=DT)), torch.tensor(0.3, dtype=DT))


@pytest.mark.parametrize("scale", [2, 4])
def test_imresize_reproduces_a_ramp_at_interior_points(scale):
    # symmetric cubic weights reproduce linear functions: output pixel i samples the ramp at s (i + 1/2) - 1/2
    n = 16 * scale
    y = imresize_matrix(n, 1 / scale) @ torch.arange(n, dtype=DT)
    centres = scale * (torch.arange(16, dtype=DT) + 0.5) - 0.5
    assert torch.allclose(y[2:-2], centres[2:-2], atol=1e-12)
    assert not torch.allclose(y[:1], centres[:1])  # the mirrored border bends the ramp
    assert torch.allclose(imresize_matrix(10, 1.0), torch.eye(10, dtype=DT))


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_interior_agrees_with_torch_antialias(scale):
    x = rand(2, 3, 10 * scale, 12 * scale).float()
    ours = Bicubic(scale)(x)
    ref = F.interpolate(x, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5)
    assert not torch.allclose(ours[..., 0, :], ref[..., 0, :], atol=1e-5)  # borders: mirror vs truncate


# ------------------------------------------------------------------------------------------------------------
# Masks
def test_box_mask():
    m = box_mask(256, 256, generator=0)
    assert m.shape == (1, 256, 256) and int((m == 0).sum()) == 128 * 128
    rows, cols = torch.nonzero(m[0] == 0, as_tuple=True)
    assert rows.min() >= 16 and rows.max() <= 255 - 16 and cols.min() >= 16 and cols.max() <= 255 - 16
    assert torch.equal(m, box_mask(256, 256, generator=torch.Generator().manual_seed(0)))
    assert any(not torch.equal(m, box_mask(256, 256, generator=s)) for s in (1, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        box_mask(64, 64, box=48, margin=16)


def test_random_mask():
    m = random_mask(64, 64, missing=0.8, generator=0, channels=3)
    assert m.shape == (3, 64, 64) and set(m.unique().tolist()) == {0.0, 1.0}
    assert abs(float(m.mean()) - 0.2) < 0.02
    assert torch.equal(m, random_mask(64, 64, 0.8, generator=0, channels=3))


def test_load_mask(tmp_path):
    m = random_mask(H, W, 0.5, generator=0)
    save_png((m[0] * 255).to(torch.uint8), tmp_path / "m.png")
    assert torch.equal(load_mask(tmp_path / "m.png", size=(H, W)), m)
    with pytest.raises(ValueError, match=rf"mask .* is {W}x{H} \(width x height\) but the images are 16x16"):
        load_mask(tmp_path / "m.png", size=(16, 16))
    # levels 0 and 1 (mask.astype(np.uint8) saved as it is; black to the eye) are that 0/1 mask, 8 or 16 bits
    save_png(m[0].to(torch.uint8), tmp_path / "m01.png")
    assert torch.equal(load_mask(tmp_path / "m01.png"), m)
    Image.fromarray(m[0].numpy().astype(np.uint16)).save(tmp_path / "m01_16.png")
    assert torch.equal(load_mask(tmp_path / "m01_16.png"), m)
    # a dark grey mask is still thresholded at one half (level 2 of 255 is not a 0/1 mask)
    save_png((m[0] * 2).to(torch.uint8), tmp_path / "m02.png")
    with pytest.warns(UserWarning, match="has no known pixel"):
        assert not load_mask(tmp_path / "m02.png").any()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read mask file"):
        load_mask(tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------------------
# Errors users meet
def test_errors_name_the_problem():
    x = rand(N, C, H, W)
    with pytest.raises(ValueError, match="kernel 9x9 is larger than the image 8x12"):
        Blur(gaussian_kernel(9, 1.0))(x)
    with pytest.raises(ValueError, match="kernel 9x9 is larger than the 8x12 image"):
        Downsample(2, gaussian_kernel(9, 1.0)).check(rand(N, C, 4, 6))
    with pytest.raises(ValueError, match="size 4x4 is even"):
        Blur(torch.ones(4, 4) / 16)
    with pytest.raises(ValueError, match="NaN or infinite"):
        Blur(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="scale 3 does not divide the image size 8x12"):
        Downsample(3)(x)
    with pytest.raises(ValueError, match="scale 5 does not divide"):
        Bicubic(5)(x)
    with pytest.raises(ValueError, match="mask size 8x8 does not match the measurement size 8x12"):
        Inpaint(torch.ones(8, 8)).check(x)
    with pytest.raises(ValueError, match="mask has 2 channels but the image has 3"):
        Inpaint(torch.ones(N, 2, H, W))(rand(N, 3, H, W))
    with pytest.raises(ValueError, match="kernel batch 2 does not match the image batch 3"):
        build("blur").check(rand(3, C, H, W))
    with pytest.raises(ValueError, match="mask batch 2 does not match the image batch 1"):
        build("inpaint").check(rand(1, C, H, W))
    bad = x.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="y contains 1 NaN"):
        Denoise().check(bad)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*y\[None\]"):
        Denoise().check(x[0])
    with pytest.raises(ValueError, match="rho must be a float or a tensor of shape \\[N\\] = \\[2\\]"):
        Denoise().prox(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="rho must be positive"):
        Denoise().prox(x, x, 0.0)
    with pytest.raises(ValueError, match="mask values must lie in"):
        Inpaint(torch.full((H, W), 2.0))


def test_kernel_operators_work_when_built_under_inference_mode():
    """Trainer.predict builds operators under inference mode: the transfer-function cache must cope."""
    k = gaussian_kernel(5, 1.0).double()
    x = rand(1, 1, 16, 16, seed=6)
    ref = Blur(k).prox(x, Blur(k)(x), 0.5)
    with torch.inference_mode():
        op = Blur(k)
        out = op.prox_fn(op(x))(x, 0.5)
    torch.testing.assert_close(out, ref)


def test_nonlinear_prox_under_inference_mode():
    """Lightning's predict runs the data step under torch.inference_mode, where autograd is off: the gradient-step
    prox leaves it and gives what it gives outside."""
    g = torch.Generator().manual_seed(0)
    op = NonlinearOperator(lambda x: 0.5 * torch.tanh(2 * x), steps=20)
    x, z = torch.rand(1, 3, 8, 8, generator=g), torch.rand(1, 3, 8, 8, generator=g)
    y = op(x)
    expected = op.prox(z, y, 0.1)
    with torch.inference_mode():
        got = op.prox(z.clone(), y.clone(), torch.tensor([0.1]))
    torch.testing.assert_close(got, expected)
    assert not torch.equal(expected, z)  # it moved
