"""Image files in and out: reading into [0, 1] float tensors, atomic PNG writes and safe output names.

Ranges and shapes: images are float tensors ``[C, H, W]`` in [0, 1]; ``C`` is 1 (grey) or 3 (RGB).
Files are decoded with :mod:`torchvision.io` (PNG 8/16-bit, JPEG, WebP, GIF); formats it cannot decode (BMP, TIFF)
fall back to Pillow. Conversions: palette images are expanded, alpha is dropped (not composited), RGB -> grey uses
the ITU-R 601 luma weights, grey -> RGB repeats the channel.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "list_image_files",
    "read_image",
    "safe_output_name",
    "to_uint8",
    "write_png_atomic",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_NAME = 120


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """The image files under ``root`` (recursively; hidden files and folders skipped), sorted by path.

    ``root`` may also be a single image file. Raises ``ValueError`` when it does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _decode(path: Path, channels: int | None) -> Tensor:
    """Decode to an integer tensor ``[C, H, W]`` (uint8 or uint16) with ``channels`` channels (None: as stored)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            return decode_image(read_file(str(path)), mode=mode)
    except RuntimeError as err:
        if "Unsupported image file" not in str(err):
            raise
    # BMP, TIFF, ...: Pillow.
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64).clip(0, 65535).astype(np.uint16)
            out = torch.from_numpy(arr.astype(np.int32))[None].to(torch.uint16)
            return out.expand(3, -1, -1).contiguous() if channels == 3 else out
        if channels is None:
            pil_mode = "L" if im.mode in ("1", "L", "LA") else "RGB"
        else:
            pil_mode = "L" if channels == 1 else "RGB"
        arr = np.asarray(im.convert(pil_mode), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_image(path: str | os.PathLike, channels: int | None = 3) -> Tensor:
    """Read an image file as a float32 tensor ``[C, H, W]`` in [0, 1].

    Args:
        path: the image file (PNG 8/16-bit, JPEG, WebP, GIF; BMP and TIFF through Pillow).
        channels: 3 (RGB; grey images are repeated), 1 (grey; colour is converted to luma) or ``None`` (as stored,
            alpha dropped).
    Raises:
        ValueError: naming the file when it is missing, empty, not an image or cannot be decoded.
    """
    path = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {str(path)!r} is empty (0 bytes)")
    try:
        img = _decode(path, channels)
    except Exception as err:  # torchvision and Pillow raise assorted errors for corrupt files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot read image file {str(path)!r}: {msg}") from err
    if img.ndim == 2:
        img = img[None]
    if channels is None and img.shape[0] in (2, 4):
        img = img[:-1]  # drop alpha
    if img.dtype == torch.uint16:
        return img.to(torch.int32).to(torch.float32) / 65535.0
    return img.to(torch.float32) / 255.0


def to_uint8(img: Tensor) -> Tensor:
    """Quantise an image in [0, 1] (any shape) to uint8 exactly as :func:`write_png_atomic` stores it:
    ``round(clamp(x, 0, 1) * 255)``."""
    return (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def write_png_atomic(img: Tensor, path: str | os.PathLike, compression_level: int = 6) -> Path:
    """Write an image ``[C, H, W]`` (C = 1 or 3; float in [0, 1] or uint8) as an 8-bit PNG, atomically.

    The bytes go to a temporary file in the destination folder, which then replaces ``path`` (``os.replace``), so a
    reader never sees a partial file and an interrupted run leaves no truncated PNG. Parent folders are created.
    Returns the path.
    """
    from torchvision.io import encode_png

    path = Path(path)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [1|3, H, W], got shape {tuple(img.shape)} for {str(path)!r}")
    data = img.detach().cpu()
    if data.dtype != torch.uint8:
        data = to_uint8(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        png = encode_png(data.contiguous(), compression_level=compression_level)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png.numpy().tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_output_name(key: str) -> str:
    """A file name (no folder part, no suffix) for an image key that cannot escape the output folder.

    Keys made of letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.``) are kept as they are. Any other
    key (path separators, ``..``, spaces, non-ASCII, a leading dot, overlong) has every other character replaced
    by ``_`` and gets an 8-hex-digit hash of the original key appended, so distinct keys keep distinct names:
    ``"sub/cat"`` -> ``"sub_cat-<hash>"``.
    """
    key = str(key)
    if not key:
        raise ValueError("an image key must not be empty")
    if _SAFE.match(key) and len(key) <= _MAX_NAME:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    body = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".")[:_MAX_NAME].rstrip(".")
    return f"{body}-{digest}" if body else digest
