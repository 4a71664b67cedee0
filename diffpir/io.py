"""Image files in and out: listing and reading images, atomic writes of any file (PNGs, checkpoints, manifests),
leftover temporary files, and safe output names.

Ranges and shapes: images are float tensors ``[C, H, W]`` in [0, 1]; ``C`` is 1 (grey) or 3 (RGB).
Files are decoded with :mod:`torchvision.io` (PNG 8/16-bit, JPEG, WebP, GIF); formats it cannot decode (BMP, TIFF)
fall back to Pillow. Conversions: palette images are expanded, alpha is dropped (not composited), RGB -> grey uses
the ITU-R 601 luma weights (WebP and GIF too, which torchvision reads in colour only), grey -> RGB repeats the channel;
16-bit images keep their precision (16-bit colour TIFFs through ``tifffile`` when it is installed: Pillow reads them at
8 bits, with a warning); float TIFFs (Pillow mode ``F``) are read as they are (values on the [0, 1] scale, not
clipped).

Orientation: the EXIF orientation tag (phone photos) is applied, so images are read upright (and restorations
written upright).

Untrusted files: the header is read first (Pillow, no pixel data) so that an image above ``max_pixels`` is refused
before it is decoded (decompression bombs); truncated, empty, animated (GIF/WebP/PNG with several frames) and
non-image files, FIFOs and devices, and images with NaN or infinite values raise a ``ValueError`` that names the file
and says what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "TEMP_SUFFIX",
    "ImageFolderNotFoundError",
    "ImageTooLargeError",
    "atomic_output",
    "image_header",
    "list_image_files",
    "exif_orientation",
    "image_frames",
    "pid_alive",
    "read_image",
    "remove_temp_files",
    "safe_output_name",
    "temp_owner",
    "to_uint8",
    "upright",
    "write_png_atomic",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
"""The image file types listed and read everywhere (in this order a per-image kernel or mask file is looked for)."""
TEMP_SUFFIX = ".tmp"
"""Temporary files of the atomic writes are ``.<final name>.diffpir-<pid>-<random>.tmp`` (hidden, next to the final
file; :func:`temp_owner` reads the pid back, so that a cleanup only removes the leftovers of dead diffpir runs)."""
_TEMP_TAG = "diffpir"
_TEMP = re.compile(r"^\.(?P<name>.+)\." + _TEMP_TAG + r"-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASHED = re.compile(r"(^|-)[0-9a-f]{8}$")  # what safe_output_name appends; plain keys of this form get hashed too
_MAX_NAME = 120
_TORCHVISION_WHERE = re.compile(r"^[\w()<>]+, \S+:\d+, ")  # "decode_png, /path/decode_png.cpp:79, " prefixes


class ImageTooLargeError(ValueError):
    """An image has more pixels than the configured limit (raised before its pixels are decoded)."""


class ImageFolderNotFoundError(FileNotFoundError, ValueError):
    """An image folder does not exist (both a ``FileNotFoundError`` and a ``ValueError``: the training and the
    restoration command lines report either as a user error)."""


def list_image_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files (suffixes :data:`IMAGE_SUFFIXES`, any case) in ``root``, sorted by path.

    Looks into subfolders when ``recursive`` (default); hidden files and folders (a leading ``.``, such as the
    temporary files of atomic writes) are skipped. ``root`` may also be a single image file. Raises
    :class:`ImageFolderNotFoundError` when it does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ImageFolderNotFoundError(f"image folder {str(root)!r} does not exist")
    return sorted(
        p
        for p in (root.rglob("*") if recursive else root.glob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def image_header(path: str | os.PathLike) -> tuple[int, int, str]:
    """``(height, width, Pillow mode)`` of an image file from its header, without decoding the pixels.

    The size is that of the upright image (the EXIF orientation applied). Raises ``ValueError`` naming the file
    when Pillow does not recognise it as an image, or when it is not a regular file.
    """
    h, w, mode, _, _ = _header(Path(path))
    return h, w, mode


def image_frames(path: str | os.PathLike) -> int:
    """The number of frames of an image file (1 for still images; more for animated GIF, WebP, PNG)."""
    return _header(Path(path))[3]


def _header(path: Path) -> tuple[int, int, str, int, int]:
    """``(height, width, mode, frames, EXIF orientation)`` from the header (see :func:`image_header`)."""
    from PIL import Image, UnidentifiedImageError

    _regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as im:
                w, h = im.size
                orientation = _orientation(im)
                if orientation in (5, 6, 7, 8):  # stored on its side: read upright
                    h, w = w, h
                frames = int(getattr(im, "n_frames", 1) or 1)
                return int(h), int(w), str(im.mode), frames, orientation
    except Image.DecompressionBombError as err:
        # Pillow refuses above 2 * MAX_IMAGE_PIXELS already at open(); parse the size from its message.
        m = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageTooLargeError(
            f"image file {str(path)!r} has {m.group(1) if m else 'too many'} pixels: refused as a possible "
            f"decompression bomb; downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(
            f"cannot read image file {str(path)!r}: not an image (or a format Pillow does not know); "
            f"remove it from the folder or convert it to PNG"
        ) from None
    except OSError as err:
        raise ValueError(
            f"cannot read image file {str(path)!r}: {err} (the file is truncated or corrupt: re-export or remove it)"
        ) from None


_ORIENTATION = 0x0112  # the EXIF orientation tag


def _orientation(im) -> int:
    """The EXIF orientation (1..8) still to apply to an open Pillow image's pixels; 1 (upright) when absent or
    malformed, and for TIFF, whose orientation Pillow applies itself (its size is already upright)."""
    if im.format == "TIFF":
        return 1
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: decoders ignore it too
        return 1
    return value if 1 <= value <= 8 else 1


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation (1..8) of an image file, from its header; 1 when absent (or not an image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _orientation(im)
    except Exception:
        return 1


def upright(img: Tensor, orientation: int) -> Tensor:
    """An image ``[..., H, W]`` as stored, turned upright for its EXIF ``orientation`` (as Pillow's
    ``ImageOps.exif_transpose`` does; 1 or an unknown value: unchanged)."""
    return _upright(img, orientation)


def _upright(img: Tensor, orientation: int) -> Tensor:
    """``img`` ``[C, H, W]`` as stored, turned upright for its EXIF ``orientation`` (Pillow's ``exif_transpose``)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def _regular(path: Path) -> None:
    """Refuse FIFOs, devices and folders before opening them (reading a FIFO blocks for ever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the open that follows reports it
    if not stat.S_ISREG(mode):
        raise ValueError(f"image file {str(path)!r} is not a regular file (a folder, FIFO or device): remove it")


def _decode_float(path: Path, channels: int | None) -> Tensor:
    """A float TIFF (Pillow mode ``F``, one channel) as float32 ``[C, H, W]`` (values as stored)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im, dtype=np.float32)
    out = torch.from_numpy(np.array(arr, dtype=np.float32))[None]
    return out.expand(3, -1, -1).contiguous() if channels == 3 else out


