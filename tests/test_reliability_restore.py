"""Reliability of ``diffpir-restore``: bad inputs are reported and skipped while the rest is restored, a killed run
resumes to byte-identical outputs with nothing partial ever visible, untrusted files are refused, output names stay
inside the output folder, and config mistakes give a clear message. CPU, tiny prior, 16-48 px images."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import Malicious, quiet_trainer
from PIL import Image

from diffpir.cli.restore import main
from diffpir.io import ImageTooLargeError, read_image, remove_temp_files
from diffpir.methods import DiffPIRMethod
from diffpir.models import build_unet
from diffpir.operators import Blur, gaussian_kernel
from diffpir.prior import Prior
from diffpir.restoration import Degradation, RestorationDataModule, RestorationModule, RestorationWriter
from diffpir.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
DENOISE = ROOT / "configs" / "restore" / "denoise.yaml"
QUICK = "--model.method.steps 3 --model.lpips false --trainer.accelerator cpu --trainer.devices 1"
QUICK += " --trainer.enable_progress_bar false --trajectory.first_k 0"


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])  # LightningCLI warns about pytest's own arguments


def _rgb(size: int = 16, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims ``w x h`` pixels and that holds none (a cheap stand-in for a huge image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _nan_tiff(path: Path, size: int = 16) -> Path:
    arr = np.full((size, size), 0.5, np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr).save(path)
    return path


def _truncated(path: Path, fmt: str, seed: int = 0) -> Path:
    Image.fromarray(_rgb(32, seed)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


GOOD = ["good", "my photo", "ünïcode", "-dash", "a..b", "grey", "palette", "rgba", "deep16"]
BAD = {  # stem: (file name, what the reason must say)
    "truncated": ("truncated.png", r"truncated or corrupt"),
    "cut": ("cut.jpg", r"truncated or corrupt"),
    "empty": ("empty.png", r"empty \(0 bytes\)"),
    "notes": ("notes.png", r"not an image"),
    "nan": ("nan.tif", r"NaN or infinite"),
    "huge": ("huge.png", r"above the limit of 1000000 pixels"),
    "bomb": ("bomb.png", r"decompression bomb"),
}


def _bad_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(GOOD[:5]):
        Image.fromarray(_rgb(16, i)).save(folder / f"{stem}.png")
    Image.fromarray(_rgb(16, 5)).convert("L").save(folder / "grey.png")
    Image.fromarray(_rgb(16, 6)).convert("P").save(folder / "palette.png")
    Image.fromarray(_rgb(16, 7)).convert("RGBA").save(folder / "rgba.png")
    deep = (np.random.default_rng(8).random((16, 16)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    _truncated(folder / "truncated.png", "PNG")
    _truncated(folder / "cut.jpg", "JPEG", seed=1)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are not pixels\n")
    _nan_tiff(folder / "nan.tif")
    _png_header_only(folder / "huge.png", 5000, 5000)
    _png_header_only(folder / "bomb.png", 20000, 20000)  # above Pillow's own bomb limit
    return folder


def _write_images(folder: Path, n: int, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_rgb(size, 100 + i)).save(folder / f"img{i}.png")
    return folder


def _predict(prior, images: Path, out: Path, spec: Degradation, mode="benchmark", batch_size=2, data_kw=None):
    module = RestorationModule(prior, method=DiffPIRMethod(steps=3), lpips=False)
    data = RestorationDataModule(str(images), mode=mode, degradation=spec, batch_size=batch_size, **(data_kw or {}))
    writer = RestorationWriter(str(out))
    trainer = quiet_trainer(callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return module, writer


def _failed(out: Path) -> dict[str, dict[str, str]]:
    if not (out / "failed.json").exists():  # written only when something failed
        return {}
    return {f["key"]: f for f in json.loads((out / "failed.json").read_text(encoding="utf-8"))}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]


# ---------------------------------------------------------------------------------------------------------
# Reading: conversions that must work, bad files that must fail clearly
# ---------------------------------------------------------------------------------------------------------
def test_16bit_palette_grey_and_rgba_images_are_converted(tmp_path):
    rgb = _rgb(12, 1)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    palette_rgb = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    for channels in (3, None):  # "as stored" expands the palette too (not the palette indices)
        x = read_image(tmp_path / "p.png", channels)
        assert torch.equal((x * 255).round().byte(), torch.from_numpy(palette_rgb).permute(2, 0, 1))

    rgba = np.concatenate([rgb, np.full((12, 12, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for channels in (3, None):  # alpha dropped, not composited
        x = read_image(tmp_path / "rgba.png", channels)
        assert torch.equal((x * 255).round().byte(), torch.from_numpy(rgb).permute(2, 0, 1))

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    x = read_image(tmp_path / "grey.png")
    assert x.shape == (3, 12, 12) and torch.equal(x[0], x[2])
    assert torch.equal((x[0] * 255).round().byte(), torch.from_numpy(grey))

    deep = (np.random.default_rng(2).random((12, 12)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    x = read_image(tmp_path / "deep.png")
    assert x.shape == (3, 12, 12)
    torch.testing.assert_close(x[1].double(), torch.from_numpy(deep / 65535.0), rtol=0, atol=1e-6)


def test_bad_files_fail_with_a_message_naming_the_file(tmp_path):
    folder = _bad_folder(tmp_path / "in")
    for stem, (name, reason) in BAD.items():
        with pytest.raises(ValueError, match=reason) as info:
            read_image(folder / name, max_pixels=1_000_000)
        assert name in str(info.value), stem
        assert "decode_png.cpp" not in str(info.value)  # torchvision's source locations are stripped


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    import diffpir.io

    Image.fromarray(_rgb(64)).save(tmp_path / "big.png")

    def no_decode(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(diffpir.io, "_decode", no_decode)
    with pytest.raises(ImageTooLargeError, match=r"big\.png' is 64x64 = 4096 pixels, above the limit of 4095"):
        read_image(tmp_path / "big.png", max_pixels=4095)


# ---------------------------------------------------------------------------------------------------------
# The CLI: one bad image is reported and skipped, the rest restored, exit status 1 with a summary
# ---------------------------------------------------------------------------------------------------------
def test_cli_skips_bad_images_restores_the_rest_and_exits_nonzero(prior_file, tmp_path, caplog):
    folder = _bad_folder(tmp_path / "in")
    out = tmp_path / "out"
    args = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--writer.output_dir", str(out)]
    args += ["--data.images", str(folder), "--data.max_pixels", "1000000", "--data.batch_size", "4"]
    args += ["--data.num_workers", "1", *QUICK.split()]
    caplog.set_level(logging.INFO, logger="diffpir")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 1

    restored = sorted(p.name for p in (out / "restored").iterdir())
    assert len(restored) == len(GOOD)
    assert not any(n.startswith(("-", ".")) for n in restored)  # "-dash" and odd characters are made safe
    assert {"good.png", "a..b.png", "grey.png", "palette.png", "rgba.png", "deep16.png"} <= set(restored)
    for name in restored:
        assert read_image(out / "restored" / name).shape == (3, 16, 16)

    failed = _failed(out)
    assert set(failed) == set(BAD)
    for stem, (name, reason) in BAD.items():
        assert failed[stem]["file"] == str(folder / name)
        assert name in failed[stem]["reason"] and re.search(reason, failed[stem]["reason"]), stem

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["count"], summary["requested"], summary["failed"], summary["missing"]) == (9, 16, 7, 0)
    assert len(_csv_rows(out / "metrics.csv")) == 9
    messages = [r.getMessage() for r in caplog.records]
    assert f"restored 9 of 16 images; 7 failed: see {out / 'failed.json'}" in messages
    assert any("skipped" in m and "empty.png" in m for m in messages)

    # Fixing a file and rerunning restores it and takes it off the failure list; the rest is not redone.
    Image.fromarray(_rgb(16, 9)).save(folder / "empty.png")
    with pytest.raises(SystemExit):
        main(args)
    assert "empty" not in _failed(out) and (out / "restored" / "empty.png").is_file()
    assert json.loads((out / "summary.json").read_text())["failed"] == 6


def test_out_of_memory_retries_one_by_one_then_skips_the_image(prior_file, tmp_path, monkeypatch, caplog):
    images = _write_images(tmp_path / "in", 3)
    base = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), *QUICK.split()]
    base += ["--data.images", str(images)]
    main([*base, "--writer.output_dir", str(tmp_path / "ref"), "--data.batch_size", "1"])

    original = RestorationModule.restore
    calls: list[list[str]] = []

    def restore(self, batch):
        calls.append(list(batch.keys))
        if len(batch) > 1 or batch.keys == ["img1"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(RestorationModule, "restore", restore)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="diffpir")
    with pytest.raises(SystemExit) as info:
        main([*base, "--writer.output_dir", str(out), "--data.batch_size", "3"])
    assert info.value.code == 1
    assert calls == [["img0", "img1", "img2"], ["img0"], ["img1"], ["img2"]]
    failed = _failed(out)
    assert set(failed) == {"img1"} and re.search(
        r"out of memory restoring a 16x16 image.*tile_size", failed["img1"]["reason"]
    )
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["img0.png", "img2.png"]
    for name in ("img0.png", "img2.png"):  # the retry gives what a batch of one gives
        assert (out / "restored" / name).read_bytes() == (tmp_path / "ref" / "restored" / name).read_bytes()
    assert any("retrying them one at a time" in r.getMessage() for r in caplog.records)

    # Other errors are not swallowed.
    def broken(self, batch):
        raise RuntimeError("shape mismatch in a user operator")

    monkeypatch.setattr(RestorationModule, "restore", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main([*base, "--writer.output_dir", str(tmp_path / "out2")])


def test_cli_exits_zero_when_every_image_is_restored(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    main(["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--writer.output_dir", str(out)]
         + ["--data.images", str(images), *QUICK.split()])  # fmt: skip
    assert not (out / "failed.json").exists()  # only when something failed
    assert json.loads((out / "summary.json").read_text())["count"] == 2


# ---------------------------------------------------------------------------------------------------------
# Kernels, masks, truths, scales: per-image problems of real and benchmark mode
# ---------------------------------------------------------------------------------------------------------
def test_real_mode_kernel_problems_are_per_image(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 6)
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    np.save(kernels / "img0.npy", gaussian_kernel(3, 1.0).numpy())
    np.save(kernels / "img1.npy", gaussian_kernel(5, 1.0).numpy())  # another size in the same batch: fine
    np.save(kernels / "img2.npy", np.ones((3, 3)))  # sums to 9: normalised with a warning naming the file
    np.save(kernels / "img3.npy", np.ones((4, 4)) / 16)  # even size
    np.save(kernels / "img4.npy", gaussian_kernel(31, 5.0).numpy())  # larger than the 16 px image
    # img5: no kernel at all
    spec = Degradation(task="deblur", kernel=str(kernels), sigma_n=0.02)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"kernel file .*img2\.npy' sums to 9, not 1: normalised"):
        _, writer = _predict(str(prior_file), images, out, spec, mode="real", batch_size=3)
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    failed = _failed(out)
    assert set(failed) == {"img3", "img4", "img5"} and writer.failed == 3
    assert "img3.npy" in failed["img3"]["reason"] and "even" in failed["img3"]["reason"]
    assert "img4.png" in failed["img4"]["reason"]  # the image whose kernel does not fit
    assert "no kernel for image 'img5'" in failed["img5"]["reason"]


def test_real_mode_mask_and_truth_of_the_wrong_size(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 2)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(masks / "img0.png")
    Image.fromarray(np.full((12, 16), 255, np.uint8)).save(masks / "img1.png")
    spec = Degradation(task="inpaint_mask", mask=str(masks), sigma_n=0.0)
    out = tmp_path / "out"
    _predict(str(prior_file), images, out, spec, mode="real")
    failed = _failed(out)
    assert set(failed) == {"img1"}
    assert "img1.png' is 16x12 (width x height) but the image is 16x16" in failed["img1"]["reason"]  # WxH

    truth = _write_images(tmp_path / "truth", 2, size=20)
    (truth / "img0.png").unlink()
    Image.fromarray(_rgb(16, 3)).save(truth / "img0.png")
    out = tmp_path / "out_truth"
    _predict(str(prior_file), images, out, Degradation(task="denoise"), mode="real", data_kw={"truth": str(truth)})
    failed = _failed(out)
    assert set(failed) == {"img1"} and "is 20x20 but the restoration" in failed["img1"]["reason"]
    rows = _csv_rows(out / "metrics.csv")
    assert [r["key"] for r in rows] == ["img0"] and float(rows[0]["psnr"]) > 0


def test_scale_that_does_not_divide_the_size(prior_file, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(_rgb(18, 0)).save(images / "odd.png")
    Image.fromarray(_rgb(3, 1)).save(images / "tiny.png")  # smaller than the scale
    out = tmp_path / "out"
    warning = r"odd\.png': 18x18 is not divisible by the SR scale 4; centre-cropped to 16x16"
    with pytest.warns(UserWarning, match=warning):
        _predict(str(prior_file), images, out, Degradation(task="sr_x4"))
    assert read_image(out / "restored" / "odd.png").shape == (3, 16, 16)
    assert "smaller than the SR scale 4" in _failed(out)["tiny"]["reason"]
    # real mode: any measurement size restores to scale x its size
    real_out = tmp_path / "real"
    Image.fromarray(_rgb(17, 2)[:, :13]).save(images / "odd.png")
    (images / "tiny.png").unlink()
    _predict(str(prior_file), images, real_out, Degradation(task="sr_x4"), mode="real")
    assert read_image(real_out / "restored" / "odd.png").shape == (3, 68, 52)


def test_non_finite_measurement_tensor_is_refused_naming_the_problem():
    prior = Prior(build_unet("tiny"), NoiseSchedule.linear())
    module = RestorationModule(prior, method=DiffPIRMethod(steps=2), lpips=False)
    y = torch.rand(1, 3, 16, 16)
    y[0, 1, 2, 3] = float("nan")
    y[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"y contains 2 NaN or infinite value\(s\)"):
        module(y, Blur(gaussian_kernel(3, 1.0)), 0.05, ["a"])


# ---------------------------------------------------------------------------------------------------------
# Untrusted files, output names, config mistakes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt"])
def test_cli_refuses_a_prior_that_carries_code(tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    evil = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Malicious(str(marker))}, evil)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["predict", "--config", str(DENOISE), "--model.prior", str(evil), "--writer.output_dir", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"diffpir-restore: error: refused to load {evil}" in err and "GLOBAL os.makedirs" in err
    assert "Traceback" not in err
    assert not marker.exists() and not (out / "restored").exists()


@pytest.mark.parametrize("key", ["../../escape", "/abs/evil", "sub/../../x", "..", "-rf", "a\\..\\b", "ok"])
def test_output_names_cannot_escape_the_output_folder(tmp_path, key):
    out = tmp_path / "out"
    writer = RestorationWriter(str(out), save_degraded=True, save_grid=True)
    trainer = SimpleNamespace(global_rank=0)
    img = torch.rand(3, 4, 4)
    writer.write_item(trainer, {"key": key, "restored": img, "degraded": img, "truth": img, "metrics": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    files = _visible_files(out)
    assert len(files) == 4  # degraded, grid, restored, metrics part file
    for f in files:
        assert f.resolve().is_relative_to(out.resolve()) and not f.name.startswith(("-", "."))
    assert writer.is_done(key)


def test_unknown_config_key_and_wrong_type_name_the_key(prior_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  stepz: 3\n")
    cases = [
        (["--config", str(bad)], "model.stepz"),
        (["--model.method.steps", "abc"], "model.method"),
        (["--data.degradation.kernel_sise", "5"], "kernel_sise"),
    ]
    for extra, named in cases:
        with pytest.raises(SystemExit) as info:
            main(["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (extra, err[-500:])


def test_missing_prior_and_empty_folder_are_one_line_errors(prior_file, tmp_path, capsys):
    for extra, message in [
        (["--model.prior", str(tmp_path / "nope.safetensors")], "prior file not found"),
        (["--model.prior", str(prior_file), "--data.images", str(tmp_path)], "no images found"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["predict", "--config", str(DENOISE), "--writer.output_dir", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 1 and message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------------------
def test_leftovers_of_a_crash_are_cleaned_and_nothing_is_lost(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 5)
    spec = Degradation(task="deblur_gaussian", kernel_size=5, kernel_std=1.0)
    _predict(str(prior_file), images, tmp_path / "ref", spec)
    out = tmp_path / "out"
    _predict(str(prior_file), images, out, spec)
    # What a SIGKILL can leave: temporary files, a row cut short, rows without PNGs.
    dead = _dead_pid()
    (out / "restored" / f".img3.png.diffpir-{dead}-k2j3h4.tmp").write_bytes(b"\x89PNG partial")
    (out / f".metrics.csv.diffpir-{dead}-abc123.tmp").write_text("key,fi")
    (out / "restored" / "img3.png").unlink()
    (out / "restored" / "img4.png").unlink()
    with open(out / "metrics" / "rank0.jsonl", "a") as f:
        f.write('{"key": "img3", "psnr": 1')
    module, writer = _predict(str(prior_file), images, out, spec)
    assert module.images_sampled == 2 and writer.failed == 0
    assert not list(out.rglob("*.tmp"))
    for i in range(5):
        name = f"img{i}.png"
        assert (out / "restored" / name).read_bytes() == (tmp_path / "ref" / "restored" / name).read_bytes()
    assert _csv_rows(out / "metrics.csv") == _csv_rows(tmp_path / "ref" / "metrics.csv")
    lines = (out / "metrics" / "rank0.jsonl").read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith('{"key": "img3", "file"')) == 2  # the new row is intact


def _dead_pid() -> int:
    """The pid of a process that has exited (what a SIGKILLed run leaves in its temporary file names)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_remove_temp_files_only_removes_ours(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    ours = [tmp_path / f".a.png.diffpir-{dead}-x1y2z3.tmp", tmp_path / "sub" / f".summary.json.diffpir-{dead}-q.tmp"]
    theirs = [
        tmp_path / "a.tmp",
        tmp_path / ".hidden.tmp",
        tmp_path / ".a.b.tmp",  # someone else's hidden temporary file
        tmp_path / ".a.png.x1y2z3.tmp",
        tmp_path / "a.png",
        tmp_path / f".b.png.diffpir-{live}-x1y2z3.tmp",  # a live run's write in progress
        tmp_path / "other" / f".c.png.diffpir-{dead}-x1y2z3.tmp",  # not one of the folders to clean
    ]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    assert sorted(remove_temp_files(tmp_path, ["sub"])) == sorted(ours)
    assert all(p.exists() for p in theirs)


def _check_visible(out: Path) -> int:
    """Every visible file under ``out`` is complete: PNGs decode, JSON parses. Returns the restored PNGs."""
    restored = 0
    for f in _visible_files(out):
        if f.suffix == ".png":
            try:
                read_image(f)
            except ValueError as err:
                if f.exists():  # replaced under us is fine; a partial file is not
                    raise AssertionError(f"partial file visible: {f}: {err}") from err
            restored += f.parent.name == "restored"
        elif f.suffix == ".json":
            json.loads(f.read_text())
    return restored


@pytest.mark.slow
def test_sigkill_then_rerun_restores_every_image_byte_identically(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 8, size=48)
    common = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--data.images", str(images)]
    common += ["--model.method.steps", "40", "--model.lpips", "false", "--trainer.accelerator", "cpu"]
    common += ["--trainer.enable_progress_bar", "false", "--trajectory.first_k", "0", "--writer.save_grid", "true"]
    ref = tmp_path / "ref"
    main([*common, "--writer.output_dir", str(ref)])

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "diffpir.cli.restore", *common, "--writer.output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done == 0:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.01)
            done = _check_visible(out) if out.exists() else 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = _check_visible(out)
    assert 1 <= done < 8, f"{done} images restored before the kill"

    main([*common, "--writer.output_dir", str(out)])
    assert not list(out.rglob("*.tmp"))
    for kind in ("restored", "grid", "degraded"):
        names = sorted(p.name for p in (ref / kind).iterdir())
        assert names == sorted(p.name for p in (out / kind).iterdir()) and len(names) == 8
        for name in names:
            assert (out / kind / name).read_bytes() == (ref / kind / name).read_bytes(), f"{kind}/{name}"
    assert _csv_rows(out / "metrics.csv") == _csv_rows(ref / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["count"], summary["failed"], summary["missing"]) == (8, 0, 0)


# ---------------------------------------------------------------------------------------------------------
# Found by a review (2026-12-02): formats without a grey read, changed inputs, early failures, nested outputs
# ---------------------------------------------------------------------------------------------------------
def test_webp_gif_and_16bit_colour_tiff_are_read_as_asked(tmp_path):
    rgb = _rgb(12, 3)
    luma = torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))).int()
    for name in ("a.webp", "a.gif"):  # torchvision ignores the grey read mode for these two
        Image.fromarray(rgb).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
        stored = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("L"))).int()
        x = read_image(tmp_path / name, 1, dtype=torch.uint8)
        assert x.shape == (1, 12, 12) and int((x[0].int() - stored).abs().max()) <= 1
    assert int((read_image(tmp_path / "a.webp", 1, dtype=torch.uint8)[0].int() - luma).abs().max()) <= 1
    tifffile = pytest.importorskip("tifffile")
    deep = (np.random.default_rng(4).random((12, 10, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", deep)  # Pillow alone reads it at 8 bits
    x = read_image(tmp_path / "deep.tif", dtype=torch.float64)
    torch.testing.assert_close(x, torch.from_numpy(deep.transpose(2, 0, 1) / 65535.0), rtol=0, atol=1e-9)


def test_grey_prior_restores_a_webp_among_pngs(tmp_path):
    """A colour WebP for a grey prior used to stop the whole run (3 channels reached the sampler)."""
    from conftest import export_tiny_prior

    grey_prior = export_tiny_prior(tmp_path / "grey", in_channels=1, out_channels=1)
    images = _write_images(tmp_path / "in", 1)
    Image.fromarray(_rgb(16, 7)).save(images / "w.webp", lossless=True)
    out = tmp_path / "out"
    main(["predict", "--config", str(DENOISE), "--model.prior", str(grey_prior), "--writer.output_dir", str(out)]
         + ["--data.images", str(images), *QUICK.split()])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["count"], summary["failed"]) == (2, 0)
    assert read_image(out / "restored" / "w.png", None).shape == (1, 16, 16)


def test_rerun_restores_again_an_input_that_changed(prior_file, tmp_path, caplog):
    images = _write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    cmd = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--writer.output_dir", str(out),
           "--data.images", str(images), *QUICK.split()]  # fmt: skip
    main(cmd)
    first = {p.name: p.read_bytes() for p in (out / "restored").iterdir()}
    Image.fromarray(_rgb(16, 999)).save(images / "img1.png")  # another photo under the same name
    with caplog.at_level(logging.INFO):
        main(cmd)
    assert "changed since it was restored" in caplog.text
    second = {p.name: p.read_bytes() for p in (out / "restored").iterdir()}
    assert second["img0.png"] == first["img0.png"] and second["img1.png"] != first["img1.png"]
    rows = [json.loads(line) for line in (out / "metrics" / "rank0.jsonl").read_text().splitlines()]
    digest = hashlib.sha256((images / "img1.png").read_bytes()).hexdigest()
    assert rows[-1]["key"] == "img1" and rows[-1]["input_sha256"] == digest
    assert json.loads((out / "summary.json").read_text())["count"] == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(cmd)  # unchanged now: nothing to do
    assert "skipping 2 of 2 images already restored" in caplog.text


def test_a_folder_without_restorations_takes_new_settings(prior_file, tmp_path, capsys):
    images = _write_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    base = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--writer.output_dir", str(out),
            *QUICK.split()]  # fmt: skip
    with pytest.raises(SystemExit):  # a mistyped folder: one-line error, settings.json already written
        main([*base, "--data.images", str(tmp_path / "nope")])
    assert (out / "settings.json").is_file()
    main([*base, "--data.images", str(images), "--data.crop", "12"])  # other settings: taken, not refused
    assert json.loads((out / "summary.json").read_text())["count"] == 1
    with pytest.raises(SystemExit):  # now it holds a restoration: other settings are refused
        main([*base, "--data.images", str(images), "--data.crop", "10"])
    assert "holds restorations made with other settings" in capsys.readouterr().err


