"""Tiled priors (diffpir.tiling): the layout, exactness for pointwise eps-models, closeness for the tiny UNet, the
restoration module's ``tile_size`` and a 2048 x 2048 restoration on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffpir.methods import DiffPIRMethod
from diffpir.models import build_unet
from diffpir.operators import Blur, gaussian_kernel
from diffpir.prior import Prior
from diffpir.restoration import RestorationModule
from diffpir.schedule import NoiseSchedule
from diffpir.tiling import TiledPrior, axis_starts, tile_layout


class PointwiseNet(nn.Module):
    """A 1x1-conv eps-model with a timestep-dependent gain: every output pixel depends on its input pixel only."""

    in_channels = out_channels = 3
    size_multiple = 1
    has_attention = False
    image_size = 32

    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.out_channels = out_channels
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def _seeded_tiny(**overrides) -> nn.Module:
    net = build_unet("tiny", **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.02))
    return net.eval()


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(10, 16, 4), (16, 16, 4), (17, 16, 4), (50, 16, 4), (2048, 256, 32), (100, 7, 0)]
)
def test_layout_covers_the_axis_with_the_overlap(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    size = min(length, tile)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap >= overlap
    assert len(starts) == (1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1)
    assert len(tile_layout(length, 3, tile, overlap)) == len(starts)


def test_tiling_is_exact_for_a_pointwise_eps_model():
    prior = Prior(PointwiseNet(out_channels=6), NoiseSchedule.linear())  # learn_sigma-like: eps = first 3
    tiled = TiledPrior.wrap(prior, tile=16, overlap=4, tile_batch=3)
    x = torch.randn(2, 3, 50, 37, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(tiled(x, t), prior(x, t), rtol=0, atol=1e-6)
        torch.testing.assert_close(tiled.x0(x, t), prior.x0(x, t), rtol=1e-5, atol=1e-5)
    assert len(tiled.layout(50, 37)) == 12
    small = torch.randn(1, 3, 16, 12)
    assert torch.equal(tiled(small, 5), prior(small, 5))  # fits one tile: run untiled


def test_tiled_tiny_unet_is_close_to_untiled():
    prior = Prior(_seeded_tiny(), NoiseSchedule.linear()).eval()
    x = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        full = prior(x, t)
        for tile, overlap, tol in ((32, 8, 0.05), (64, 16, 0.02)):
            tiled = TiledPrior.wrap(prior, tile=tile, overlap=overlap)(x, t)
            rel = float((tiled - full).pow(2).mean().sqrt() / full.std())
            assert rel < tol, f"tile {tile}, overlap {overlap}: relative RMS difference {rel:.4f}"


def test_wrap_keeps_the_network_and_options():
    prior = Prior(_seeded_tiny(), NoiseSchedule.linear(), clip_x0=True)
    tiled = TiledPrior.wrap(prior, tile=32, overlap=8, tile_batch=2)
    assert tiled.net is prior.net and tiled.schedule is prior.schedule and tiled.clip_x0
    assert tiled.state_dict().keys() == prior.state_dict().keys()
    assert "tile=32" in repr(tiled)
    with pytest.raises(ValueError, match="overlap must satisfy"):
        TiledPrior.wrap(prior, tile=16, overlap=16)
    with pytest.raises(ValueError, match="tile_batch must be at least 1"):
        TiledPrior.wrap(prior, tile=16, overlap=4, tile_batch=0)


def test_attention_nets_tile_at_their_training_size():
    net = build_unet("small_attn")
    prior = Prior(net, NoiseSchedule.linear()).eval()
    tiled = TiledPrior.wrap(prior, tile=512, overlap=8)
    assert tiled.tile_size == net.image_size
    x = torch.randn(1, 3, net.image_size + 8, net.image_size)
    with pytest.raises(ValueError, match="larger"):
        prior(x, 10)
    with torch.no_grad():
        assert tiled(x, 10).shape == x.shape


def test_restoration_module_tiles_above_tile_size():
    prior = Prior(_seeded_tiny(), NoiseSchedule.linear())
    module = RestorationModule(prior, method=DiffPIRMethod(steps=2), lpips=False, tile_size=32, tile_overlap=8)
    assert isinstance(module.prior, TiledPrior) and module.prior.tile == 32
    untiled = RestorationModule(
        Prior(_seeded_tiny(), NoiseSchedule.linear()), method=DiffPIRMethod(steps=2), lpips=False, tile_size=None
    )
    assert type(untiled.prior) is Prior
    assert module.state_dict().keys() == untiled.state_dict().keys()
    y = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    op = Blur(gaussian_kernel(5, 1.0))
    # below the tile size the two restore identically
    assert torch.equal(module(y, op, 0.05, ["a"]), untiled(y, op, 0.05, ["a"]))


@pytest.mark.slow
def test_2048_restoration_with_the_tiny_prior_completes():
    prior = Prior(_seeded_tiny(), NoiseSchedule.linear())
    module = RestorationModule(
        prior, method=DiffPIRMethod(steps=2), lpips=False, tile_size=256, tile_overlap=32, tile_batch=4
    )
    g = torch.Generator().manual_seed(4)
    clean = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=(2048, 2048), mode="bilinear")
    op = Blur(gaussian_kernel(9, 2.0))
    y = op(clean) + 0.02 * torch.randn(clean.shape, generator=g)
    x = module(y, op, 0.02, ["big"])
    assert x.shape == (1, 3, 2048, 2048) and bool(torch.isfinite(x).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
