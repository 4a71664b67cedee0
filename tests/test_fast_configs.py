"""The fast configs (``configs/restore/<task>_fast.yaml``) as users run them: the ``diffpir-restore`` console script.

Every fast config runs end to end on a tiny prior without the few-steps warning; on the bundled ``natural`` prior the
Gaussian-deblurring one beats the measurement, while the paper config cut to 5 steps warns, names the fix and comes
out worse than the measurement (what the warning is for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffpir.io import read_image
from diffpir.metrics import psnr
from diffpir.restoration import Degradation, RestorationDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "restore"
FAST = sorted(CONFIGS.glob("*_fast.yaml"))
SCRIPT = Path(sys.executable).with_name("diffpir-restore")
WARNING = "far from converged"


def restore(config: Path, prior: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT) if SCRIPT.exists() else "diffpir-restore", "predict", "--config", str(config)]
    cmd += ["--model.prior", prior, "--writer.output_dir", str(out), "--model.lpips", "false", "--data.limit", "1"]
    cmd += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
    cmd += ["--trajectory.first_k", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_every_task_has_a_fast_config():
    assert {p.stem for p in FAST} == {
        f"{t}_fast" for t in ("deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise")
    }


@pytest.mark.slow  # one console-script run per config (about 15 s each on an idle CPU)
@pytest.mark.parametrize("config", FAST, ids=[p.stem for p in FAST])
def test_fast_config_runs_through_the_console_script(config, prior_file, tmp_path):
    res = restore(config, str(prior_file), tmp_path / "out", "--data.crop", "64")  # the 61x61 kernels fit
    assert WARNING not in res.stderr + res.stdout
    model = yaml.safe_load(config.read_text())["model"]["method"]["init_args"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["count"] == 1
    settings = summary["settings"]["model"]["method"]["init_args"]
    assert (settings["init"], settings["t_start"], settings["zeta"]) == ("classical", model["t_start"], 1.0)
    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("nfe")] == str(model["steps"])


def _input_psnr(out: Path, spec: Degradation) -> float:
    data = RestorationDataModule(images=None, degradation=spec, crop=64, limit=1, channels=3)
    data.setup("predict")
    item = data.dataset[0]
    degraded = read_image(next((out / "degraded").glob("*.png")))
    return float(psnr(degraded[None], item.x[None])[0])


@pytest.mark.slow
def test_fast_config_beats_the_measurement_where_few_paper_steps_do_not(tmp_path):
    """On the bundled natural prior (64x64 crop of a sample photo): the fast config with its 10 NFEs restores; the
    paper config with 5 steps from pure noise warns with the fix and is worse than the measurement."""
    fast = tmp_path / "fast"
    res = restore(CONFIGS / "deblur_gaussian_fast.yaml", "natural", fast, "--data.crop", "64")
    assert WARNING not in res.stderr + res.stdout
    fast_psnr = json.loads((fast / "summary.json").read_text())["mean"]["psnr"]
    spec = Degradation(task="deblur_gaussian", sigma_n=0.05, kernel_size=61, kernel_std=3.0)
    y_psnr = _input_psnr(fast, spec)
    assert fast_psnr > y_psnr + 1.0, (fast_psnr, y_psnr)

    few = tmp_path / "few"
    extra = ("--data.crop", "64", "--model.method.steps", "5", "--data.degradation.kernel_std_max", "null")
    res = restore(CONFIGS / "deblur_gaussian.yaml", "natural", few, *extra)
    log = res.stderr + res.stdout
    assert WARNING in log and "configs/restore/<task>_fast.yaml" in log
    assert "--model.method.init classical --model.method.t_start 400 --model.method.zeta 1.0" in log
    few_psnr = json.loads((few / "summary.json").read_text())["mean"]["psnr"]
    assert few_psnr < y_psnr < fast_psnr, (few_psnr, y_psnr, fast_psnr)
