"""``diffpir.cli.tune``: the search picks the best grid point (checked against independent runs on the analytic Gaussian
prior) and writes a restoration config that the CLI parses with the chosen values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import export_tiny_prior
from PIL import Image

from diffpir import DiffPIR, NoiseSchedule
from diffpir.analytic import GaussianPrior, power_law_spectrum
from diffpir.cli.tune import DEFAULT_LAMBDAS, DEFAULT_ZETAS, run, tune
from diffpir.metrics import psnr
from diffpir.operators import Blur, gaussian_kernel
from diffpir.restoration import Degradation, image_generator
from diffpir.restoration.data import RestorationBatch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "restore"
LAMBDAS, ZETAS, STEPS = (1.0, 7.0, 50.0), (0.0, 0.5, 1.0), 20


@pytest.fixture(scope="module")
def problem():
    """Gaussian deblurring (9x9, std 2, sigma_n 0.05) of three 32x32 draws of the analytic prior."""
    prior = GaussianPrior(power_law_spectrum(32, 32), NoiseSchedule.linear())
    g = torch.Generator().manual_seed(0)
    u = ((prior.sample(3, generator=g) + 1) / 2).float()
    kernel = gaussian_kernel(9, 2.0)
    op, sigma_n = Blur(kernel), 0.05
    y = op(u) + sigma_n * torch.randn(u.shape, generator=g)
    spec = Degradation(task="deblur_gaussian", kernel_size=9, kernel_std=2.0, sigma_n=sigma_n)
    batch = RestorationBatch(["a", "b", "c"], y, op, {"kernel": kernel.expand(3, -1, -1)}, spec, sigma_n, u)
    return prior, batch


def _independent_psnr(prior, batch, lambda_, zeta, seed=0) -> float:
    sampler = DiffPIR(prior.schedule, steps=STEPS, lambda_=lambda_, zeta=zeta)
    gens = [image_generator(seed, k, "sample") for k in batch.keys]
    x = sampler(batch.y, batch.op, prior, sigma_n=batch.sigma_n, generator=gens).clamp(0, 1)
    return float(psnr(x, batch.x).mean())


def test_grid_search_picks_the_best_point(problem):
    prior, batch = problem
    result = tune(prior, [batch], LAMBDAS, ZETAS, "grid", sampler_kwargs={"steps": STEPS})
    scores = {(lam, z): _independent_psnr(prior, batch, lam, z) for lam in LAMBDAS for z in ZETAS}
    # the table holds exactly the independently computed values
    assert {(r["lambda_"], r["zeta"]): r["psnr"] for r in result.table} == pytest.approx(scores, abs=1e-9)
    best = max(scores, key=scores.get)
    assert (result.lambda_, result.zeta) == best == (7.0, 1.0)
    assert result.score == pytest.approx(scores[best])
    runner_up = sorted(scores.values())[-2]
    assert scores[best] - runner_up > 0.2  # clearly better: 17.32 dB against 16.99 dB


def test_coordinate_search_reaches_the_grid_optimum_with_fewer_runs(problem):
    prior, batch = problem
    result = tune(prior, [batch], LAMBDAS, ZETAS, "coordinate", sampler_kwargs={"steps": STEPS}, start=(1.0, 0.5))
    assert (result.lambda_, result.zeta) == (7.0, 1.0)
    assert len(result.table) < len(LAMBDAS) * len(ZETAS)


def test_tune_rejects_bad_arguments(problem):
    prior, batch = problem
    with pytest.raises(ValueError, match="objective 'lpips' needs lpips_metric"):
        tune(prior, [batch], objective="lpips")
    with pytest.raises(ValueError, match="zetas lie in"):
        tune(prior, [batch], zetas=[1.5])
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        run(["--config", str(CONFIGS / "denoise.yaml"), "--out", "x.yaml", "--set", "model.steps"])


def test_a_typo_in_the_config_fails_as_in_the_restoration_cli(tmp_path, capsys):
    """Issue 15: diffpir-tune builds the config through diffpir-restore's parser (before, unknown keys were
    ignored): a setting the method does not take and an unknown data key fail with the key named, status 2."""
    base = ["--config", str(CONFIGS / "denoise.yaml"), "--out", str(tmp_path / "x.yaml")]
    for typo, key in (("model.method.init_args.stepz=3", "stepz"), ("data.degradation.sigma_nn=0.1", "sigma_nn")):
        with pytest.raises(SystemExit) as info:
            run([*base, "--set", typo])
        assert info.value.code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_configs_of_other_methods_are_refused(tmp_path, capsys):
    """DiffPIR's lambda_ and zeta for a known operator only: tuning them on blind deblurring's identity stand-in (or
    for DPS) would write numbers that mean nothing there."""
    cases = [
        (["--config", str(CONFIGS / "deblur_blind.yaml")], "runs blind deblurring"),
        (["--config", str(CONFIGS / "denoise.yaml"), "--set", "model.method.class_path=diffpir.methods.DPS"], "DPS"),
    ]
    for args, says in cases:
        with pytest.raises(SystemExit) as info:
            run([*args, "--out", str(tmp_path / "x.yaml")])
        assert info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_default_grid_spans_the_documented_ranges():
    assert DEFAULT_LAMBDAS[0] == 1.0 and DEFAULT_LAMBDAS[-1] == 50.0 and len(DEFAULT_LAMBDAS) == 8
    assert np.allclose(np.diff(np.log(DEFAULT_LAMBDAS)), np.log(50) / 7, rtol=0.01)
    assert DEFAULT_ZETAS[0] == 0.0 and DEFAULT_ZETAS[-1] == 1.0


def test_cli_writes_a_config_the_restoration_cli_parses(tmp_path):
    from diffpir.cli.restore import build_cli

    prior_file = export_tiny_prior(tmp_path)
    images = tmp_path / "val"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / f"v{i}.png")
    out = tmp_path / "tuned.yaml"
    args = ["--config", str(CONFIGS / "denoise.yaml"), "--out", str(out), "--prior", str(prior_file)]
    args += ["--images", str(images), "--steps", "2", "--lambdas", "1", "50", "--zetas", "0", "1", "--search", "grid"]
    result = run([*args, "--sigma-n", "0.2", "--set", "writer.output_dir=" + str(tmp_path / "o")])
    assert len(result.table) == 4
    best = max(result.table, key=lambda r: r["psnr"])
    assert (result.lambda_, result.zeta) == (best["lambda_"], best["zeta"])

    text = out.read_text()
    assert text.startswith("# Tuned by diffpir.cli.tune") and f"best lambda_ = {result.lambda_:g}" in text
    cfg = yaml.safe_load(text)
    assert cfg["writer"]["output_dir"] == str(tmp_path / "o")  # as --set named it
    assert cfg["data"]["degradation"] == {"task": "denoise", "sigma_n": 0.2}
    assert cfg["model"]["method"]["init_args"]["steps"] == 2 and cfg["model"]["prior"] == str(prior_file)
    cli = build_cli(["--config", str(out)], run=False)
    assert cli.model.method.config()["lambda_"] == result.lambda_ and cli.model.method.config()["zeta"] == result.zeta
    assert cli.datamodule.degradation.sigma_n == 0.2 and cli.model.method.nfe == 2

    # without --set writer.output_dir the tuned config writes beside the source's folder, not into it (a run there
    # would be refused: that folder holds outputs of the untuned settings)
    run([*args, "--sigma-n", "0.2", "--out", str(tmp_path / "tuned2.yaml")])
    cfg2 = yaml.safe_load((tmp_path / "tuned2.yaml").read_text())
    assert cfg2["writer"]["output_dir"] == "outputs/restore/tuned2"


def test_console_script_exits_zero_and_names_itself(tmp_path):
    """``diffpir-tune`` as users run it: status 0 after writing the config; its help names the console script."""
    exe = Path(sys.executable).parent / "diffpir-tune"
    if not exe.exists():
        pytest.skip("diffpir-tune is not installed (pip install -e .)")
    prior_file = export_tiny_prior(tmp_path)
    images = tmp_path / "val"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(images / "v.png")
    out = tmp_path / "tuned.yaml"
    args = ["--config", str(CONFIGS / "denoise.yaml"), "--out", str(out), "--prior", str(prior_file)]
    args += ["--images", str(images), "--steps", "2", "--lambdas", "5", "--zetas", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert yaml.safe_load(out.read_text())["model"]["method"]["init_args"]["lambda_"] == 5.0
    assert "best: lambda_ = 5" in res.stdout
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.startswith("usage: diffpir-tune ") and "python -m" not in res.stdout
