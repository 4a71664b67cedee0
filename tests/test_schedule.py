import numpy as np
import pytest
import torch

from diffpir import NoiseSchedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear()


def test_linear_tables_float64_and_values(sched):
    assert sched.T == 1000
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sigma_bar"):
        assert getattr(sched, name).dtype == torch.float64
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ab, rtol=1e-12)
    np.testing.assert_allclose(sched.sigma_bar.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-12)
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    # alpha_bar at T-1 is tiny: about 4.0e-5 for the linear schedule.
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.035e-5, rel=1e-3)


def test_tables_stay_float64_when_cast(sched):
    s = NoiseSchedule.linear().to(torch.float16)
    assert s.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod)


def test_rejects_bad_betas():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(np.array([0.1, 0.0, 0.2]))


def test_quad_golden_sequences(sched):
    ts = sched.timesteps(100, "quad")
    assert len(ts) == 100
    assert ts[:3] == [999, 899, 857] and ts[-3:] == [10, 5, 0]
    ts = sched.timesteps(20, "quad")
    assert len(ts) == 20
    assert ts[:3] == [999, 770, 675] and ts[-3:] == [54, 26, 0]
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_uniform_sequence_official(sched):
    ts = sched.timesteps(100, "uniform")
    # seq = i * 10 for i < 100, then 999 appended: 101 timesteps, 999 .. 9 then 0.
    assert len(ts) == 101
    assert ts[:3] == [999, 989, 979] and ts[-3:] == [19, 9, 0]


def test_t_start_sequence(sched):
    ts = sched.timesteps(20, "quad", t_start=399)
    assert ts[0] == 399 and ts[-1] == 0 and len(ts) == 20
    with pytest.raises(ValueError, match="t_start"):
        sched.timesteps(10, t_start=1000)
    with pytest.raises(ValueError, match="skip"):
        sched.timesteps(10, skip="cubic")


def test_diffusion_round_trip_and_gather(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = sched.q_sample(x0, t, eps)
    ab = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(sched.x0_from_eps(xt, t, eps), x0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(sched.eps_from_x0(xt, t, x0), eps, atol=1e-4, rtol=1e-4)


def test_timestep_for_sigma(sched):
    sb = sched.sigma_bar
    assert sched.timestep_for_sigma(sb[123].item()).item() == 123
    # sigma 25/255 on [0, 1] is 50/255 on [-1, 1]
    t = sched.timestep_for_sigma(torch.tensor([2 * 25 / 255, 1000.0])).tolist()
    assert abs(sb[t[0]].item() - 2 * 25 / 255) < (sb[t[0] + 1] - sb[t[0] - 1]).item()
    assert t[1] == 999
    # the nearest level, against a brute-force search, below, between and beyond the table (any shape)
    probe = torch.exp(torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)).reshape(1, 4001)
    brute = (probe.reshape(-1, 1) - sb.double()[None, :]).abs().argmin(dim=1).reshape(1, 4001)
    assert torch.equal(sched.timestep_for_sigma(probe), brute)
    assert sched.timestep_for_sigma(0.0).shape == () and int(sched.timestep_for_sigma(0.0)) == 0


def test_respaced_steps_walk_guided_diffusions_respaced_chain(sched):
    from diffpir.methods import respaced_timesteps as from_methods
    from diffpir.schedule import respaced_timesteps

    assert from_methods is respaced_timesteps  # the one definition, still importable where users found it
    assert respaced_timesteps(1000, 1) == [999]
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]
    steps = sched.respaced_steps(4)
    assert [s.t for s in steps] == [999, 666, 333, 0]
    assert [s.t_next for s in steps] == [666, 333, 0, None]
    assert [s.index for s in steps] == [0, 1, 2, 3] and [s.last for s in steps] == [False, False, False, True]
    ab = sched.alphas_cumprod
    assert [s.ab for s in steps] == [ab[t].item() for t in (999, 666, 333, 0)]
    assert [s.ab_next for s in steps] == [ab[t].item() for t in (666, 333, 0)] + [1.0]
    # the full chain is the original one: beta_t = 1 - ab_t / ab_{t-1}
    full = sched.respaced_steps(1000)
    assert len(full) == 1000
    np.testing.assert_allclose([1 - s.ab / s.ab_next for s in full[:-1]], sched.betas.flip(0)[:-1], rtol=1e-9)
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 1000\], got 1001"):
        sched.respaced_steps(1001)
