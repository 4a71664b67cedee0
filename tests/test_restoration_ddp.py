"""DDP restoration (2 CPU processes, gloo) gives exactly one output per image, equal to a single process's."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import export_live_tiny_prior
from PIL import Image

N_IMAGES = 5  # odd: the ranks get 3 and 2 images


def _run(prior: Path, images: Path, out: Path, devices: int, batch_size: int) -> subprocess.CompletedProcess:
    options = (
        f"--model.method.steps 4 --model.lpips false --data.batch_size {batch_size} "
        "--model.method.batch_invariant true "
        "--data.degradation.task deblur_motion "
        f"--data.degradation.kernel_size 9 --trajectory.first_k {N_IMAGES} --trajectory.every 2 "
        f"--trainer.accelerator cpu --trainer.devices {devices} --trainer.enable_progress_bar false"
    )
    cmd = [sys.executable, "-m", "diffpir.cli.restore", "predict", *options.split()]
    cmd += ["--model.prior", str(prior), "--data.images", str(images), "--writer.output_dir", str(out)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    prior = export_live_tiny_prior(tmp_path)  # eps depends on the input

    _run(prior, images, tmp_path / "single", devices=1, batch_size=1)
    _run(prior, images, tmp_path / "ddp", devices=2, batch_size=2)

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    names = [f"im{i}.png" for i in range(N_IMAGES)]
    assert sorted(p.name for p in (ddp / "restored").iterdir()) == names
    for name in names:
        assert (ddp / "restored" / name).read_bytes() == (single / "restored" / name).read_bytes(), name
    # both ranks wrote part files; the merged CSV has one row per image with the single-process metrics
    assert sorted(p.name for p in (ddp / "metrics").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    with open(ddp / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(single / "metrics.csv", newline="") as f:
        ref = {r["key"]: r for r in csv.DictReader(f)}
    assert [r["key"] for r in rows] == [f"im{i}" for i in range(N_IMAGES)]
    assert all(r["psnr"] == ref[r["key"]]["psnr"] and r["ssim"] == ref[r["key"]]["ssim"] for r in rows)
    # trajectories of images restored on either rank are logged (one event file per rank)
    assert len(list((ddp / "tensorboard").glob("events.out.tfevents.*.rank1"))) == 1


@pytest.mark.slow
def test_ddp_resume_with_fewer_images_left_than_processes(tmp_path):
    """A resume that leaves one image for two processes (Lightning's predict sampler wants one per rank): the idle
    rank gets a padding item that restores nothing, and the image is restored as a single process restores it."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    prior = export_live_tiny_prior(tmp_path)  # eps depends on the input
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run(prior, images, single, devices=1, batch_size=1)
    _run(prior, images, ddp, devices=2, batch_size=1)
    (ddp / "restored" / "im1.png").unlink()  # lost: the rerun restores it alone
    res = _run(prior, images, ddp, devices=2, batch_size=1)
    assert "skipping 1 of 2 images already restored" in res.stderr
    for name in ("im0.png", "im1.png"):
        assert (ddp / "restored" / name).read_bytes() == (single / "restored" / name).read_bytes(), name
    with open(ddp / "metrics.csv", newline="") as f:
        assert [r["key"] for r in csv.DictReader(f)] == ["im0", "im1"]
    assert not (ddp / "failed.json").exists()
