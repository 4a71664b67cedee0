"""DiffPIR sampler: exactness against an analytic Gaussian prior, determinism, batching, callbacks, errors."""

import math
import warnings

import pytest
import torch

from diffpir import DiffPIR, NoiseSchedule
from diffpir.analytic import GaussianPrior, power_law_spectrum
from diffpir.operators import Blur, Denoise, Inpaint, gaussian_kernel

H = W = 32


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear()


@pytest.fixture(scope="module")
def prior(sched):
    return GaussianPrior(power_law_spectrum(H, W), sched)


def otf_of(kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DFT of the centred kernel padded to [h, w] with its centre at (0, 0) (written here independently)."""
    kh, kw = kernel.shape
    pad = torch.zeros(h, w, dtype=torch.float64)
    pad[:kh, :kw] = kernel.double()
    return torch.fft.fft2(torch.roll(pad, (-(kh // 2), -(kw // 2)), (0, 1)))


@pytest.fixture(scope="module")
def deblur_problem(prior):
    g = torch.Generator().manual_seed(1234)
    kernel = gaussian_kernel(9, 1.5).double()
    u = (prior.sample(8, generator=g) + 1) / 2  # truth on the [0, 1] scale
    sigma_n = 0.05
    y = torch.fft.ifft2(torch.fft.fft2(u) * otf_of(kernel, H, W)).real
    y = y + sigma_n * torch.randn(u.shape, generator=g, dtype=torch.float64)
    pm = prior.posterior_mean_deblur(y, otf_of(kernel, H, W), sigma_n)
    return u, y, Blur(kernel), pm, sigma_n


def mse(a, b):
    return ((a - b) ** 2).mean().item()


def test_operator_blur_matches_independent_fft(deblur_problem):
    u, _, op, _, _ = deblur_problem
    ref = torch.fft.ifft2(torch.fft.fft2(u) * otf_of(gaussian_kernel(9, 1.5), H, W)).real
    torch.testing.assert_close(op(u), ref, atol=1e-6, rtol=1e-6)


def test_posterior_mean_beats_measurement(deblur_problem):
    u, y, _, pm, _ = deblur_problem
    assert mse(pm, u) < 0.8 * mse(y, u)


def test_diffpir_near_exact_posterior_on_gaussian_prior(sched, prior, deblur_problem):
    """lambda 7, zeta 1, 100 quad steps: the mean of 4 samples within 1.3x of the exact posterior mean's MSE,
    each single sample within 2.0x (an exact posterior sampler gives 1.25x and 2x in expectation)."""
    u, y, op, pm, sigma_n = deblur_problem
    sampler = DiffPIR(sched, steps=100, lambda_=7.0, zeta=1.0, skip="quad")
    samples = [sampler(y, op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    ref = mse(pm, u)
    for x in samples:
        assert mse(x, u) < 2.0 * ref
    assert mse(sum(samples) / 4, u) < 1.3 * ref
    # and it is a real restoration: much better than the blurred measurement
    assert mse(sum(samples) / 4, u) < 0.8 * mse(y, u)


def test_deterministic_when_zeta_and_eta_zero(sched, prior, deblur_problem):
    _, y, op, _, sigma_n = deblur_problem
    sampler = DiffPIR(sched, steps=10, zeta=0.0, eta=0.0)
    g = torch.Generator().manual_seed(5)
    a = sampler(y, op, prior, sigma_n=sigma_n, generator=g)
    # only the start draws noise: the generator advanced by exactly one image-shaped draw
    g_ref = torch.Generator().manual_seed(5)
    torch.randn(y.shape, generator=g_ref, dtype=y.dtype)
    assert torch.equal(g.get_state(), g_ref.get_state())
    b = sampler(y, op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_seed_zero_is_a_seed_and_seeds_differ(sched, prior, deblur_problem):
    _, y, op, _, sigma_n = deblur_problem
    sampler = DiffPIR(sched, steps=10, zeta=0.5)
    a0 = sampler(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(0))
    b0 = sampler(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(0))
    a1 = sampler(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a0, b0)
    assert not torch.allclose(a0, a1)


def test_batch_equals_one_by_one_with_per_image_generators(sched, prior):
    g = torch.Generator().manual_seed(7)
    u = (prior.sample(3, generator=g) + 1) / 2
    kernels = torch.stack([gaussian_kernel(5, s) for s in (0.8, 1.2, 2.0)]).double()
    op = Blur(kernels)
    y = op(u)
    sampler = DiffPIR(sched, steps=12, zeta=0.3, eta=0.2)
    batch = sampler(y, op, prior, sigma_n=0.02, generator=[torch.Generator().manual_seed(100 + i) for i in range(3)])
    for i in range(3):
        one = sampler(
            y[i : i + 1],
            Blur(kernels[i]),
            prior,
            sigma_n=0.02,
            generator=torch.Generator().manual_seed(100 + i),
        )
        torch.testing.assert_close(batch[i : i + 1], one, atol=1e-12, rtol=0)


def test_callback_sees_golden_steps_and_rhos(sched, prior, deblur_problem):
    _, y, op, _, sigma_n = deblur_problem
    seen = []
    sampler = DiffPIR(sched, steps=20, lambda_=7.0, zeta=0.3)
    sampler(y[:2], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [s.t for s in seen] == sched.timesteps(20, "quad")
    assert [s.t for s in seen][:3] == [999, 770, 675]
    sb = sched.sigma_bar
    for s in seen:
        assert s.rho == pytest.approx(7.0 * 0.05**2 / sb[s.t].item() ** 2, rel=1e-12)
        assert s.x_t.shape == s.x0_pred.shape == s.x0_hat.shape == y[:2].shape
    assert torch.equal(seen[-1].x0_hat, seen[-1].x0_pred)  # no data step on the last step
    assert not torch.equal(seen[0].x0_hat, seen[0].x0_pred)


def test_data_step_is_the_operator_prox(sched, prior, deblur_problem):
    """x0_hat = prox(x0_pred) on the [0, 1] scale with rho_t (the official convention)."""
    _, y, op, _, sigma_n = deblur_problem
    seen = []
    DiffPIR(sched, steps=5)(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator(), callback=seen.append)
    s = seen[1]
    expect = 2 * op.prox((s.x0_pred + 1) / 2, y[:1], s.rho) - 1
    torch.testing.assert_close(s.x0_hat, expect)


def test_guidance_zero_ignores_the_measurement(sched, prior, deblur_problem):
    _, y, op, _, sigma_n = deblur_problem
    sampler = DiffPIR(sched, steps=8, zeta=0.5, guidance_scale=0.0)
    a = sampler(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(3))
    b = sampler(y[1:2], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_t_start_diffuses_the_measurement(sched, prior, deblur_problem):
    _, y, op, _, sigma_n = deblur_problem
    seen = []
    sampler = DiffPIR(sched, steps=10, t_start=200, zeta=0.0)
    sampler(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert seen[0].t == 200 and sampler.nfe == 10
    noise = torch.randn(y[:1].shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    # the official start: y is x at t_y (sigma_bar[t_y] ~ 2 sigma_n), diffused from t_y to t_start
    ab = sched.alphas_cumprod.double()
    t_y = int((((1 - ab) / ab).sqrt() - 2 * sigma_n).abs().argmin())
    assert 0 < t_y < 200
    ratio = math.sqrt(ab[200] / ab[t_y])
    std = math.sqrt((1 - ab[200]) - ratio**2 * (1 - ab[t_y]))
    torch.testing.assert_close(seen[0].x_t, ratio * (2 * y[:1] - 1) + std * noise)


def test_denoising_started_at_the_noise_level_of_y_adds_no_noise(sched, prior):
    g = torch.Generator().manual_seed(5)
    u = torch.rand(1, 3, H, W, generator=g, dtype=torch.float64)
    sigma_n = 0.1
    y = u + sigma_n * torch.randn(u.shape, generator=g, dtype=u.dtype)
    t_y = int(sched.timestep_for_sigma(2 * sigma_n))
    seen = []
    DiffPIR(sched, steps=4, t_start=t_y)(y, Denoise(), prior, sigma_n=sigma_n, generator=g, callback=seen.append)
    torch.testing.assert_close(seen[0].x_t, 2 * y.clamp(0, 1) - 1)  # y (its initial estimate) is already x at t_y


def test_classical_init_diffuses_the_classical_restoration(sched, prior, deblur_problem):
    from diffpir.methods import Classical, DiffPIRMethod

    _, y, op, _, sigma_n = deblur_problem
    seen = []
    sampler = DiffPIR(sched, steps=10, t_start=200, zeta=0.0, init="classical")
    with pytest.raises(ValueError, match="init='classical' starts from a classical restoration.*x_init"):
        sampler(y[:1], op, prior, sigma_n=sigma_n)  # the sampler knows no task: the caller gives the start
    method = DiffPIRMethod(steps=10, t_start=200, zeta=0.0, init="classical")
    method(y[:1], op, prior, sigma_n=sigma_n, generator=torch.Generator().manual_seed(0), callback=seen.append)
    est = Classical()(y[:1], op, None, sigma_n).clamp(0, 1)
    assert (est - y[:1]).abs().max() > 0.05  # Wiener deconvolution, not the blurred measurement
    noise = torch.randn(y[:1].shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    ab = sched.alphas_cumprod[200].item()
    torch.testing.assert_close(seen[0].x_t, math.sqrt(ab) * (2 * est - 1) + math.sqrt(1 - ab) * noise)
    with pytest.raises(ValueError, match="init must be one of"):
        DiffPIR(sched, init="wiener")


def test_inpainting_keeps_known_pixels_close(sched, prior):
    g = torch.Generator().manual_seed(11)
    u = (prior.sample(2, generator=g) + 1) / 2
    mask = (torch.rand(2, 1, H, W, generator=g) > 0.5).double()
    op = Inpaint(mask)
    y = op(u)
    x = DiffPIR(sched, steps=20, lambda_=1.0, zeta=1.0, clip_denoised=False)(y, op, prior, sigma_n=0.0, generator=g)
    known = mask.expand_as(u).bool()
    assert (x - u)[known].abs().max() < 0.05
    assert mse(x, u) < 0.5 * mse(y, u)


def test_output_selects_the_last_prediction_its_prox_or_the_last_iterate(sched, prior):
    g = torch.Generator().manual_seed(12)
    u = (prior.sample(1, generator=g) + 1) / 2
    mask = (torch.rand(1, 1, H, W, generator=g) > 0.5).double()
    op, y = Inpaint(mask), Inpaint(mask)(u)
    runs = {}
    for output in ("x0_pred", "x0_hat", "iterate"):
        seen = []
        sampler = DiffPIR(sched, steps=6, lambda_=1.0, zeta=1.0, output=output)
        x = sampler(y, op, prior, sigma_n=0.0, generator=torch.Generator().manual_seed(3), callback=seen.append)
        runs[output] = (x, seen[-1])
    (x_pred, last_pred), (x_hat, last_hat), (x_it, last_it) = runs["x0_pred"], runs["x0_hat"], runs["iterate"]
    torch.testing.assert_close(last_hat.x0_pred, last_pred.x0_pred)  # same path up to the last step
    torch.testing.assert_close(last_it.x_t, last_pred.x_t)
    torch.testing.assert_close(x_pred, (last_pred.x0_pred + 1) / 2)  # the last prediction
    torch.testing.assert_close(x_hat, op.prox((last_hat.x0_pred + 1) / 2, y, last_hat.rho))  # Algorithm 1
    assert last_it.t == 0 and last_it.t_next is None
    torch.testing.assert_close(x_it, (last_it.x_t + 1) / 2)  # the official scripts: the last iterate x_0
    for x, last in runs.values():  # the last step's x0_hat is the result (the trajectory logger's last PSNR)
        torch.testing.assert_close(x, (last.x0_hat + 1) / 2)
    known = mask.expand_as(u).bool()
    # known pixels kept up to rho / (1 + rho) of the gap (rho ~ 0.01 at t = 0 for sigma_n = 0)
    assert (x_hat - u)[known].abs().max() < 0.01 < 0.05 < (x_pred - u)[known].abs().max()
    with pytest.raises(ValueError, match="output must be one of"):
        DiffPIR(sched, output="x0")


def test_batch_invariant_is_bitwise_the_image_alone(sched, prior):
    """The exact option: each image runs alone in lockstep, with its own operator (per-image kernels)."""
    g = torch.Generator().manual_seed(21)
    u = (prior.sample(3, generator=g) + 1) / 2
    kernels = torch.stack([gaussian_kernel(9, s) for s in (1.0, 1.5, 2.0)]).double()
    op = Blur(kernels)
    y = op(u) + 0.05 * torch.randn(u.shape, generator=g, dtype=torch.float64)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    sampler = DiffPIR(sched, steps=8, zeta=0.5, eta=0.3, batch_invariant=True)
    seen = []
    batch = sampler(y, op, prior, generator=gens(), callback=seen.append)
    assert len(seen) == 8 and seen[0].x_t.shape == (3, 1, H, W)
    for i in range(3):
        alone = sampler(y[i : i + 1], Blur(kernels[i]), prior, generator=gens()[i : i + 1])
        assert torch.equal(batch[i : i + 1], alone)
    # the batched path gives the same images to round-off
    batched = DiffPIR(sched, steps=8, zeta=0.5, eta=0.3)(y, op, prior, generator=gens())
    torch.testing.assert_close(batched, batch, atol=1e-9, rtol=0)


def test_one_step_from_pure_noise_is_refused_and_few_steps_warn_with_the_fix(sched):
    with pytest.raises(ValueError, match="evaluates the prior once, on pure noise.*init='classical'"):
        DiffPIR(sched, steps=1)
    with pytest.warns(UserWarning, match="far from converged.*_fast.yaml.*--model.method.init classical"):
        DiffPIR(sched, steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffPIR(sched, steps=20)  # enough steps: no warning
        DiffPIR(sched, steps=1, t_start=100, init="classical")  # one denoising step of a late start is allowed
        DiffPIR(sched, steps=5, t_start=400, init="classical")


def test_official_start_is_the_unclamped_measurement_diffused_from_t_y(sched, prior):
    """init="official" at t_start = 999: sqrt(ab_999) / sqrt(ab_t_y) (2 y - 1) plus the missing noise, y unclamped."""
    y = torch.full((1, 1, H, W), 1.2, dtype=torch.float64)  # above 1: a noisy measurement is not clamped
    seen = []
    DiffPIR(sched, steps=2, init="official")(
        y, Denoise(), prior, sigma_n=0.05, generator=torch.Generator().manual_seed(0), callback=seen.append
    )
    sa, s1a = sched.host("sqrt_alphas_cumprod"), sched.host("sqrt_one_minus_alphas_cumprod")
    t_y = int(sched.timestep_for_sigma(0.1))
    ratio = sa[999] / sa[t_y]
    noise = torch.randn((1, 1, H, W), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ratio * (2 * y - 1) + math.sqrt(s1a[999] ** 2 - ratio**2 * s1a[t_y] ** 2) * noise
    torch.testing.assert_close(seen[0].x_t, expected)


def test_bad_input_is_refused_with_a_clear_message(sched, prior, deblur_problem):
    _, y, op, _, _ = deblur_problem
    sampler = DiffPIR(sched, steps=5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        sampler(y[0], op, prior)
    bad = y[:1].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="(?i)finite|nan"):
        sampler(bad, Denoise(), prior)
    with pytest.raises(ValueError, match="sigma_n"):
        sampler(y[:1], op, prior, sigma_n=-1.0)
    with pytest.raises(ValueError, match="generators"):
        sampler(y[:2], op, prior, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="zeta"):
        DiffPIR(sched, zeta=1.5)


def test_settings_are_written_once_and_round_trip_through_the_methods(sched):
    """The sampler's signature is the one list of its settings: DiffPIRMethod and BlindDiffPIR show it (their
    signatures are derived, with BlindDiffPIR's own defaults), pass it on, and refuse a setting it lacks."""
    import inspect

    from diffpir.methods import BlindDiffPIR, DiffPIRMethod

    assert tuple(inspect.signature(DiffPIR).parameters)[1:] == DiffPIR.PARAMS
    for method in (DiffPIRMethod, BlindDiffPIR):
        params = inspect.signature(method).parameters
        assert [n for n in params if n in DiffPIR.PARAMS] == list(DiffPIR.PARAMS), method
        assert all(params[n].annotation == DiffPIR.PARAMETERS[n].annotation for n in DiffPIR.PARAMS)
    assert inspect.signature(DiffPIRMethod).parameters["zeta"].default == 0.3
    assert inspect.signature(BlindDiffPIR).parameters["zeta"].default == 1.0 == BlindDiffPIR().config()["zeta"]
    assert inspect.signature(BlindDiffPIR).parameters["kernel_size"].default is None
    sampler = DiffPIR(sched, steps=7, lambda_=3.0, zeta=0.9, t_start=500, init="classical", output="x0_hat")
    assert DiffPIR(sched, **sampler.config()).config() == sampler.config()
    method = DiffPIRMethod(**sampler.config())
    assert method.config() == {**sampler.config(), "samples": 1} and sampler.config() != DiffPIR(sched).config()
    assert DiffPIRMethod(**method.config()).config() == method.config()  # a config rebuilds its method
    assert method.sampler_for(sched).timesteps == sampler.timesteps
    blind = BlindDiffPIR(kernel_size=9, **sampler.config())
    assert {k: blind.config()[k] for k in DiffPIR.PARAMS} == sampler.config() and blind.config()["kernel_size"] == 9
    with pytest.raises(TypeError, match="stepz"):
        DiffPIRMethod(stepz=3)


def test_one_input_check_for_the_sampler_and_every_method(sched, prior, deblur_problem):
    """Issue 15: the input checks have one home (``sampler.check_inputs``: ``op.check`` and sigma_n); the sampler
    and every method refuse bad input with the same message."""
    import re

    from diffpir.methods import METHODS
    from diffpir.sampler import check_inputs

    _, y, op, _, _ = deblur_problem
    restorers = [DiffPIR(sched, steps=20), *[cls() for name, cls in METHODS.items() if name != "dpir_ffdnet"]]
    for bad, sigma_n in ((y[0], 0.05), (y[:1].long(), 0.05), (y[:1], -1.0), (y[:1], float("nan"))):
        with pytest.raises((ValueError, TypeError)) as ref:
            check_inputs(bad, op, sigma_n)
        for restore in restorers:
            with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
                restore(bad, op, prior, sigma_n=sigma_n)
