"""Safe loading and atomic saving of checkpoint files.

Loading never executes code from a file: torch files are read with ``torch.load(weights_only=True)`` (tensors,
primitive containers and numbers only), and anything else that pickle could carry is refused. Only local regular
files are loaded (:func:`local_file`): URLs (``http(s)://``, ``file://``, fsspec chains such as
``simplecache::...``) are refused before anything is fetched, and FIFOs, folders and devices before they are opened.
Lightning's own checkpoint loading (``--ckpt_path`` of ``diffpir-train fit|validate``) goes through the same checks:
:func:`check_ckpt_args` vets the arguments up front and :func:`guard_checkpoint_loading` replaces the trainer's loader,
so that neither a config (``weights_only: false``) nor a flag can re-enable pickles.

Saving goes through :func:`diffpir.io.atomic_output` (re-exported here with :func:`~diffpir.io.temp_owner`): a
temporary file in the destination folder, then ``os.replace``, so a crash or a full disk never leaves a truncated
checkpoint under the final name.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import torch

from diffpir.io import atomic_output, temp_owner

__all__ = [
    "CKPT_KEYWORDS",
    "GuardedCheckpointLoader",
    "atomic_output",
    "atomic_save",
    "check_ckpt_args",
    "disable_remote_configs",
    "file_kind",
    "guard_checkpoint_loading",
    "local_file",
    "safe_torch_load",
    "temp_owner",
]

MapLocation = str | torch.device | None

CKPT_KEYWORDS = ("last", "best", "hpc")
"""``ckpt_path`` values Lightning resolves to a local checkpoint of the run itself (checked again once resolved)."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:(//|:)|::")  # scheme:// (http, file, s3, ...) or an fsspec chain
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def local_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """``path`` as a :class:`~pathlib.Path` once it is known to name a local regular file.

    :raises ValueError: ``path`` is a URL (``http://``, ``https://``, ``file://``, ``s3://``, an fsspec chain
        ``a::b``): nothing is downloaded, the user is told to download and check the file first; or it names a
        FIFO, folder, device or socket (refused before it is opened: reading a FIFO would block for ever).
    :raises FileNotFoundError: nothing exists at ``path``.
    """
    s = os.fsdecode(os.fspath(path))
    if _URL.search(s):
        raise ValueError(
            f"{what} {s!r} is a URL: only local files are loaded, nothing is downloaded; download the file, "
            f"check where it comes from, and pass its local path"
        )
    p = Path(s)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p}") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {p}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{what} {p} is {kind}: give the path of a checkpoint file")
    return p


def file_kind(path: str | os.PathLike[str]) -> str:
    """Sniff a checkpoint's format from its first bytes: ``"safetensors"``, ``"torch_zip"`` (``torch.save``),
    ``"pickle"`` (legacy ``torch.save`` or a plain pickle) or ``"unknown"``.

    The safetensors layout (an 8-byte little-endian header length, then the JSON header ``{...``) is tested before
    the pickle opcode ``\\x80``: a header length whose low byte is 0x80 (one file in 256) starts with that byte too.
    A pickle can never pass for safetensors: after ``\\x80`` and the protocol byte come opcodes, which make the
    would-be header length far above the limit of 100 MB.
    """
    with open(local_file(path), "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "torch_zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def safe_torch_load(path: str | os.PathLike[str], map_location: MapLocation = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors.

    :raises FileNotFoundError: no such file.
    :raises ValueError: the file carries code or objects other than tensors, numbers, strings and plain
        containers (it was refused without running anything), or it is not a torch file at all.
    """
    path = local_file(path)
    kind = file_kind(path)
    if kind not in ("torch_zip", "pickle"):
        raise ValueError(f"{path} is not a torch checkpoint (its first bytes look like: {kind})")
    try:
        # An open file, not the path: torch.load picks its safetensors reader by the name alone (a ``.safetensors``
        # suffix), and the contents have just been found to be a torch file.
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
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


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``; returns ``Path(path)``."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Lightning's checkpoint loading (``ckpt_path``)
# ---------------------------------------------------------------------------------------------------------
def check_ckpt_args(ckpt_path: Any, weights_only: Any = None) -> None:
    """Vet a Lightning subcommand's ``ckpt_path`` and ``weights_only`` before anything is built or loaded.

    ``ckpt_path`` may be None, one of :data:`CKPT_KEYWORDS` (resolved by Lightning to a local file, which
    :func:`guard_checkpoint_loading` checks again) or a local regular file. ``weights_only`` may be None or True:
    checkpoints are always loaded with ``weights_only=True``.

    :raises ValueError: a URL, a non-regular file, ``"registry"`` (a download), or ``weights_only`` false.
    :raises FileNotFoundError: no such file.
    """
    if weights_only is not None and not weights_only:
        raise ValueError(
            "weights_only: false is refused: checkpoints are always loaded with weights_only=True (tensors and plain "
            "containers, never code); remove the setting"
        )
    if ckpt_path is None or ckpt_path in CKPT_KEYWORDS:
        return
    if str(ckpt_path).startswith("registry"):
        raise ValueError(
            f"ckpt_path {ckpt_path!r}: checkpoints are not downloaded from a model registry; download the file, "
            f"check where it comes from, and pass its local path"
        )
    local_file(ckpt_path, "ckpt_path")


class GuardedCheckpointLoader:
    """A strategy's ``load_checkpoint`` that reads a ``ckpt_path`` only as a local regular file and only with
    ``torch.load(weights_only=True)`` (:func:`safe_torch_load`), whatever ``weights_only`` it is asked for.

    A module-level class, so that a strategy holding one still pickles (``ddp_spawn`` sends the trainer to the
    processes it starts, and each of them loads through the same guard)."""

    def __call__(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = safe_torch_load(local_file(checkpoint_path, "ckpt_path"), map_location="cpu")
        if not isinstance(ckpt, dict):
            raise ValueError(f"{checkpoint_path} is not a Lightning checkpoint (a dict)")
        return ckpt

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def guard_checkpoint_loading(trainer: Any) -> Any:
    """Make ``trainer`` load checkpoints (``fit/validate/test/predict(ckpt_path=...)``, including ``last``, ``best``,
    ``hpc`` once resolved) only from local regular files and only with ``torch.load(weights_only=True)``, whatever
    ``weights_only`` it is asked for. Returns ``trainer``.

    Lightning hands a ``ckpt_path`` to ``trainer.strategy.load_checkpoint``, which would open URLs through fsspec and
    load ``http(s)`` ones with ``weights_only=False``; this replaces that method on the trainer's strategy with a
    :class:`GuardedCheckpointLoader` (picklable: the guard travels with the strategy to ``ddp_spawn``'s processes).
    """
    trainer.strategy.load_checkpoint = GuardedCheckpointLoader()
    return trainer


def disable_remote_configs() -> None:
    """Make jsonargparse read config files and values from local paths only.

    Lightning's CLI module turns on jsonargparse's fsspec reading at import, so a value such as
    ``--model.prior http://host/x`` or ``--config s3://...`` would be fetched (and parsed) before our checks ran.
    Call this after importing ``lightning.pytorch.cli`` and before building a parser."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(config_read_mode_fsspec_enabled=False, config_read_mode_urls_enabled=False)
