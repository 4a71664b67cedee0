"""The main job (``python -m diffpir.cli.demo``) end to end on a tiny prior: files, table and overview picture."""

import csv

import yaml

from diffpir import NoiseSchedule, export_prior
from diffpir.cli.demo import config_path, demo_steps, main
from diffpir.models import build_unet


def test_demo_runs_end_to_end_on_a_tiny_prior(tmp_path):
    prior = tmp_path / "tiny.safetensors"
    export_prior(build_unet("tiny"), NoiseSchedule.linear(), prior)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--prior", str(prior), "--steps", "2", "--images", "2", "--tasks", "denoise", "sr_x4"]
    assert main(args) == 0
    for task in ("denoise", "sr_x4"):
        assert len(list((out / task / "restored").glob("*.png"))) == 2
        assert len(list((out / task / "grid").glob("*.png"))) == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {(r["task"], r["method"]) for r in rows} >= {("denoise", "diffpir"), ("sr_x4", "diffpir")}
    for r in rows:
        assert 5.0 < float(r["psnr"]) < 60.0
    assert (out / "overview.png").stat().st_size > 1000
    model = yaml.safe_load((out / "denoise" / "config.yaml").read_text())["model"]["method"]["init_args"]  # demo
    assert (model["steps"], model["init"], model["t_start"], model["zeta"]) == (2, "classical", 200, 1.0)
    assert "| denoise | diffpir |" in (out / "metrics.md").read_text()
    # a rerun restores nothing again and gives the same table
    before = (out / "metrics.csv").read_text()
    assert main(args) == 0
    assert (out / "metrics.csv").read_text().split("\n")[0] == before.split("\n")[0]


def test_demo_explains_a_missing_prior(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--prior", str(tmp_path / "nope.safetensors")]) == 2
    assert "cannot load the prior" in capsys.readouterr().err


def test_demo_runs_the_shipped_fast_configs():
    assert config_path("deblur_gaussian").name == "deblur_gaussian_fast.yaml"
    assert demo_steps("deblur_gaussian") == demo_steps("sr_x4") == demo_steps("denoise") == 10
    assert demo_steps("inpaint_random") == 40
    assert demo_steps("inpaint_box") == 5
    assert demo_steps("inpaint_random", 3) == demo_steps("denoise", 3) == 3
