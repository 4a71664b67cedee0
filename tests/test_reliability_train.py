"""Reliability of ``diffpir-train``: unreadable training files are reported by name, skipped and counted while
16-bit, palette, grey and RGBA images are converted; config mistakes name the key; checkpoints and init files that
carry code are refused before anything runs; a run killed with SIGKILL resumes with ``--ckpt_path last`` exactly
where its last checkpoint left it (global step, EMA, optimizer). Tiny nets, 16 px crops, CPU."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Malicious, quiet_trainer
from PIL import Image

from diffpir.cli.train import main as cli_main
from diffpir.models import build_unet
from diffpir.training import DiffusionModule, ImageCropDataset, ImageFolderDataModule

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "smoke.yaml"


def _rgb(size: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8)."""
    low = np.random.default_rng(seed).random((4, 4, 3))
    img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
    return img


def _good_images(folder: Path, n: int = 6, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_rgb(size, i)).save(folder / f"img{i:02d}.png")
    return folder


BAD = ["truncated.png", "cut.jpg", "empty.png", "notes.png"]
CONVERTED = ["grey.png", "palette.png", "rgba.png", "deep16.png"]


def _mixed_folder(folder: Path) -> Path:
    _good_images(folder, 4)
    Image.fromarray(_rgb(24, 10)).convert("L").save(folder / "grey.png")
    Image.fromarray(_rgb(24, 11)).convert("P").save(folder / "palette.png")
    Image.fromarray(_rgb(24, 12)).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.random.default_rng(13).random((24, 24)) * 65535).astype(np.uint16)).save(folder / "deep16.png")
    for name, fmt in (("truncated.png", "PNG"), ("cut.jpg", "JPEG")):
        Image.fromarray(_rgb(24, 14)).save(folder / name, format=fmt)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not pixels\n")
    return folder


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffpir-train"])


# ---------------------------------------------------------------------------------------------------------
# Bad training files
# ---------------------------------------------------------------------------------------------------------
def test_unreadable_files_are_named_skipped_and_counted_converted_ones_used(tmp_path, caplog):
    folder = _mixed_folder(tmp_path / "data")
    dm = ImageFolderDataModule(str(folder), val_fraction=0, crop_size=16, batch_size=4, patches_per_image=1)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.num_skipped == len(BAD)
    assert sorted(Path(f).name for f in dm.train_set.bad_files) == sorted(BAD)
    for name in BAD:
        assert name in caplog.text
    used = sorted(Path(f).name for f in dm.train_set.files)
    assert set(CONVERTED) <= set(used) and len(used) == 8
    for i, f in enumerate(dm.train_set.files):
        crop = dm.train_set[i]
        assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32, f
        assert 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0
    grey = dm.train_set[dm.train_set.files.index(str(folder / "grey.png"))]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # and a short fit runs on what is left
    module = DiffusionModule(build_unet("tiny"), warmup_steps=0, ema_decay=0.9)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 2


def test_a_file_that_breaks_after_the_check_is_replaced_and_named(tmp_path, caplog):
    folder = _good_images(tmp_path / "data", 3)
    ds = ImageCropDataset(sorted(folder.iterdir()), crop_size=16, check=False)
    (folder / "img01.png").write_bytes(b"")  # broken after the listing
    with caplog.at_level(logging.WARNING):
        crops = [ds[i] for i in range(len(ds))]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert ds.bad_files == [str(folder / "img01.png")] and "img01.png" in caplog.text


