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


def test_demo_runs_other_baselines_with_their_own_settings(tmp_path, capsys):
    """``--baselines dpir``: DPIR (the prior as its denoiser) on the same degraded photos, with DPIR's own lambda_
    (0.23), not the DiffPIR config's 7, and its 8 iterations as the NFEs in the table."""
    prior = tmp_path / "tiny.safetensors"
    export_prior(build_unet("tiny"), NoiseSchedule.linear(), prior)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--prior", str(prior), "--steps", "2", "--images", "1", "--tasks", "denoise"]
    assert main([*args, "--baselines", "classical", "dpir"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "metrics.csv").open())}
    assert set(rows) == {"diffpir", "classical", "dpir"}
    assert (rows["dpir"]["nfe"], rows["classical"]["nfe"], rows["diffpir"]["nfe"]) == ("8", "0", "2")
    config = yaml.safe_load((out / "baselines" / "dpir" / "denoise" / "config.yaml").read_text())["model"]["method"]
    assert config["class_path"].endswith("DPIR") and config["init_args"]["lambda_"] == 0.23
    assert main([*args, "--baselines", "ddrm"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
