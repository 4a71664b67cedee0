"""Every restoration config parses and instantiates; the paper's defaults are in them; the CLI runs end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffpir.cli.restore import build_cli, main
from diffpir.restoration import RestorationDataModule, RestorationModule, RestorationWriter, TrajectoryLogger

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "restore").glob("*.yaml"))
PAPER_TASKS = {"deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise"}


def test_every_paper_task_has_a_config_and_a_fast_config():
    assert PAPER_TASKS | {f"{t}_fast" for t in PAPER_TASKS} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(config, prior_file, tmp_path):
    cli = build_cli(
        ["--config", str(config), "--model.prior", str(prior_file), "--writer.output_dir", str(tmp_path)], run=False
    )
    assert isinstance(cli.model, RestorationModule) and isinstance(cli.datamodule, RestorationDataModule)
    callbacks = {type(c) for c in cli.trainer.callbacks}
    assert {RestorationWriter, TrajectoryLogger} <= callbacks
    spec = cli.datamodule.degradation
    fast = config.stem.endswith("_fast")
    assert spec.task == config.stem.removesuffix("_fast")
    hp = SimpleNamespace(**cli.model.hparams.method["init_args"])  # the method's settings
    sampler = cli.model.method.sampler
    assert sampler.nfe == hp.steps and sampler.lambda_ == hp.lambda_ and sampler.zeta == hp.zeta
    assert hp.skip == "quad" and hp.eta == 0.0
    if fast:  # the fast recipe: a late start from the classical restoration, fresh noise only
        assert (hp.init, hp.zeta) == ("classical", 1.0) and hp.t_start < 999 and hp.steps <= 40
        assert hp.output == ("x0_hat" if spec.family == "inpaint" else "x0_pred")
        return
    if spec.task == "deblur_blind":  # not a paper task (its settings: issue 17, chosen on validation crops)
        assert cli.model.method.name == "blind_diffpir" and (spec.sigma_n, spec.kernel_size) == (0.01, 31)
        assert cli.model.method.config()["steps"] == hp.steps
        return
    if spec.task != "denoise":  # the paper's tasks run as the official scripts
        assert (hp.init, hp.output, hp.t_start) == ("official", "iterate", None)
    # the official defaults (docs: DIFFPIR.md table)
    if spec.family == "blur":
        assert (spec.sigma_n, hp.steps, hp.lambda_, hp.zeta, spec.kernel_size) == (0.05, 100, 7.0, 0.3, 61)
    if spec.task == "deblur_gaussian":  # std 3 * U[1, 3) per image, as main_ddpir_deblur.py
        assert (spec.kernel_std, spec.kernel_std_max) == (3.0, 9.0)
    elif spec.family == "sr":
        assert (spec.sigma_n, hp.steps, spec.scale, spec.sr_kernel) == (0.05, 100, 4, "bicubic")
        assert 2.0 <= hp.lambda_ <= 12.0 and hp.zeta == 0.25 and spec.sr_data_step == "kernel"
    elif spec.family == "inpaint":
        assert (spec.sigma_n, hp.lambda_, hp.zeta) == (0.0, 1.0, 1.0) and hp.steps in (20, 100)


def test_command_line_overrides(prior_file, tmp_path):
    cfg = next(p for p in CONFIGS if p.stem == "deblur_gaussian")
    overrides = (
        "--model.method.steps 20 --data.degradation.sigma_n 0.1 --model.prior_precision bf16 --trajectory.first_k 0"
    )
    cli = build_cli(
        ["--config", str(cfg), "--model.prior", str(prior_file), *overrides.split()],
        run=False,
    )
    assert cli.model.method.nfe == 20 and cli.datamodule.degradation.sigma_n == 0.1
    assert cli.model.hparams.prior_precision == "bf16" and cli.model.prior.autocast_dtype == torch.bfloat16


def test_cli_predict_end_to_end(prior_file, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])  # pytest's own arguments are not the CLI's
    cfg = next(p for p in CONFIGS if p.stem == "denoise")
    out = tmp_path / "out"
    overrides = (
        "--model.method.steps 3 --model.lpips false --data.limit 2 --data.crop 16 --trainer.accelerator cpu "
        "--trainer.devices 1 --trainer.enable_progress_bar false"
    )
    args = ["--config", str(cfg), "--model.prior", str(prior_file), "--writer.output_dir", str(out)]
    main(["predict", *args, *overrides.split()])
    assert sorted(p.name for p in (out / "restored").iterdir()) == ["astronaut.png", "chelsea.png"]
    assert (out / "grid" / "astronaut.png").is_file() and (out / "degraded" / "chelsea.png").is_file()
    assert json.loads((out / "summary.json").read_text())["count"] == 2
    assert "steps: 3" in (out / "config.yaml").read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_one_step_from_pure_noise_is_refused_by_the_cli(prior_file, tmp_path, monkeypatch, capsys):
    """Issue 14, item 12: ``--model.method.steps 1`` with a paper config would return one prior guess on pure noise."""
    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])
    cfg = next(p for p in CONFIGS if p.stem == "deblur_gaussian")
    args = ["--config", str(cfg), "--model.prior", str(prior_file), "--writer.output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(["predict", *args, "--model.method.steps", "1"])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "evaluates the prior once, on pure noise" in err and "--model.method.init classical" in err
    assert not (tmp_path / "o" / "restored").exists()


# -- the configs ship with the package (issue 15) ------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage_and_maps_the_configs():
    """pyproject.toml lists the packages explicitly (for the configs/ -> diffpir.configs mapping): every folder of
    diffpir/ holding Python files must be in the list, or a wheel would silently lack it."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(tool["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffpir").rglob("*.py")}
    assert folders <= packages, sorted(folders - packages)
    assert tool["package-dir"] == {"diffpir.configs": "configs"}
    for kind in ("restore", "train"):
        assert f"diffpir.configs.{kind}" in packages and any((ROOT / "configs" / kind).glob("*.yaml"))


@pytest.mark.slow  # builds a wheel (about a minute)
def test_a_wheel_install_finds_the_configs_without_the_checkout(tmp_path):
    import subprocess
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    wheel = zipfile.ZipFile(next(tmp_path.glob("diffpir-*.whl")))
    names = set(wheel.namelist())
    for cfg in CONFIGS:
        assert f"diffpir/configs/restore/{cfg.name}" in names
    site = tmp_path / "site"
    wheel.extractall(site)
    code = (
        "from diffpir.cli.common import config_dir; from diffpir.cli.demo import config_path; "
        "from diffpir.cli.evaluate import task_config; "
        "print(config_dir()); print(config_path('denoise')); print(task_config('sr_x4')['model']['method'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == str(site / "diffpir" / "configs" / "restore") and lines[1].startswith(lines[0])
    assert "DiffPIRMethod" in lines[2]
