"""The ``kernels`` dataset: synthetic camera-shake kernels as grey PNGs, the training data of a kernel prior.

Each kernel is :func:`diffpir.operators.motion_kernel` of side ``size`` with an intensity drawn uniformly from
``intensity``, scaled so that its largest entry is 255 and placed in the top-left corner of a ``canvas`` square
(the kernel's centre on pixel ``size // 2``; the extra rows and columns are zero). A prior trained on them
(``configs/train/kernels.yaml``) models the shape of a kernel, not its sum: divide a decoded PNG by its sum.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffpir.operators.kernels import motion_kernel
from diffpir.prepare.common import Log, _atomic_write_png, _log, _png_ok, _read_manifest, _write_manifest

__all__ = ["kernel_png", "prepare_kernels"]


def _generator(seed: int, index: int) -> torch.Generator:
    """The generator of kernel ``index``: one stream per kernel, so any subset can be (re)written alone."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))


def kernel_png(index: int, *, seed: int = 0, size: int = 31, canvas: int = 32,
               intensity: tuple[float, float] = (0.2, 1.0)) -> tuple[Image.Image, float]:  # fmt: skip
    """Kernel ``index`` of the dataset as a grey ``canvas`` x ``canvas`` image, and its intensity."""
    if size % 2 == 0 or size > canvas:
        raise ValueError(f"size must be odd and at most canvas ({canvas}), got {size}")
    lo, hi = intensity
    if not 0 <= lo <= hi:
        raise ValueError(f"intensity must be a range 0 <= lo <= hi, got {intensity}")
    g = _generator(seed, index)
    level = lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))
    k = motion_kernel(size, level, generator=g, dtype=torch.float64).numpy()
    img = np.zeros((canvas, canvas), dtype=np.uint8)
    img[:size, :size] = np.clip(np.round(k / k.max() * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="L"), level


def prepare_kernels(
    out: str | os.PathLike = "data",
    *,
    n_train: int = 20000,
    n_val: int = 512,
    size: int = 31,
    canvas: int = 32,
    intensity: tuple[float, float] = (0.2, 1.0),
    seed: int = 0,
    log: Log = _log,
) -> dict:
    """Write ``n_train`` + ``n_val`` kernels to ``out/kernels/{train,val}/NNNNNN.png`` (see the module docstring).

    Kernel ``i`` depends only on ``(seed, i)``; validation kernels are numbers ``n_train ..`` so the two splits
    never share one. Files already there with the right size are kept (a rerun resumes).
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got {n_train}, {n_val}")
    root = Path(out) / "kernels"
    settings = {"size": size, "canvas": canvas, "intensity": [float(v) for v in intensity], "seed": seed}
    old = _read_manifest(root) or {}
    # files written with other settings are rewritten, not kept
    fresh = {k: old.get(k) for k in settings} == settings
    files: list[str] = []
    written = 0
    for i in range(n_train + n_val):
        rel = f"{'train' if i < n_train else 'val'}/{i:06d}.png"
        path = root / rel
        if not (fresh and _png_ok(path, (canvas, canvas), "L")):
            img, _ = kernel_png(i, seed=seed, size=size, canvas=canvas, intensity=intensity)
            _atomic_write_png(path, img)
            written += 1
            if written % 2000 == 0:
                log(f"kernels: {written} written ({i + 1}/{n_train + n_val})")
        files.append(rel)
    keep = set(files)  # a smaller rerun leaves no stale kernels for the training folder to pick up
    for stale in sorted(root.glob("*/*.png")):
        if stale.relative_to(root).as_posix() not in keep:
            stale.unlink()
    counts = {"train": n_train, "val": n_val}
    manifest = {
        "dataset": "kernels",
        "source": "diffpir.operators.motion_kernel (synthetic)",
        **settings,
        "counts": counts,
        "files": files,
    }
    _write_manifest(root, manifest)
    log(f"kernels: {n_train} train + {n_val} val in {root} ({written} newly written)")
    return manifest
