"""Training recipes: v-prediction (a v-prior is an exact eps-model), Min-SNR-gamma weights (the x0-space weight in
either parameterisation), the restoration-weighted timestep distribution, and a v-prior through fit, export and
load. Tiny nets, exact maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from torch import nn

from diffpir.models import build_unet
from diffpir.prior import Prior
from diffpir.priorfile import export_prior, load_prior
from diffpir.schedule import NoiseSchedule
from diffpir.training import DiffusionModule
from diffpir.training.module import loss_weights, sample_timesteps


class OracleNet(nn.Module):
    """Returns a fixed tensor whatever the input: the true eps or v of one (x0, noise) pair."""

    in_channels = out_channels = 3
    size_multiple = 1
    has_attention = False
    image_size = 8

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value + 0 * self.dummy


def _draw(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])[:n]
    return x0, noise, t


def test_v_prior_is_the_exact_eps_model():
    sched = NoiseSchedule.linear()
    x0, noise, t = _draw()
    x_t = sched.q_sample(x0, t, noise)
    a = sched.extract("sqrt_alphas_cumprod", t, x0)
    b = sched.extract("sqrt_one_minus_alphas_cumprod", t, x0)
    v = a * noise - b * x0
    prior = Prior(OracleNet(v), sched, prediction="v")
    torch.testing.assert_close(prior.eps(x_t, t), noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.x0(x_t, t), x0, atol=1e-3, rtol=0)  # 1/sqrt(ab) amplifies at t = 999
    # The same oracle read as an eps-net is wrong: the flag matters.
    assert (Prior(OracleNet(v), sched).eps(x_t, t) - noise).abs().max() > 0.1
    with pytest.raises(ValueError, match="prediction"):
        Prior(OracleNet(v), sched, prediction="x0")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_is_the_x0_weight_in_either_parameterisation(prediction: str):
    """Min-SNR-gamma weights the x0 error by min(SNR, gamma): w * |target error|^2 == min(SNR, gamma) |x0 error|^2."""
    sched = NoiseSchedule.linear()
    x0, noise, t = _draw()
    x_t = sched.q_sample(x0, t, noise)
    a = sched.extract("sqrt_alphas_cumprod", t, x0)
    b = sched.extract("sqrt_one_minus_alphas_cumprod", t, x0)
    target = noise if prediction == "eps" else a * noise - b * x0
    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    eps_hat = pred if prediction == "eps" else b * x_t + a * pred
    x0_hat = sched.x0_from_eps(x_t, t, eps_hat)
    ab = sched.extract("alphas_cumprod", t, x0).flatten().double()
    snr = ab / (1 - ab)
    w = loss_weights(snr, prediction, "min_snr", 5.0)
    lhs = w * (pred - target).double().pow(2).flatten(1).sum(1)
    rhs = snr.clamp(max=5.0) * (x0_hat - x0).double().pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=1e-6)
    assert torch.equal(loss_weights(snr, prediction, "none", 5.0), torch.ones_like(snr))


def test_quad_timesteps_follow_the_restoration_density():
    T, n = 1000, 200_000
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(n, T, g, "uniform")
    quad = sample_timesteps(n, T, torch.Generator().manual_seed(0), "quad", mix=1.0)
    mixed = sample_timesteps(n, T, torch.Generator().manual_seed(0), "quad", mix=0.5)
    for t in (uniform, quad, mixed):
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    # P(t < T/4): uniform 1/4; quad (t = T u^2) sqrt(1/4) = 1/2; the 50/50 mix 3/8. Binomial sd < 0.0012.
    share = [float((x < T // 4).double().mean()) for x in (uniform, quad, mixed)]
    assert share == pytest.approx([0.25, 0.5, 0.375], abs=0.006)
    # Uniform sampling draws what the DDPM recipe always drew (old runs resume on the same stream).
    assert torch.equal(uniform, torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(0)))


def test_lognormal_timesteps_follow_edm_noise_levels():
    """``"lognormal"``: ln sigma ~ N(-1.2, 1.2^2) (EDM) on the scale of sigma_bar_t = sqrt((1 - ab_t) / ab_t), the
    nearest timestep. So P(t <= k) = Phi((ln m_k + 1.2) / 1.2) with m_k the midpoint of sigma_bar_k and
    sigma_bar_{k+1}: checked at several k against the exact normal CDF (binomial sd < 0.0012)."""
    T, n = 1000, 200_000
    sched = NoiseSchedule.linear()
    sb = sched.sigma_bar
    t = sample_timesteps(n, T, torch.Generator().manual_seed(0), "lognormal", mix=1.0, schedule=sched)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    normal = torch.distributions.Normal(torch.tensor(-1.2, dtype=torch.float64), 1.2)

    def below(k: int) -> float:  # P(t <= k)
        return float(normal.cdf(torch.log(0.5 * (sb[k] + sb[k + 1]))))

    for k in (5, 40, 88, 200, 485):
        assert float((t <= k).double().mean()) == pytest.approx(below(k), abs=0.006), k
    # the mix: half uniform; the other half as above
    mixed = sample_timesteps(n, T, torch.Generator().manual_seed(0), "lognormal", mix=0.5, schedule=sched)
    assert float((mixed <= 88).double().mean()) == pytest.approx(0.5 * below(88) + 0.5 * 89 / T, abs=0.006)
    # the module draws its training timesteps so, from its own schedule
    module = DiffusionModule(build_unet("tiny"), ema_decay=None, timestep_sampling="lognormal", timestep_mix=1.0)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = module.model_step(x, torch.Generator().manual_seed(1))
    expected = sample_timesteps(4, T, torch.Generator().manual_seed(1), "lognormal", mix=1.0, schedule=sched)
    assert torch.equal(out["t"], expected)
    with pytest.raises(ValueError, match="needs the schedule"):
        sample_timesteps(4, T, torch.Generator(), "lognormal")
    with pytest.raises(ValueError, match="lognormal"):
        sample_timesteps(4, T, torch.Generator(), "cosine")
    with pytest.raises(ValueError, match="timestep_sampling"):
        DiffusionModule(build_unet("tiny"), timestep_sampling="cosine")


def test_v_training_loss_is_zero_for_the_oracle_and_validation_reports_eps_mse():
    sched = NoiseSchedule.linear()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # Recompute the module's own draws for this generator seed, then give the net the true v.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    x0 = x * 2 - 1
    v = sched.extract("sqrt_alphas_cumprod", t, x0) * noise - sched.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
    for weighting in ("none", "min_snr"):
        module = DiffusionModule(OracleNet(v), ema_decay=None, prediction="v", loss_weighting=weighting)
        out = module.model_step(x, torch.Generator().manual_seed(1))
        assert torch.equal(out["t"], t)
        assert float(out["loss"].detach()) < 1e-10
    module.eval()  # validation: the eps-MSE of the converted eps, also zero for the oracle
    out = module.model_step(x, torch.Generator().manual_seed(1))
    assert float(out["loss"]) < 1e-8


def test_v_prior_fits_exports_and_loads_as_an_eps_model(tmp_path: Path):
    from torch.utils.data import DataLoader

    net = build_unet("tiny")
    module = DiffusionModule(net, ema_decay=0.9, prediction="v", loss_weighting="min_snr", timestep_sampling="quad")
    data = DataLoader(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), batch_size=4)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, data)
    assert module.prior_spec()["prediction"] == "v"
    path = export_prior(module.eval_prior, None, tmp_path / "v.safetensors")
    prior = load_prior(path)
    assert prior.prediction == "v"
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(prior.eps(x_t, t), module.eval_prior.eval()(x_t, t), atol=1e-5, rtol=0)
    # eps priors keep files without the key (as before), and load as eps
    eps_path = export_prior(Prior(build_unet("tiny")), None, tmp_path / "eps.safetensors")
    assert load_prior(eps_path).prediction == "eps"
