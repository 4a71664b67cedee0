"""diffpir.io is the one home for listing and reading images and for atomic writes: the readers it replaced (the
training reader, the dataset loader, the kernel/mask reader) are kept here verbatim as references, and the one
reader must give the same pixels, bit for bit, with the options their callers now pass."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from diffpir.io import (
    IMAGE_SUFFIXES,
    ImageFolderNotFoundError,
    atomic_output,
    exif_orientation,
    list_image_files,
    read_image,
    temp_owner,
    upright,
)
from diffpir.operators.loading import load_array


# -- the old readers, verbatim ----------------------------------------------------------------------------
def old_train_read_image(path, channels: int) -> torch.Tensor:  # diffpir/training/data.py
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    img = upright(decode_image(str(path), mode=mode), exif_orientation(path))
    if img.dtype != torch.uint8:
        img = (img.float() / torch.iinfo(img.dtype).max * 255).round().clamp(0, 255).to(torch.uint8)
    return img


def old_load_image(path, mode: str = "RGB") -> torch.Tensor:  # diffpir/datasets.py
    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def old_read_gray(path) -> torch.Tensor:  # diffpir/operators/io.py
    with Image.open(path) as img:
        if img.mode.startswith("I;16"):
            arr = np.asarray(img, dtype=np.float64) / 65535.0
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    return torch.from_numpy(arr.copy())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One file per kind of image the callers meet (colour, grey, 16-bit, palette, alpha; PNG, JPEG, WebP, BMP)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (19, 23), dtype=np.uint8)
    out: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        out[name] = root / name
        im.save(out[name], **kw)

    save("rgb.png", Image.fromarray(rgb))
    save("grey.png", Image.fromarray(grey))
    save("rgba.png", Image.fromarray(np.dstack([rgb, grey])))
    save("la.png", Image.fromarray(np.dstack([grey, grey[::-1]])).convert("LA"))
    save("pal.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    save("g16.png", Image.fromarray(rng.integers(0, 65536, (19, 23), dtype=np.uint16)))
    save("rgb.jpg", Image.fromarray(rgb), quality=90)
    save("grey.jpg", Image.fromarray(grey), quality=90)
    save("rgb.webp", Image.fromarray(rgb), lossless=True)
    save("rgb.bmp", Image.fromarray(rgb))
    save("grey.bmp", Image.fromarray(grey))
    return out


TRAIN_FILES = ["rgb.png", "grey.png", "rgba.png", "la.png", "pal.png", "g16.png", "rgb.jpg", "grey.jpg", "rgb.webp"]


@pytest.mark.parametrize("name", TRAIN_FILES)
@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_reading_is_the_old_training_reader(images, name, channels):
    if name == "rgb.webp" and channels == 1:
        pytest.skip(
            "the old reader returned RGB for a grey read of WebP (torchvision has none); read_image takes its "
            "luma now (tests/test_reliability_restore.py::test_webp_gif_and_16bit_colour_tiff_are_read_as_asked)"
        )
    got = read_image(images[name], channels, dtype=torch.uint8)
    assert got.dtype == torch.uint8
    assert torch.equal(got, old_train_read_image(images[name], channels))


def test_uint8_reading_keeps_the_exif_orientation(tmp_path):
    arr = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "phone.png", exif=exif)
    got = read_image(tmp_path / "phone.png", 3, dtype=torch.uint8)
    assert got.shape == (3, 4, 6)
    assert torch.equal(got, old_train_read_image(tmp_path / "phone.png", 3))


@pytest.mark.parametrize("name", sorted(TRAIN_FILES + ["rgb.bmp", "grey.bmp"]))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pillow_reading_is_the_old_dataset_loader(images, name, mode):
    got = read_image(images[name], 3 if mode == "RGB" else 1, decoder="pillow")
    assert got.dtype == torch.float32
    if name == "g16.png":  # the old loader clipped 16-bit levels to 255; the one reader keeps their precision
        levels = torch.from_numpy(np.asarray(Image.open(images[name])).astype(np.float64) / 65535).float()
        assert torch.equal(got, levels.expand_as(got))
        return
    assert torch.equal(got, old_load_image(images[name], mode))


@pytest.mark.parametrize("name", sorted(TRAIN_FILES + ["rgb.bmp", "grey.bmp"]))
def test_kernel_and_mask_images_are_read_as_before(images, name):
    got = load_array(images[name], "mask")
    assert got.dtype == torch.float64 and got.shape == (19, 23)
    assert torch.equal(got, old_read_gray(images[name]))


def test_float_reading_is_unchanged_for_the_sample_photos():
    from diffpir.datasets import sample_images

    for path in sample_images():
        x = read_image(path)
        assert x.dtype == torch.float32 and x.shape == (3, 256, 256)
        assert torch.equal(x, old_load_image(path))  # 8-bit RGB PNGs: torchvision and Pillow agree
        assert torch.equal(read_image(path, dtype=torch.uint8), (x * 255).round().to(torch.uint8))


def test_reader_options_are_checked(images):
    with pytest.raises(ValueError, match="dtype must be"):
        read_image(images["rgb.png"], dtype=torch.int32)
    with pytest.raises(ValueError, match="decoder must be"):
        read_image(images["rgb.png"], decoder="cv2")


# -- listing ------------------------------------------------------------------------------------------------
def test_one_lister(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for rel in ["x.png", "y.JPG", "z.tif", "deep/w.webp", "notes.txt", ".tmp.png", ".hidden/v.png"]:
        (tmp_path / "a" / rel).write_bytes(b"")
    names = [p.relative_to(tmp_path / "a").as_posix() for p in list_image_files(tmp_path / "a")]
    assert names == ["deep/w.webp", "x.png", "y.JPG", "z.tif"]
    flat = [p.name for p in list_image_files(tmp_path / "a", recursive=False)]
    assert flat == ["x.png", "y.JPG", "z.tif"]
    assert list_image_files(tmp_path / "a" / "x.png") == [tmp_path / "a" / "x.png"]
    with pytest.raises(ImageFolderNotFoundError, match="does not exist") as err:
        list_image_files(tmp_path / "missing")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)  # training and restoring
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


# -- atomic writes ------------------------------------------------------------------------------------------
def test_atomic_output_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    with atomic_output(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".f.bin.diffpir-")
        assert temp_owner(tmp.name) == os.getpid()
        tmp.write_bytes(b"one")
    assert path.read_bytes() == b"one"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError, match="boom"), atomic_output(path) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # the temporary file is gone
    assert temp_owner("f.bin") is None and temp_owner(".f.bin.x.tmp") is None
