"""The ADM UNet: guided-diffusion's exact state_dict layout, its formulas, presets and a golden output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from diffpir.models import PRESETS, UNet, build_unet, timestep_embedding
from diffpir.models.unet import AttentionBlock, GroupNorm32, QKVAttention, QKVAttentionLegacy, ResBlock

FIXTURES = Path("/work/shared/fixtures")
if not FIXTURES.is_dir():  # the fixtures may also be copied next to the tests
    FIXTURES = Path(__file__).parent / "fixtures"


def randomize_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (fresh nets output zeros: zero-init heads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = 1.0 / math.sqrt(fan_in) if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def meta_shapes(name: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        net = build_unet(name)
    return {k: list(v.shape) for k, v in net.state_dict().items()}


# -- exact guided-diffusion layout -------------------------------------------------------------------------
@pytest.mark.parametrize("name, fixture", [("ffhq_10m", "ffhq_10m"), ("imagenet_256_uncond", "imagenet_256_uncond")])
def test_state_dict_equals_guided_diffusion(name, fixture):
    path = FIXTURES / f"guided_diffusion_{fixture}.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} not available")
    ref = json.loads(path.read_text())
    got = meta_shapes(name)
    assert list(got) == list(ref["state_dict"])  # same keys, same order
    assert got == ref["state_dict"]  # same shapes
    assert sum(math.prod(s) for s in got.values()) == ref["parameters"]
    cfg = ref["config"]
    preset = PRESETS[name]
    assert preset["model_channels"] == cfg["num_channels"]
    assert preset["num_res_blocks"] == cfg["num_res_blocks"]
    assert preset["attention_resolutions"] == [int(r) for r in cfg["attention_resolutions"].split(",")]
    assert preset["out_channels"] == (6 if cfg["learn_sigma"] else 3)


def test_config_rebuilds_and_is_primitive():
    for name in PRESETS:
        with torch.device("meta"):
            net = build_unet(name)
            again = UNet(**net.config)
        assert json.loads(json.dumps(net.config)) == net.config  # primitives only, lists not tuples
        assert again.config == net.config
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert build_unet("tiny", dropout=0.25).config["dropout"] == 0.25
    assert build_unet(build_unet("tiny").config).config == build_unet("tiny").config


def test_preset_sizes_and_properties():
    counts = {}
    for name in ("tiny", "small", "small_attn", "natural", "digits"):
        with torch.device("meta"):
            net = build_unet(name)
        counts[name] = sum(p.numel() for p in net.parameters())
        assert net.fully_convolutional == (name != "small_attn")
    assert counts["tiny"] < 20_000
    assert 100_000 < counts["small"] < 1_000_000
    assert 2_000_000 < counts["natural"] < 5_000_000
    assert 500_000 < counts["digits"] < 2_000_000
    with torch.device("meta"):
        ffhq = build_unet("ffhq_10m")
    assert ffhq.learn_sigma and ffhq.has_attention and ffhq.size_multiple == 32


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
        build_unet("tiny", norm_groups=32)
    with pytest.raises(ValueError, match="attention resolution 5 matches no level"):
        build_unet("small", attention_resolutions=[5])
    with pytest.raises(ValueError, match="unknown UNet preset 'nope'"):
        build_unet("nope")
    with pytest.raises(ValueError, match="not divisible by 4"):
        build_unet("small")(torch.zeros(1, 3, 30, 32), torch.zeros(1, dtype=torch.long))


# -- formulas ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_formula(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(ti * f), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.sin(ti * f), abs=1e-5)
        if dim % 2:
            assert emb[i, -1].item() == 0.0
    assert torch.equal(timestep_embedding(t.float(), dim), emb)


def test_qkv_attention_legacy_matches_formula():
    g = torch.Generator().manual_seed(0)
    n, heads, c, T = 2, 3, 4, 5
    qkv = torch.randn(n, 3 * heads * c, T, generator=g)
    out = QKVAttentionLegacy(heads)(qkv)
    # guided-diffusion: reshape(N * H, 3c, T), split; scale 1/sqrt(sqrt(c)) on q and k; softmax over s.
    q, k, v = qkv.reshape(n * heads, 3 * c, T).split(c, dim=1)
    s = 1 / math.sqrt(math.sqrt(c))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    ref = torch.einsum("bts,bcs->bct", w, v).reshape(n, heads * c, T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_attention_orders_agree_under_weight_permutation():
    legacy = randomize_(AttentionBlock(32, num_head_channels=8, norm_groups=8), seed=1)
    new = AttentionBlock(32, num_head_channels=8, norm_groups=8, use_new_attention_order=True)
    sd = legacy.state_dict()
    sd["qkv.weight"] = rearrange(sd["qkv.weight"], "(h three c) i k -> (three h c) i k", three=3, h=4)
    sd["qkv.bias"] = rearrange(sd["qkv.bias"], "(h three c) -> (three h c)", three=3, h=4)
    new.load_state_dict(sd)
    assert isinstance(new.attention, QKVAttention) and isinstance(legacy.attention, QKVAttentionLegacy)
    x = torch.randn(2, 32, 4, 6, generator=torch.Generator().manual_seed(2))
    out_legacy, out_new = legacy(x), new(x)
    torch.testing.assert_close(out_new, out_legacy, rtol=1e-5, atol=1e-5)
    assert (out_legacy - x).abs().max() > 1e-2  # the attention did something


def test_fresh_blocks_are_their_skip_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 8, generator=g)
    emb = torch.randn(2, 64, generator=g)
    for kw in ({}, {"use_scale_shift_norm": True}):
        assert torch.equal(ResBlock(16, 64, 0.0, norm_groups=8, **kw)(x, emb), x)
    down = ResBlock(16, 64, 0.0, down=True, norm_groups=8)
    torch.testing.assert_close(down(x, emb), F.avg_pool2d(x, 2))
    up = ResBlock(16, 64, 0.0, up=True, norm_groups=8)
    torch.testing.assert_close(up(x, emb), F.interpolate(x, scale_factor=2, mode="nearest"))
    wide = ResBlock(16, 64, 0.0, out_channels=32, norm_groups=8)
    torch.testing.assert_close(wide(x, emb), wide.skip_connection(x))
    assert torch.equal(AttentionBlock(16, norm_groups=8)(x), x)
    assert torch.count_nonzero(build_unet("tiny")(x[:, :3], torch.tensor([1, 2]))) == 0  # zero-init head


def test_groupnorm32_computes_in_float32():
    gn = GroupNorm32(4, 8)
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(4)) * 100 + 1000
    y = gn(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.to(torch.bfloat16).float(), 4, gn.weight, gn.bias).to(torch.bfloat16)
    assert torch.equal(y, ref)


# -- forward behaviour ---------------------------------------------------------------------------------------
def test_fully_convolutional_any_divisible_size_and_timestep_forms():
    net = randomize_(build_unet("small"), seed=5).eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 24, 40, generator=g)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 10]))
        assert out.shape == (2, 3, 24, 40)
        torch.testing.assert_close(net(x, torch.tensor([10.0, 10.0])), out)  # float t
        torch.testing.assert_close(net(x, 10), out)  # scalar t broadcast
        torch.testing.assert_close(net(x, torch.tensor(10)), out)


def test_resblock_updown_and_checkpointing_give_the_same_gradients():
    base = build_unet("tiny", resblock_updown=True)
    randomize_(base, seed=7)
    ckpt = build_unet(base.config, use_checkpoint=True)
    ckpt.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([3, 700])
    grads = []
    for net in (base, ckpt):
        net.train()
        net.zero_grad()
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# Golden outputs: pinned once from this implementation (seeded weights and inputs, CPU float32). They guard
# against accidental changes of the architecture or its arithmetic; update them only for intended changes.
GOLDEN = {
    "tiny": (575.64368, 637.09186, 0.0039143823),
    "small_attn": (-463.22781, 508.88046, -0.089943036),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_output(name):
    net = randomize_(build_unet(name), seed=123).eval()
    g = torch.Generator().manual_seed(321)
    x = torch.randn(2, net.in_channels, 32, 32, generator=g).clamp(-1, 1)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 500]))
    total, abs_total, first = GOLDEN[name]
    assert out.sum().item() == pytest.approx(total, rel=1e-4, abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(abs_total, rel=1e-4)
    assert out[0, 0, 0, 0].item() == pytest.approx(first, rel=1e-4, abs=1e-5)
