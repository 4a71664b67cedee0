"""The Prior wrapper (eps / x0 / denoise, padding) and safe loading / export of prior files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Malicious

import diffpir.priorfile as prior_mod
from diffpir import NoiseSchedule
from diffpir.checkpoints import atomic_save, safe_torch_load
from diffpir.models import build_unet
from diffpir.prior import Prior
from diffpir.priorfile import export_prior, load_prior, schedule_from_dict, schedule_to_dict

FIXTURES = Path("/work/shared/fixtures")
if not FIXTURES.is_dir():
    FIXTURES = Path(__file__).parent / "fixtures"


def randomize_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1))
    return net


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear()


@pytest.fixture(scope="module")
def small_prior(sched):
    return Prior(randomize_(build_unet("small"), seed=1).eval(), sched)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- eps / x0 / denoise --------------------------------------------------------------------------------------
def test_learn_sigma_eps_is_first_channels(sched):
    net = randomize_(build_unet("tiny", out_channels=6), seed=2).eval()
    prior = Prior(net, sched)
    x, t = rand(2, 3, 16, 16), torch.tensor([5, 600])
    with torch.no_grad():
        full = net(x, t)
        assert torch.equal(prior.eps(x, t), full[:, :3])
        assert torch.equal(prior(x, t), full[:, :3])
    with pytest.raises(ValueError, match="must output C"):
        Prior(build_unet("tiny", out_channels=4), sched)


def test_x0_eps_round_trip(small_prior, sched):
    x_t, t = rand(2, 3, 32, 32, seed=3), torch.tensor([50, 900])
    with torch.no_grad():
        eps = small_prior.eps(x_t, t)
        x0 = small_prior.x0(x_t, t)
    torch.testing.assert_close(sched.eps_from_x0(x_t, t, x0), eps, rtol=1e-4, atol=1e-4)
    ab = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x0, (x_t - (1 - ab).sqrt() * eps) / ab.sqrt())
    clipped = Prior(small_prior.net, sched, clip_x0=True).x0(x_t * 50, t)
    assert clipped.abs().max() <= 1


class SpyNet(torch.nn.Module):
    """A fully convolutional stand-in that records the timesteps and inputs it sees; eps = 0.5 * x."""

    in_channels = out_channels = 3
    size_multiple = 1
    has_attention = False
    image_size = 32

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.w * x


def test_denoise_uses_nearest_timestep_and_scaling(sched):
    spy = SpyNet()
    prior = Prior(spy, sched)
    sb = sched.sigma_bar
    # Just above step 300's noise level and between steps 10 and 11 (nearer to 11).
    sigma = torch.tensor([float(sb[300]) * 1.0005, float(sb[10] * 0.3 + sb[11] * 0.7)])
    x = rand(2, 3, 8, 8, seed=4)
    out = prior.denoise(x, sigma)
    seen_x, seen_t = spy.seen[-1]
    assert seen_t.tolist() == [300, 11]
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen_x, x / (1 + s**2).sqrt())
    torch.testing.assert_close(out, x - s * 0.5 * seen_x)
    # On the grid, denoise(x, sigma_bar_t) is the schedule's x0 prediction at x_t = sqrt(ab_t) x.
    t = torch.tensor([300, 11])
    on_grid = prior.denoise(x, sb[t])
    x_t = sched.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1) * x
    torch.testing.assert_close(on_grid, prior.x0(x_t, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(prior.denoise(x, 0.0), x)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        prior.denoise(x, -1.0)


def test_padding_crops_back_and_is_a_no_op_on_divisible_sizes(small_prior):
    t = torch.tensor([100, 100])
    with torch.no_grad():
        x = rand(2, 3, 32, 36, seed=5)
        torch.testing.assert_close(small_prior.eps(x, t), small_prior.net(x, t))
        odd = rand(2, 3, 30, 33, seed=6)
        out = small_prior.eps(odd, t)
        assert out.shape == odd.shape and torch.isfinite(out).all()
        tiny_img = rand(1, 3, 1, 3, seed=7)  # pads beyond one reflection (replicate for size 1)
        assert small_prior.eps(tiny_img, 10).shape == tiny_img.shape
    assert small_prior.padded_size(30, 33) == (32, 36)


def test_attention_prior_pads_to_native_size_or_refuses(sched):
    net = randomize_(build_unet("small_attn"), seed=8).eval()
    prior = Prior(net, sched)
    assert prior.padded_size(20, 31) == (32, 32)
    with torch.no_grad():
        out = prior.eps(rand(1, 3, 20, 31, seed=9), 200)
    assert out.shape == (1, 3, 20, 31)
    with pytest.raises(ValueError, match="trained at 32x32.*size_mode='any'"):
        prior.eps(rand(1, 3, 40, 40), 200)
    anysize = Prior(net, sched, size_mode="any")
    assert anysize.padded_size(40, 42) == (40, 44)
    with torch.no_grad():
        assert anysize.eps(rand(1, 3, 40, 42), 200).shape == (1, 3, 40, 42)


def test_output_in_input_dtype(small_prior):
    x = rand(1, 3, 32, 32, seed=10).double()
    with torch.no_grad():
        assert small_prior.eps(x, 5).dtype == torch.float64
        assert small_prior.denoise(x, 0.1).dtype == torch.float64


# -- export / load ---------------------------------------------------------------------------------------
def test_schedule_dict_round_trip():
    lin = NoiseSchedule.linear(500, 1e-4, 0.03)
    d = schedule_to_dict(lin)
    assert d == {"kind": "linear", "T": 500, "beta_start": 1e-4, "beta_end": 0.03}
    cos = NoiseSchedule(torch.linspace(1e-4, 0.02, 50).double() ** 1.5)
    d2 = schedule_to_dict(cos)
    assert d2["kind"] == "betas"
    torch.testing.assert_close(schedule_from_dict(json.loads(json.dumps(d2))).betas, cos.betas)


def test_export_load_round_trip(small_prior, tmp_path):
    sched = NoiseSchedule.linear(800, 2e-4, 0.02)
    path = export_prior(small_prior.net, sched, tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left
    loaded = load_prior(path)
    assert loaded.net.config == small_prior.net.config and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="is not a torch checkpoint"):
        safe_torch_load(path)  # a safetensors file
    assert loaded.schedule.T == 800
    torch.testing.assert_close(loaded.schedule.betas, sched.betas)
    x, t = rand(2, 3, 32, 32, seed=11), torch.tensor([3, 700])
    with torch.no_grad():
        ref = small_prior.eps(x, t)
        assert torch.equal(loaded.eps(x, t), ref)
        half = load_prior(export_prior(small_prior, None, tmp_path / "h.safetensors", dtype=torch.float16))
        assert next(half.net.parameters()).dtype == torch.float32
        torch.testing.assert_close(half.eps(x, t), ref, rtol=0, atol=5e-3 * ref.abs().max().item())
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * path.stat().st_size


def test_lightning_checkpoint_with_diffpir_prior(small_prior, tmp_path):
    net = small_prior.net
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "state_dict": {f"net.{k}": v + 1 for k, v in net.state_dict().items()},  # raw (non-EMA) weights
        "hyper_parameters": {"lr": 1e-4, "preset": "small"},
        "diffpir_prior": {
            "format": 1,
            "unet": net.config,
            "schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
            "state_dict": net.state_dict(),
        },
    }
    atomic_save(ckpt, tmp_path / "last.ckpt")
    loaded = load_prior(tmp_path / "last.ckpt")
    x = rand(1, 3, 32, 32, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, 40), small_prior.eps(x, 40))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(2), "payload": Malicious(str(marker))}, path)
    with pytest.raises(ValueError, match="refused to load .*evil.pt.*code or Python objects"):
        load_prior(path, preset="ffhq_10m")
    with pytest.raises(ValueError, match="unsupported GLOBAL os.makedirs"):
        safe_torch_load(path)
    assert not marker.exists()
    # The file really is malicious: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def fixture_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Seeded random tensors of a guided-diffusion checkpoint's keys and shapes, all views of one storage
    (so ``torch.save`` writes the storage once and the test stays small)."""
    path = FIXTURES / f"guided_diffusion_{name}.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not available")
    shapes = json.loads(path.read_text())["state_dict"]
    base = torch.randn(max(math.prod(s) for s in shapes.values()), generator=torch.Generator().manual_seed(13))
    return {k: base[: math.prod(s)].view(s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["ffhq_10m", "imagenet_256_uncond"])
def test_guided_diffusion_state_dict_loads_strict(name, tmp_path):
    sd = fixture_state_dict(name)
    path = tmp_path / f"{name}.pt"
    torch.save(sd, path)
    prior = load_prior(path, preset=name)
    got = prior.net.state_dict()
    assert list(got) == list(sd)
    for k in ("time_embed.0.weight", "out.2.weight", "middle_block.1.qkv.weight"):
        assert torch.equal(got[k], sd[k])
    assert prior.net.learn_sigma and prior.in_channels == 3
    assert load_prior(path).net.config == prior.net.config  # preset detected from keys and shapes


def test_wrong_architecture_lists_keys_and_suggests_the_preset(tmp_path):
    sd = fixture_state_dict("ffhq_10m")
    path = tmp_path / "ffhq.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys|shape mismatches") as err:
        load_prior(path, preset="imagenet_256_uncond")
    msg = str(err.value)
    assert "try preset='ffhq_10m'" in msg
    assert "missing keys" in msg and "shape mismatches" in msg
    # An unknown architecture: a renamed key.
    sd2 = dict(sd)
    sd2["time_embed.9.weight"] = sd2.pop("time_embed.0.weight")
    torch.save(sd2, path)
    with pytest.raises(ValueError, match=r"1 missing keys \(time_embed.0.weight\); 1 unexpected keys"):
        load_prior(path, preset="ffhq_10m")
    with pytest.raises(ValueError, match="matches no UNet preset; pass preset="):
        load_prior(path)


def test_bundled_name(small_prior, tmp_path, monkeypatch):
    monkeypatch.setattr(prior_mod, "BUNDLED_DIR", tmp_path)
    export_prior(small_prior, None, tmp_path / "mini.safetensors")
    assert prior_mod.available_priors() == ["mini"]
    assert load_prior("mini").net.config == small_prior.net.config
    with pytest.raises(FileNotFoundError, match=r"no prior file or bundled prior named 'nope'.*\['mini'\]"):
        load_prior("nope")
    with pytest.raises(FileNotFoundError, match="pass the checkpoint path and preset='ffhq_10m'"):
        load_prior("ffhq_10m")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
        atomic_save({"a": lambda: 0}, path)
    assert torch.equal(safe_torch_load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a torch checkpoint"):
        safe_torch_load(tmp_path / "junk.pt")