def _decode(path: Path, channels: int | None, pil_mode: str = "", pillow: bool = False) -> Tensor:
    """Decode to an integer tensor ``[C, H, W]`` (uint8 or uint16) with ``channels`` channels (None: as stored;
    palette images expanded to RGB), with torchvision, or with Pillow when ``pillow`` or torchvision cannot."""
    if not pillow:
        from torchvision.io import ImageReadMode, decode_image, read_file

        if channels is None and pil_mode == "P":
            channels = 3  # UNCHANGED would give the palette indices
        mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
        if channels == 1 and path.suffix.lower() in (".webp", ".gif"):
            mode = ImageReadMode.RGB  # torchvision has no grey read for these: read_image takes the luma
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
                return decode_image(read_file(str(path)), mode=mode)
        except RuntimeError as err:
            if "Unsupported image file" not in str(err):
                raise
    # BMP, TIFF, ... (or asked for): Pillow.
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode == "RGB" and _colour_tiff_bits(im) > 8:
            deep = _read_deep_tiff(path)
            if deep is not None:
                return _fit_channels(deep, channels) if channels is not None else deep
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
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # a writable copy, C-contiguous


def _colour_tiff_bits(im) -> int:
    """Bits per sample of an open Pillow TIFF (0 for other formats): Pillow reads 16-bit colour TIFFs as 8-bit RGB."""
    if im.format != "TIFF":
        return 0
    bits = getattr(im, "tag_v2", {}).get(258, 8)  # BitsPerSample
    return int(max(bits)) if isinstance(bits, tuple) else int(bits)


