"""Inpainting masks. Convention: **1 = known (observed) pixel, 0 = missing**; masks are float ``[1|C, H, W]``.

Generators take a ``torch.Generator`` (or an int seed; 0 is a seed) and never touch the global RNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from diffpir.io import IMAGE_SUFFIXES
from diffpir.operators.base import as_generator
from diffpir.operators.loading import load_array


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def box_mask(
    h: int,
    w: int,
    box: int | tuple[int, int] = 128,
    margin: int = 16,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """A mask ``[1, h, w]`` missing one ``box`` rectangle at a uniformly random place at least ``margin``
    pixels from every border (the paper's protocol: a 128x128 box on 256x256 images, 16 px margin)."""
    bh, bw = _pair(box)
    if bh < 0 or bw < 0 or margin < 0:
        raise ValueError(f"box {bh}x{bw} and margin {margin} must be non-negative")
    if bh + 2 * margin > h or bw + 2 * margin > w:
        raise ValueError(
            f"a {bh}x{bw} box with a {margin} px margin does not fit in a {h}x{w} image; use a smaller box or margin"
        )
    g = as_generator(generator)
    top = int(torch.randint(margin, h - margin - bh + 1, (1,), generator=g))
    left = int(torch.randint(margin, w - margin - bw + 1, (1,), generator=g))
    mask = torch.ones(1, h, w)
    mask[:, top : top + bh, left : left + bw] = 0
    return mask


def random_mask(
    h: int,
    w: int,
    missing: float = 0.8,
    generator: torch.Generator | int | None = None,
    channels: int = 1,
) -> Tensor:
    """A mask ``[channels, h, w]`` where each pixel is missing independently with probability ``missing``
    (``channels=1``: the same pixels are missing in every colour channel)."""
    if not 0.0 <= missing <= 1.0:
        raise ValueError(f"missing must be a fraction in [0, 1], got {missing}")
    g = as_generator(generator)
    return (torch.rand(channels, h, w, generator=g) >= missing).float()


def load_mask(path: str | Path, size: tuple[int, int] | None = None, threshold: float = 0.5) -> Tensor:
    """Read a user mask image (or ``.npy``/``.pt``) as ``[1, h, w]``: white (value above
    ``threshold`` on the [0, 1] scale) = known pixel = 1, black = missing = 0.

    An image whose only levels are 0 and 1 (``mask.astype(np.uint8)`` saved as a PNG: black to the eye) is read as
    that 0/1 mask, 1 = known. A mask without any known pixel warns (everything would be made up).

    Raises ``ValueError`` when the file is missing or unreadable, or when ``size=(h, w)`` is given and the
    mask has another size.
    """
    arr = load_array(path, "mask")
    if size is not None and tuple(arr.shape) != tuple(size):
        raise ValueError(
            f"mask {str(path)!r} is {arr.shape[1]}x{arr.shape[0]} (width x height) but the images are "
            f"{size[1]}x{size[0]}: resize the mask (or the images) to match"
        )
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        top = float(arr.max())
        if 0 < top <= 1 / 255 + 1e-9 and bool(((arr == 0) | (arr == top)).all()):
            arr = arr / top  # levels 0 and 1: a 0/1 mask saved as 8- or 16-bit image
    mask = (arr > threshold).float()[None]
    if not bool(mask.any()):
        warnings.warn(
            f"mask {str(path)!r} has no known pixel (all black = all missing): white marks the known pixels",
            stacklevel=2,
        )
    return mask
