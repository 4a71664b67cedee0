"""Reading user kernels and masks from ``.npy``, ``.pt``/``.pth`` (``weights_only``) or image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffpir.io import IMAGE_SUFFIXES, read_image


def load_array(path: str | Path, what: str) -> Tensor:
    """Read a 2-D float64 array ``[h, w]`` from a file.

    ``.npy``: ``numpy.load(allow_pickle=False)``; ``.pt``/``.pth``: ``torch.load(weights_only=True)`` of a
    tensor (or a dict holding one tensor); images (PNG, JPEG, ...): grayscale, scaled to [0, 1]. Leading
    singleton dimensions are dropped. Raises ``ValueError`` naming the file (and ``what`` it should hold) when
    it is missing, unreadable or not 2-D.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float64))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, Tensor)]
                if len(tensors) != 1:
                    raise ValueError(f"expected a tensor or a dict with one tensor, got keys {list(obj)}")
                obj = tensors[0]
            if not isinstance(obj, Tensor):
                raise ValueError(f"expected a tensor, got {type(obj).__name__}")
            arr = obj.detach().to(torch.float64)
        elif suffix in IMAGE_SUFFIXES:
            # grey float64 [1, h, w] in [0, 1] (16-bit at full precision), Pillow's luma as before
            arr = read_image(path, channels=1, dtype=torch.float64, decoder="pillow")
        else:
            kinds = ", ".join(IMAGE_SUFFIXES)
            raise ValueError(f"unknown file type {suffix!r}; use .npy, .pt/.pth or an image ({kinds})")
    except ValueError as err:
        raise ValueError(f"cannot read {what} file {str(path)!r}: {err}") from err
    except Exception as err:  # corrupt files: numpy, torch and Pillow raise assorted errors
        raise ValueError(f"cannot read {what} file {str(path)!r}: {type(err).__name__}: {err}") from err
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what} file {str(path)!r} holds an array of shape {tuple(arr.shape)}, not [h, w]")
    return arr