def _read_deep_tiff(path: Path) -> Tensor | None:
    """A 16-bit colour TIFF as uint16 ``[C, H, W]`` (alpha dropped) through ``tifffile``, which Pillow cannot read
    at full depth; None, with a warning that the image is read at 8 bits, when ``tifffile`` is not installed or the
    file is not 16-bit unsigned RGB(A)."""
    import numpy as np

    try:
        import tifffile
    except ImportError:
        warnings.warn(
            f"{str(path)!r} is a 16-bit colour TIFF: read at 8 bits per channel (Pillow's limit); "
            f"pip install tifffile to keep its precision, or convert it to a 16-bit PNG",
            stacklevel=4,
        )
        return None
    arr = tifffile.imread(str(path))
    if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        return None
    return torch.from_numpy(arr[..., :3].transpose(2, 0, 1).astype(np.int32)).to(torch.uint16)


def read_image(
    path: str | os.PathLike,
    channels: int | None = 3,
    max_pixels: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    decoder: Literal["torchvision", "pillow"] = "torchvision",
) -> Tensor:
    """Read an image file as a tensor ``[C, H, W]``: floats in [0, 1] (default float32), or uint8 levels.

    Args:
        path: the image file (PNG 8/16-bit, JPEG, WebP, GIF; BMP and TIFF through Pillow).
        channels: 3 (RGB; grey images are repeated), 1 (grey; colour is converted to luma) or ``None`` (as stored,
            alpha dropped, palettes expanded).
        max_pixels: refuse images with more than ``height * width`` pixels, checked on the header before any
            pixel is decoded (:class:`ImageTooLargeError`); None: no limit of ours (Pillow still refuses
            decompression bombs above ``2 * PIL.Image.MAX_IMAGE_PIXELS``).
        dtype: a floating dtype (values ``level / 255``, or ``/ 65535`` for 16-bit images, computed in that
            dtype), or ``torch.uint8`` (8-bit levels as stored; 16-bit levels scaled to 8 bits,
            ``round(v / 65535 * 255)``; float TIFFs quantised like :func:`to_uint8`).
        decoder: ``"pillow"`` decodes every format with Pillow (``Image.convert("L")``'s luma for colour images
            read as grey, which differs from libpng's and libjpeg's by up to one level), as the kernel and mask
            loader and the dataset tools do; ``"torchvision"`` uses :mod:`torchvision.io` where it can.
    Raises:
        ValueError: naming the file when it is missing, empty, not an image, truncated or otherwise undecodable,
            too large, or holds NaN or infinite values.
    """
    path = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    if decoder not in ("torchvision", "pillow"):
        raise ValueError(f"decoder must be 'torchvision' or 'pillow', got {decoder!r}")
    _regular(path)
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {str(path)!r} is empty (0 bytes); re-export or remove it")
    h, w, pil_mode, frames, orientation = _header(path)
    if frames > 1:
        raise ValueError(
            f"image file {str(path)!r} is animated ({frames} frames): save the frame to restore as a PNG and use that"
        )
    if max_pixels is not None and h * w > max_pixels:
        raise ImageTooLargeError(
            f"image file {str(path)!r} is {w}x{h} = {h * w} pixels, above the limit of {max_pixels} pixels; "
            f"raise the limit (data.max_pixels) if you have the memory, or downscale or crop the image"
        )
    try:
        if pil_mode == "F":
            img = _decode_float(path, channels)
        else:
            img = _decode(path, channels, pil_mode, pillow=decoder == "pillow")
    except Exception as err:  # torchvision and Pillow raise assorted errors for corrupt files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        msg = _TORCHVISION_WHERE.sub("", msg)
        raise ValueError(
            f"cannot read image file {str(path)!r}: {msg} (the file is truncated or corrupt: re-export or remove it)"
        ) from err
    if img.ndim == 2:
        img = img[None]
    img = _upright(img, orientation)
    if channels is None and img.shape[0] in (2, 4):
        img = img[:-1]  # drop alpha
    if channels is not None and img.shape[0] != channels:
        img = _fit_channels(img, channels)  # torchvision ignores the read mode for some formats (WebP, GIF)
    if img.is_floating_point():
        bad = int((~torch.isfinite(img)).sum())
        if bad:
            raise ValueError(
                f"image file {str(path)!r} holds {bad // img.shape[0]} NaN or infinite pixel value(s); "
                f"fix or remove the file (replace them, e.g. numpy.nan_to_num, and save again)"
            )
        return to_uint8(img) if dtype == torch.uint8 else img.to(dtype)
    if dtype == torch.uint8:
        if img.dtype == torch.uint16:
            return (img.float() / 65535 * 255).round().clamp(0, 255).to(torch.uint8)
        return img
    if img.dtype == torch.uint16:
        return img.to(torch.int32).to(dtype) / 65535.0
    return img.to(dtype) / 255.0


