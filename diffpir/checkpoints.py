"""Safe loading and atomic saving of checkpoint files.

Loading never executes code from a file: torch files are read with ``torch.load(weights_only=True)`` (tensors,
primitive containers and numbers only), and anything else that pickle could carry is refused.
Saving goes to a temporary file in the destination folder first, then ``os.replace`` moves it into place, so a
crash or a full disk never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_output", "atomic_save", "file_kind", "safe_torch_load"]

MapLocation = str | torch.device | None


def file_kind(path: str | os.PathLike[str]) -> str:
    """Sniff a checkpoint's format from its first bytes: ``"safetensors"``, ``"torch_zip"`` (``torch.save``),
    ``"pickle"`` (legacy ``torch.save`` or a plain pickle) or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "torch_zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    return "unknown"


def safe_torch_load(path: str | os.PathLike[str], map_location: MapLocation = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    :raises FileNotFoundError: no such file.
    :raises ValueError: the file carries code or objects other than tensors, numbers, strings and plain
        containers (it was refused without running anything), or it is not a torch file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = file_kind(path)
    if kind not in ("torch_zip", "pickle"):
        raise ValueError(f"{path} is not a torch checkpoint (its first bytes look like: {kind})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        if "Weights only load failed" not in str(err):
            raise ValueError(f"could not read {path} safely: {lines[0] if lines else err}") from None
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise ValueError(
            f"refused to load {path}: it carries code or Python objects that are not plain tensors or "
            f"containers (loading uses torch.load(weights_only=True) and never runs code from a file). "
            f"{detail}".strip()
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"could not read {path} as a torch checkpoint: {err}") from err


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, on error it is
    removed. Parent folders are created.

    >>> with atomic_output("out/model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``; returns ``Path(path)``."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