def test_output_folder_inside_the_image_folder_is_not_read_back(prior_file, tmp_path, caplog):
    images = _write_images(tmp_path / "in", 2)
    out = images / "restorations"
    cmd = ["predict", "--config", str(DENOISE), "--model.prior", str(prior_file), "--writer.output_dir", str(out),
           "--data.images", str(images), "--writer.save_degraded", "true", "--writer.save_grid", "true",
           *QUICK.split()]  # fmt: skip
    main(cmd)
    with caplog.at_level(logging.INFO):
        main(cmd)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["requested"], summary["count"]) == (2, 2)
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["img0.png", "img1.png"]
    assert "inside the output folder" in caplog.text


def test_user_mask_of_the_file_size_is_cropped_with_the_image(prior_file, tmp_path):
    images = _write_images(tmp_path / "in", 1, size=16)
    mask = np.full((16, 16), 255, np.uint8)
    mask[2:6, 3:12] = 0  # rows 2-5 missing; the centre 12x12 crop starts at row 2, column 2
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    main(["predict", "--config", str(ROOT / "configs" / "restore" / "inpaint_box.yaml"), "--model.prior",
          str(prior_file), "--writer.output_dir", str(out), "--data.images", str(images), "--data.crop", "12",
          "--data.degradation.task", "inpaint_mask", "--data.degradation.mask", str(tmp_path / "m.png"),
          "--writer.save_degraded", "true", *QUICK.split()])  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["count"] == 1
    y = read_image(out / "degraded" / "img0.png", dtype=torch.uint8)
    x = read_image(images / "img0.png", dtype=torch.uint8)[:, 2:14, 2:14]
    known = torch.from_numpy(mask[2:14, 2:14] > 0)
    assert torch.equal(y[:, ~known], torch.zeros_like(y[:, ~known]))  # the cropped mask's hole
    assert torch.equal(y[:, known], x[:, known])  # noiseless: the known pixels as they are
