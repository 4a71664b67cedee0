"""What the data-preparation steps share: logging, atomic PNG and manifest writes, crops and resizes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from diffpir.io import atomic_output

__all__ = ["Log", "center_crop_square", "downscale_short_side", "file_digest"]

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _atomic_write_png(path: Path, img: Image.Image) -> None:
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)


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
    with atomic_output(root / "MANIFEST.json") as tmp:
        tmp.write_bytes((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


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
    """Resize so the short side is ``size`` (Lanczos, only if larger), then crop the centre square."""
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
    """Downscale (Lanczos) so that the short side is at most ``max_short``; smaller images are kept."""
    w, h = img.size
    if min(w, h) <= max_short:
        return img
    scale = max_short / min(w, h)
    return img.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (for manifests and provenance notes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
