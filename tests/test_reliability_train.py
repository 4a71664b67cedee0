"""Reliability of ``diffpir-train``: unreadable training files are reported by name, skipped and counted while
16-bit, palette, grey and RGBA images are converted; config mistakes name the key; checkpoints and init files that
carry code are refused before anything runs; a run killed with SIGKILL resumes with ``--ckpt_path last`` exactly
where its last checkpoint left it (global step, EMA, optimizer); a stop (SIGTERM, Ctrl-C) rewrites ``last.ckpt`` only,
with a whole step that resumes exactly; a run refused before its first batch leaves no run folder behind. Tiny nets,
16 px crops, CPU."""

from __future__ import annotations

import json
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
from conftest import Malicious, quiet_trainer, tiny_unet
from lightning.pytorch import Callback
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
def _signal_when(proc, ready, sig, what: str, output) -> None:
    """Send ``sig`` to ``proc`` once ``ready()`` holds (within 180 s; ``output()`` says why when the process ends
    first) and wait for it to exit; killed if it still runs."""
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, output()[-2000:]
            assert time.monotonic() < deadline, f"no {what}"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _record_training_steps(monkeypatch) -> list[int]:
    """The global step of every training step taken from now on (DiffusionModule.training_step patched)."""
    steps: list[int] = []
    original = DiffusionModule.training_step

    def counting(self, batch, batch_idx):
        steps.append(int(self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", counting)
    return steps


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
    ready = lambda: last.is_file() and _step_of(last) >= 4  # noqa: E731
    _signal_when(proc, ready, signal.SIGKILL, "checkpoint at step 4", lambda: proc.stderr.read().decode())
    assert proc.returncode == -signal.SIGKILL
    step = _step_of(last)  # the checkpoint the resumed run continues from
    target = step + 4

    # Resume; record the global step of every training step the resumed run takes.
    original = DiffusionModule.training_step
    steps = _record_training_steps(monkeypatch)
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


# ---------------------------------------------------------------------------------------------------------
# SIGTERM / Ctrl-C: the stop save rewrites last.ckpt only, at a step boundary
# ---------------------------------------------------------------------------------------------------------
NATURAL = SMOKE.parent / "natural.yaml"


def _natural_args(data: Path, max_steps: int) -> list[str]:
    """natural.yaml (``save_on_exception``, ``step*.ckpt`` every 1000 steps) on the tiny net, a few 16 px crops."""
    return ["fit", "--config", str(NATURAL), "--data.data_dir", str(data), "--data.val_dir", "null"] + [
        *("--data.val_fraction", "0.25", "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu"),
        *("--model.net.init_args.preset_or_config", "tiny", "--data.crop_size", "16", "--data.batch_size", "4"),
        *("--data.patches_per_image", "2", "--trainer.max_steps", str(max_steps)),
    ]


def _ckpt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():  # the network and its EMA (with its update count)
        assert torch.equal(v, b["state_dict"][k]), k
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for p in opt_a:
        for k, v in opt_a[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b[p][k])), (p, k)


@pytest.mark.slow
def test_sigterm_saves_last_only_between_steps_and_the_resume_continues_exactly(tmp_path, monkeypatch, one_thread):
    """``kill PID`` of a natural.yaml run: the stop save rewrites ``last.ckpt`` (no ``epoch=E-step=S.ckpt`` besides it,
    one per stop, as Lightning's ModelCheckpoint wrote), holds the state of a whole step (the same as a run that
    stopped there; the exit-at-once SIGTERM handler could stop in the middle of the optimizer's update), the status is
    143, and ``--ckpt_path last`` continues from that step as if never stopped."""
    data = _good_images(tmp_path / "data", 6)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped.mkdir()
    folder = stopped / "runs" / "natural" / "checkpoints"
    log = tmp_path / "stopped.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffpir.cli.train", *_natural_args(data, 100_000)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=stopped, env=env, stdout=subprocess.DEVNULL, stderr=err)
    output = lambda: log.read_text(errors="replace")  # noqa: E731
    _signal_when(proc, lambda: "step 50 " in output(), signal.SIGTERM, "step 50", output)  # ProgressLogCallback's line
    text = log.read_text(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "diffpir-train: stopped by SIGTERM" in text and "Traceback" not in text
    last = folder / "last.ckpt"
    step = _step_of(last)
    snapshots = [f"step{s:07d}.ckpt" for s in range(1000, step + 1, 1000)]  # natural.yaml's, every 1000 steps
    assert _ckpt_files(folder) == sorted(["last.ckpt", *snapshots])
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["started"] == progress["processed"] == step  # not in the middle of a step

    straight.mkdir()
    monkeypatch.chdir(straight)
    cli_main(_natural_args(data, step))
    _assert_same_state(ckpt, torch.load(straight / "runs" / "natural" / "checkpoints" / "last.ckpt", weights_only=True))

    original = DiffusionModule.training_step
    steps = _record_training_steps(monkeypatch)
    monkeypatch.chdir(stopped)
    cli_main([*_natural_args(data, step + 3), "--ckpt_path", "last"])
    assert steps == list(range(step, step + 3))
    assert _ckpt_files(folder) == sorted(["last.ckpt", *snapshots])
    monkeypatch.setattr(DiffusionModule, "training_step", original)
    monkeypatch.chdir(straight)  # a run never stopped (a resume of the one above would start a new epoch)
    cli_main([*_natural_args(data, step + 3), "--trainer.logger.init_args.name", "longer"])
    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(straight / "runs" / "longer" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == step + 3
    _assert_same_state(a, b)


class StopAt(Callback):
    """Raises ``error`` (``KeyboardInterrupt``: Ctrl-C; ``ValueError``: a failure) at the end of step ``step``, or
    in ``setup`` (``step: -1``, after writing ``stray`` into the run's log folder when given)."""

    def __init__(self, step: int = 3, error: str = "KeyboardInterrupt", stray: str | None = None):
        self.step, self.error, self.stray = step, error, stray

    def _raise(self):
        raise {"KeyboardInterrupt": KeyboardInterrupt, "ValueError": ValueError}[self.error]("stopped by StopAt")

    def setup(self, trainer, pl_module, stage):
        if self.step < 0:
            if self.stray:
                Path(trainer.log_dir, self.stray).parent.mkdir(parents=True, exist_ok=True)
                Path(trainer.log_dir, self.stray).write_text("the user's\n")
            self._raise()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self._raise()


class RequestStop(Callback):
    """Does what Lightning's SIGTERM handler does (records the signal) during the step that reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            trainer._signal_connector.received_sigterm = True


@pytest.mark.parametrize("stop", [4, 6], ids=["mid_epoch", "last_batch_of_an_epoch"])
def test_a_sigterm_stop_saves_a_whole_step_that_resumes_exactly(tmp_path, stop):
    """The stop after SIGTERM (3 steps an epoch: step 4 in the middle of an epoch, step 6 its last batch) saves
    ``last.ckpt`` only, and resuming it gives bitwise the run that never stopped. (After the last batch of an epoch,
    Lightning stopped after the epoch's end and saved a state whose resume cut the next epoch short.)"""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from diffpir.training import ModelCheckpoint

    data = _good_images(tmp_path / "data", 6)

    def fit(folder: Path, max_steps: int, *callbacks, ckpt_path=None) -> None:
        saver = ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True, save_on_exception=True)
        dm = ImageFolderDataModule(str(data), val_fraction=0, crop_size=16, batch_size=4, patches_per_image=2)
        module = DiffusionModule(tiny_unet(0), warmup_steps=2, ema_decay=0.9)
        trainer = quiet_trainer(
            max_steps=max_steps,
            max_epochs=-1,
            limit_val_batches=0,
            callbacks=[saver, *callbacks],
            enable_checkpointing=True,
        )
        trainer.fit(module, dm, ckpt_path=ckpt_path)

    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    with pytest.raises(SIGTERMException):
        fit(stopped, 100, RequestStop(stop))
    assert _ckpt_files(stopped) == ["last.ckpt"] and _step_of(stopped / "last.ckpt") == stop
    fit(stopped, stop + 4, ckpt_path="last")
    assert _ckpt_files(stopped) == ["last.ckpt"]
    fit(straight, stop + 4)
    a = torch.load(stopped / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(straight / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == stop + 4
    _assert_same_state(a, b)


@pytest.mark.parametrize("save_last", [True, False])
def test_ctrl_c_save_rewrites_last_only(tmp_path, save_last):
    """Ctrl-C (KeyboardInterrupt) with ``save_on_exception``: ``last.ckpt`` at the stop step, nothing else, so stops
    and resumes over many sittings do not pile up full checkpoints; without ``save_last`` the stop save is Lightning's
    step-numbered file (there is nothing else to write to)."""
    from diffpir.training import ModelCheckpoint

    data = _good_images(tmp_path / "data", 6)
    dm = ImageFolderDataModule(str(data), val_fraction=0, crop_size=16, batch_size=4, patches_per_image=2)
    folder = tmp_path / "ckpts"
    for sitting, stop in enumerate((3, 5)):
        saver = ModelCheckpoint(
            dirpath=folder, save_top_k=0, save_last=save_last, save_on_exception=True, train_time_interval=None
        )
        module = DiffusionModule(build_unet("tiny"), warmup_steps=0, ema_decay=0.9)
        trainer = quiet_trainer(
            max_steps=100, limit_val_batches=0, callbacks=[saver, StopAt(stop)], enable_checkpointing=True
        )
        with pytest.raises(SystemExit):  # Lightning: Ctrl-C saves (on_exception), then exits with status 1
            trainer.fit(module, dm, ckpt_path="last" if sitting and save_last else None)
    if save_last:
        assert _ckpt_files(folder) == ["last.ckpt"] and _step_of(folder / "last.ckpt") == 5
    else:
        assert _ckpt_files(folder) == ["epoch=0-step=3.ckpt", "epoch=1-step=5.ckpt"]


# ---------------------------------------------------------------------------------------------------------
# A refused run leaves nothing behind
# ---------------------------------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def test_a_run_refused_before_its_first_step_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """A run that fails before its first batch (a checkpoint refused at load time, a missing validation folder,
    Ctrl-C in the set-up) leaves no ``runs/<name>/version_N`` (TensorBoard's folder, made in the set-up) behind, and
    no ``runs/<name>`` or ``runs`` it created; an earlier run's folders are left as they were."""
    monkeypatch.chdir(tmp_path)
    data = _good_images(tmp_path / "data")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Malicious(str(tmp_path / "pwned"))}, evil)
    fit = ["fit", "--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"]
    stop_in_setup = '--trainer.callbacks+={"class_path": "test_reliability_train.StopAt", "init_args": {"step": -1}}'
    refused = [["--data.val_dir", str(tmp_path / "nothere")], [stop_in_setup]]
    for extra in [["--ckpt_path", str(evil)], *refused]:
        with pytest.raises(SystemExit) as info:
            cli_main([*fit, *extra])
        assert info.value.code == 1, (extra, capsys.readouterr().err[-800:])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil.ckpt"], extra
    with pytest.raises(SystemExit):
        cli_main(["validate", *fit[1:], "--ckpt_path", str(evil)])
    assert not (tmp_path / "runs").exists()

    cli_main([*fit, "--trainer.max_steps", "2"])  # a run, then refused resumes of it
    before = _tree(tmp_path / "runs")
    assert "smoke/version_0/config.yaml" in before and "smoke/checkpoints/last.ckpt" in before
    for extra in [["--ckpt_path", str(evil)], *(["--ckpt_path", "last", *e] for e in refused)]:
        with pytest.raises(SystemExit):
            cli_main([*fit, "--trainer.max_steps", "4", *extra])
        assert _tree(tmp_path / "runs") == before, extra
    capsys.readouterr()


@pytest.mark.parametrize("case", ["after_a_step", "stray_file"])
def test_a_failed_run_keeps_its_logs_and_anything_it_did_not_write(tmp_path, monkeypatch, case):
    """Only a folder the failed run made and that holds nothing but what the run wrote before its first batch is
    removed: a run that failed after a step keeps its logs; a file the run does not write keeps its folder."""
    monkeypatch.chdir(tmp_path)
    args = {"after_a_step": {"step": 1, "error": "ValueError"}, "stray_file": {"step": -1, "stray": "notes/mine.txt"}}
    stop = {"class_path": "test_reliability_train.StopAt", "init_args": args[case]}
    fit = ["fit", "--config", str(SMOKE), "--data.data_dir", str(_good_images(tmp_path / "data"))]
    with pytest.raises((SystemExit, ValueError)):
        cli_main([*fit, "--data.crop_size", "16", f"--trainer.callbacks+={json.dumps(stop)}"])
    version = tmp_path / "runs" / "smoke" / "version_0"
    if case == "after_a_step":
        assert list(version.glob("events.out.tfevents.*")) and (version / "config.yaml").is_file()
    else:
        assert (version / "notes" / "mine.txt").read_text() == "the user's\n"