def test_an_undersized_image_without_the_check_is_skipped_and_named(tmp_path, caplog, monkeypatch):
    """``check_images: false``: an image smaller than the crop, found during the run, is skipped like an unreadable
    file (the docs' promise), not a ValueError in the middle of the fit."""
    folder = _good_images(tmp_path / "data", 5)
    Image.fromarray(_rgb(8, 20)).save(folder / "img02.png")  # 8 px < crop 16
    ds = ImageCropDataset(sorted(folder.iterdir()), crop_size=16, check=False)
    with caplog.at_level(logging.WARNING):
        crops = [ds[i] for i in range(len(ds))]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert torch.equal(crops[2], crops[3])  # the small image's item is replaced by the next one
    assert ds.bad_files == [str(folder / "img02.png")]
    assert "img02.png is 8x8, smaller than crop_size=16" in caplog.text and "skipping it" in caplog.text
    # through the console script's options: the fit runs its steps
    monkeypatch.chdir(tmp_path)
    cli_main([*_fit_args(folder, 3), "--data.check_images", "false", "--data.val_fraction", "0"])
    assert _step_of(tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt") == 3
    # and when no image is usable, one message says so
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(_rgb(8, 21)).save(small / "a.png")
    with pytest.raises(ValueError, match="no image could be used .* smaller than crop_size=16"):
        ImageCropDataset([small / "a.png"], crop_size=16, check=False)[0]


def test_a_folder_of_only_bad_files_fails_clearly(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_text("text")
    dm = ImageFolderDataModule(str(folder), val_fraction=0, crop_size=16)
    with pytest.raises(ValueError, match=r"no readable images among 2 file\(s\) \(2 unreadable"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------------
# Config mistakes and untrusted files
# ---------------------------------------------------------------------------------------------------------
def test_unknown_key_and_wrong_type_name_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lrr: 0.1\n")
    base = ["fit", "--config", str(SMOKE), "--data.data_dir", str(_good_images(tmp_path / "data"))]
    for extra, named in [
        (["--config", str(bad)], "lrr"),
        (["--model.lr", "fast"], 'key "model.lr"'),
        (["--trainer.max_stepz", "3"], "trainer.max_stepz"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli_main([*base, *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and named in err and "Traceback" not in err, (extra, err[-400:])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
def test_checkpoints_that_carry_code_are_refused(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 7, "x": Malicious(str(marker))}, evil)
    args = ["fit", "--config", str(SMOKE), "--data.data_dir", str(_good_images(tmp_path / "data"))]
    args += ["--data.crop_size", "16", option, str(evil)]
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "diffpir-train: error: refused to load" in err and "GLOBAL os.makedirs" in err
    assert "Traceback" not in err and "weights_only` set to `False` will likely succeed" not in err
    assert not marker.exists()
    assert list(tmp_path.rglob("*.ckpt")) == [evil]  # stopped before any training step


# ---------------------------------------------------------------------------------------------------------
# SIGKILL and resume
# ---------------------------------------------------------------------------------------------------------
def _fit_args(data: Path, max_steps: int) -> list[str]:
    return ["fit", "--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"] + [
        "--trainer.max_steps",
        str(max_steps),
    ]


def _step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture
def one_thread():
    """The killed run is a subprocess with OMP_NUM_THREADS=1; the resumed and straight runs happen in this process.
    Bit-exact comparison needs the same thread count (conv sums are ordered differently with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_sigkill_then_resume_from_last_continues_exactly(tmp_path, monkeypatch, one_thread):
    data = _good_images(tmp_path / "data", 6)  # 4 training images x 2 crops / batch 4: 2 steps an epoch
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    last = killed / "runs" / "smoke" / "checkpoints" / "last.ckpt"  # saved every 2 steps (smoke.yaml)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffpir.cli.train", *_fit_args(data, 10_000)]
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (last.is_file() and _step_of(last) >= 4):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    step = _step_of(last)  # the checkpoint the resumed run continues from
    target = step + 4

    # Resume; record the global step of every training step the resumed run takes.
    steps: list[int] = []
    original = DiffusionModule.training_step

    def counting(self, batch, batch_idx):
        steps.append(int(self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", counting)
    monkeypatch.chdir(killed)
    cli_main([*_fit_args(data, target), "--ckpt_path", "last"])
    assert steps == list(range(step, target)), "the resumed run did not continue from the last checkpoint"

    monkeypatch.setattr(DiffusionModule, "training_step", original)
    straight.mkdir()
    monkeypatch.chdir(straight)
    cli_main(_fit_args(data, target))

    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(straight / "runs" / "smoke" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == target
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():  # the network and its EMA (ema.* entries, with its update count)
        assert torch.equal(v, b["state_dict"][k]), k
    assert int(a["state_dict"]["ema.n_averaged"]) == target + 1  # the starting copy, then one update per step
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for p in opt_a:
        for k, v in opt_a[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b[p][k])), (p, k)
    assert a["lr_schedulers"] == b["lr_schedulers"]