def _fit_channels(img: Tensor, channels: int) -> Tensor:
    """``img`` ``[C, H, W]`` (integer or float) with ``channels`` channels: alpha dropped, RGB -> grey by the
    ITU-R 601 luma weights (rounded for integer images), grey -> RGB repeated."""
    if img.shape[0] in (2, 4):
        img = img[:-1]
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(3, 1, 1)
    grey = (img.to(torch.float64) * weights).sum(0, keepdim=True)
    if img.is_floating_point():
        return grey.to(img.dtype)
    top = 65535 if img.dtype == torch.uint16 else 255
    return grey.round().clamp(0, top).to(torch.int32).to(img.dtype)


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
    with atomic_output(path) as tmp:
        tmp.write_bytes(png.numpy().tobytes())
    return path


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically (``os.replace``), on
    error it is removed. Parent folders are created. The one atomic writer of the package (checkpoints, PNGs,
    manifests, weight files).

    The temporary file is made by ``mkstemp`` (created exclusively: never through an existing file or link) and
    named ``.<final name>.diffpir-<pid>-<random>.tmp``; the final file gets the mode a plain ``open()`` would give
    it (0666 less the umask).

    >>> with atomic_output("out/model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{_TEMP_TAG}-{os.getpid()}-"
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 and some writers (safetensors) recreate the file: give the final file the mode a plain
        # open() would give it (0666 less the umask), as every other output has.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_owner(name: str) -> int | None:
    """The pid of the process that made the temporary file ``name`` (a file name of :func:`atomic_output`'s
    form), or None when ``name`` is not one of ours."""
    m = _TEMP.match(name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temp_files(root: str | os.PathLike, subdirs: Iterable[str] = ()) -> list[Path]:
    """Delete the temporary files that atomic writes of killed runs left in ``root`` and ``root/<subdir>``.

    Not recursive: only these folders are looked at. Only regular files named like ours
    (``.<name>.diffpir-<pid>-<random>.tmp``, see :func:`atomic_output`) whose process ``pid`` no
    longer runs are removed, so the in-progress files of another live run and anyone else's hidden ``.a.b.tmp``
    files are left alone. Returns the removed paths.
    """
    root = Path(root)
    removed = []
    for folder in [root, *(root / s for s in subdirs)]:
        if folder.is_symlink() or not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            pid = temp_owner(p.name)
            if pid is None or pid_alive(pid) and pid != os.getpid():
                continue
            if p.is_symlink() or not p.is_file():
                continue
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def safe_output_name(key: str) -> str:
    """A file name (no folder part, no suffix) for an image key that cannot escape the output folder.

    Keys made of letters, digits, ``.``, ``_`` and ``-`` starting with a letter or digit are kept as they are,
    unless they end like a hashed name (``-`` and 8 hex digits, or 8 hex digits alone). Any other key (path
    separators, ``..``, spaces, non-ASCII, a leading dot or dash, overlong, or looking hashed) has every other
    character replaced by ``_``, leading dots and dashes removed (no hidden files, nothing a shell takes for an
    option) and an 8-hex-digit hash of the original key appended: ``"sub/cat"`` -> ``"sub_cat-<hash>"``,
    ``"-rf"`` -> ``"rf-<hash>"``, ``"my_photo-5fe47574"`` -> ``"my_photo-5fe47574-<hash>"``. So a kept name never
    looks hashed, and two keys share a name only if their hashes collide (the data module refuses that too).
    """
    key = str(key)
    if not key:
        raise ValueError("an image key must not be empty")
    if _SAFE.match(key) and len(key) <= _MAX_NAME and not _HASHED.search(key):
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    body = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".-")[:_MAX_NAME].rstrip(".")
    return f"{body}-{digest}" if body else digest
