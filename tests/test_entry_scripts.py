"""train/train.py and restore/restore.py as their READMEs run them: a subprocess each, from another folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train" / "train.py"
RESTORE = ROOT / "restore" / "restore.py"


def run(script: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("script, half", [(TRAIN, "train"), (RESTORE, "restore")])
def test_without_arguments_the_script_lists_its_commands_and_configs(script, half, tmp_path):
    out = run(script, cwd=tmp_path).stdout
    assert f"walk-through: {half}/README.md" in out and f"python {half}/{half}.py " in out
    shipped = sorted(p.name for p in (ROOT / "configs" / half).glob("*.yaml"))
    assert out.rstrip().endswith(f"Configs in configs/{half}/: " + ", ".join(shipped))


@pytest.mark.parametrize("script, sub", [(TRAIN, "fit"), (RESTORE, "predict")])
def test_help_of_the_subcommand(script, sub, tmp_path):
    out = run(script, sub, "--help", cwd=tmp_path).stdout
    assert out.startswith(f"usage: {script.name} [options] {sub}") and "--config" in out


@pytest.mark.slow
def test_train_resume_export_then_restore_as_the_readmes_say(tmp_path):
    """train/README.md sections 1-2, then restore/README.md with the exported prior, and a rerun that resumes."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(images / f"i{i}.png")
    smoke = ["--config", str(ROOT / "configs" / "train" / "smoke.yaml"), "--data.data_dir", str(images)]
    run(TRAIN, "fit", *smoke, cwd=tmp_path)
    last = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    assert last.is_file() and list((tmp_path / "runs" / "smoke" / "version_0" / "samples").glob("*.png"))
    res = run(TRAIN, "fit", *smoke, "--ckpt_path", "last", "--trainer.max_steps", "6", cwd=tmp_path)
    assert "Restored all states from the checkpoint" in res.stdout + res.stderr
    run(TRAIN, "export", "--ckpt", str(last), "--out", "my_prior.safetensors", cwd=tmp_path)

    cmd = ["predict", "--config", str(ROOT / "configs" / "restore" / "denoise_fast.yaml"), "--model.prior"]
    cmd += ["my_prior.safetensors", "--data.images", str(images), "--writer.output_dir", "out"]
    cmd += ["--model.lpips", "false", "--trainer.accelerator", "cpu", "--data.limit", "2", "--trajectory.first_k", "0"]
    run(RESTORE, *cmd, cwd=tmp_path)
    restored = sorted((tmp_path / "out" / "restored").glob("*.png"))
    assert [p.name for p in restored] == ["i0.png", "i1.png"] and (tmp_path / "out" / "metrics.csv").is_file()
    stamps = [p.stat().st_mtime_ns for p in restored]
    run(RESTORE, *cmd, cwd=tmp_path)  # resume: the finished images are not written again
    assert [p.stat().st_mtime_ns for p in restored] == stamps
