"""The ``eval`` dataset: evaluation photographs kept apart from the training data (scikit-image, scikit-learn,
PyWavelets, matplotlib) as 256x256 centre crops; and the committed demo photographs made the same way."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffpir.datasets import SAMPLE_NAMES, SAMPLES_DIR
from diffpir.prepare.common import (
    Log,
    _atomic_write_png,
    _log,
    _png_ok,
    _to_rgb_uint8,
    _write_manifest,
    center_crop_square,
)

__all__ = ["EVAL_SOURCES", "EvalSource", "eval_crop", "prepare_eval", "prepare_samples"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle -> (left, right, disparity)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _pywt(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import pywt.data

        return getattr(pywt.data, name)()

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class EvalSource:
    load: Callable[[], np.ndarray]
    source: str
    licence: str
    grey: bool = False


EVAL_SOURCES: dict[str, EvalSource] = {
    "astronaut": EvalSource(
        _skimage("astronaut"), "scikit-image skimage.data.astronaut()", "public domain (NASA, Eileen Collins)"
    ),
    "chelsea": EvalSource(_skimage("chelsea"), "scikit-image skimage.data.chelsea()", "CC0 (Stefan van der Walt)"),
    "coffee": EvalSource(_skimage("coffee"), "scikit-image skimage.data.coffee()", "CC0 (Rachel Michetti)"),
    "rocket": EvalSource(_skimage("rocket"), "scikit-image skimage.data.rocket()", "public domain (SpaceX)"),
    "motorcycle": EvalSource(
        _skimage("stereo_motorcycle"),
        "scikit-image skimage.data.stereo_motorcycle()[0]",
        "Middlebury 2014 stereo benchmark (research use)",
    ),
    "china": EvalSource(
        _sklearn("china"), "scikit-learn load_sample_image('china.jpg')", "CC BY 2.0 (danielbuechele, Flickr)"
    ),
    "flower": EvalSource(
        _sklearn("flower"), "scikit-learn load_sample_image('flower.jpg')", "CC BY 2.0 (vultilion, Flickr)"
    ),
    "grace_hopper": EvalSource(
        _grace_hopper, "matplotlib sample_data/grace_hopper.jpg", "public domain (U.S. Navy photograph)"
    ),
    "camera": EvalSource(_skimage("camera"), "scikit-image skimage.data.camera()", "CC0 (Lav Varshney)", grey=True),
    "aero": EvalSource(_pywt("aero"), "PyWavelets pywt.data.aero()", "PyWavelets sample data (MIT)", grey=True),
    "ascent": EvalSource(_pywt("ascent"), "PyWavelets pywt.data.ascent()", "public domain", grey=True),
}


def eval_crop(name: str, size: int = 256) -> Image.Image:
    """The evaluation image ``name`` of :data:`EVAL_SOURCES`: resized (Lanczos) so that its short side is
    ``size``, then centre-cropped to ``size`` x ``size`` (the usual ImageNet 256 px preprocessing)."""
    src = EVAL_SOURCES[name]
    arr = src.load()
    if src.grey:
        img = Image.fromarray(
            np.asarray(arr if arr.ndim == 2 else arr.mean(axis=2)).round().clip(0, 255).astype(np.uint8),
            mode="L",
        )
    else:
        img = Image.fromarray(_to_rgb_uint8(np.asarray(arr)), mode="RGB")
    return center_crop_square(img, size)


def prepare_eval(
    out: str | os.PathLike = "data",
    *,
    size: int = 256,
    names: Sequence[str] | None = None,
    log: Log = _log,
) -> dict:
    """Write the evaluation crops to ``out/eval/{name}.png`` (colour) and ``out/eval/grey/{name}.png`` (grey).

    :param names: subset of :data:`EVAL_SOURCES` (default all).
    """
    root = Path(out) / "eval"
    names = list(EVAL_SOURCES) if names is None else list(names)
    files, written = [], 0
    for name in names:
        src = EVAL_SOURCES[name]
        rel = f"grey/{name}.png" if src.grey else f"{name}.png"
        path = root / rel
        if not _png_ok(path, (size, size), "L" if src.grey else "RGB"):
            _atomic_write_png(path, eval_crop(name, size))
            written += 1
            log(f"eval: {rel}")
        files.append({"file": rel, "source": src.source, "licence": src.licence})
    counts = {
        "color": sum(not EVAL_SOURCES[n].grey for n in names),
        "grey": sum(EVAL_SOURCES[n].grey for n in names),
    }
    manifest = {"dataset": "eval", "size": size, "counts": counts, "files": files}
    _write_manifest(root, manifest)
    log(f"eval: {counts['color']} colour + {counts['grey']} grey {size}px crops in {root} ({written} new)")
    return manifest


def prepare_samples(dest: str | os.PathLike = SAMPLES_DIR, *, size: int = 256, log: Log = _log) -> list[Path]:
    """(Re)write the committed demo photographs :data:`SAMPLE_NAMES` to ``dest`` (a maintainer's tool)."""
    dest = Path(dest)
    paths = []
    for name in SAMPLE_NAMES:
        path = dest / f"{name}.png"
        if not _png_ok(path, (size, size), "RGB"):
            _atomic_write_png(path, eval_crop(name, size))
            log(f"samples: {path}")
        paths.append(path)
    return paths
