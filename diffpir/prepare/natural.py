"""The ``natural`` dataset: training photographs read from Debian packages (fetched with ``apt-get download``,
streamed out of the ``.deb`` without unpacking it), downscaled so the short side is at most 640 px."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffpir.prepare.common import (
    Log,
    _atomic_write_png,
    _log,
    _png_ok,
    _read_manifest,
    _write_manifest,
    downscale_short_side,
)

__all__ = [
    "LOMIRI_16_PHOTOS_CC_BY",
    "LOMIRI_16_PHOTOS_CC_BY_SA",
    "MATE_PHOTOS",
    "NATURAL_SOURCES",
    "NATURAL_VAL",
    "OPENCV_PHOTOS",
    "PLASMA_PHOTOS",
    "DebSource",
    "fetch_deb",
    "iter_deb_files",
    "prepare_natural",
]


@dataclass(frozen=True)
class DebSource:
    """Photographs taken from one Debian package: ``package``, the folder inside it, and the files kept."""

    package: str
    folder: str
    keep: tuple[str, ...]
    prefix: str
    licence: str

    def output_stem(self, name: str) -> str:
        """The output name of ``name`` (without ``.png``): ``{prefix}_{stem}``, where the stem is the file's stem,
        or for a file in a sub-folder (KDE's ``<Wallpaper>/contents/images/<W>x<H>.jpg``) the sub-folder's name."""
        parts = Path(name).parts
        return f"{self.prefix}_{parts[0] if len(parts) > 1 else Path(name).stem}"


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

# Photographs of the Lomiri (Ubuntu Touch) wallpaper packages, grouped by the licence that their copyright file
# gives per file. Left out: the gradients and renders (umang, Fossa, Infinite-Sea, Painting-Colors,
# warty-final-ubuntu) and analogpattern (textured glass under a colour wash).
LOMIRI_16_PHOTOS_CC_BY = (
    "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg", "friends_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg", "sunset_by_Aitzol_Berasategi.jpg",
)  # fmt: skip
LOMIRI_16_PHOTOS_CC_BY_SA = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "free_by_Peter_Nerlich.jpg",
    "greentock_by_Peter_Nerlich.jpg",
)  # fmt: skip
# Colour photographs of KDE's plasma-workspace-wallpapers (Debian 12: 4:5.27.5-2), each at its largest
# 16:10 size. Licence: LGPL-3 per each wallpaper's metadata.json (the package's copyright file: GPL-2+).
# Left out: the renders and drawings (Altai, Autumn, Canopee, Cascade, Cluster, Elarun, Flow, FlyingKonqui,
# Honeywave, IceCold, Kay, Kokkini, MilkyWay, Opal, PastelHills, Patak, SafeLanding, Shell, Volna) and the
# grey Grey.
PLASMA_PHOTOS = tuple(
    f"{name}/contents/images/2560x1600.jpg"
    for name in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite",
        "OneStandsOut", "Path", "summer_1am",
    )
)  # fmt: skip

NATURAL_SOURCES = (
    DebSource(
        "opencv-doc", "usr/share/doc/opencv-doc/examples/data", OPENCV_PHOTOS, "opencv", "Apache-2.0 AND BSD-3-Clause"
    ),
    DebSource("mate-backgrounds", "usr/share/backgrounds/mate/nature", MATE_PHOTOS, "mate", "GPL-2+"),
    DebSource("lomiri-wallpapers-16.04", "usr/share/backgrounds", LOMIRI_16_PHOTOS_CC_BY, "lomiri", "CC-BY-4.0"),
    DebSource("lomiri-wallpapers-16.04", "usr/share/backgrounds", LOMIRI_16_PHOTOS_CC_BY_SA, "lomiri", "CC-BY-SA-4.0"),
    DebSource(
        "lomiri-wallpapers-16.04", "usr/share/backgrounds", ("seeding_by_Clements_Engelhardt.jpg",), "lomiri", "CC0-1.0"
    ),
    DebSource(
        "lomiri-wallpapers-20.04", "usr/share/backgrounds", ("Kleiber_by_Lukas_Baubkus.jpg",), "lomiri", "CC-BY-SA-3.0"
    ),
    DebSource("plasma-workspace-wallpapers", "usr/share/wallpapers", PLASMA_PHOTOS, "plasma", "LGPL-3"),
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
    ``max_short_side``. Output names are :meth:`DebSource.output_stem` + ``.png``; those named in ``val`` go to
    ``val/``.
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
        stem = src.output_stem(name)
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
