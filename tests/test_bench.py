"""The comparison benchmark end to end on a tiny random prior: runs split over processes merge into one table."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_tiny_prior
from PIL import Image

from diffpir.models import build_unet
from diffpir.prior import Prior
from diffpir.priorfile import export_prior
from diffpir.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "bench" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_runs_merge_into_one_table(compare, tmp_path):
    prior = export_tiny_prior(tmp_path)
    images = tmp_path / "eval"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{name}.png")
    common = ["--prior", str(prior), "--images-dir", str(images), "--lpips", "--threads", "1"]
    a = compare.main([*common, "--tasks", "denoise", "--methods", "diffpir", "classical", "--nfes", "2", "3",
                      "--out", str(tmp_path / "a")])  # fmt: skip
    b = compare.main([*common, "--tasks", "inpaint_random", "--methods", "diffpir", "--nfes", "2", "--images", "1",
                      "--out", str(tmp_path / "b")])  # fmt: skip
    assert [(r["method"], r["nfe"]) for r in a] == [("diffpir", 2), ("diffpir", 3), ("classical", 0)]

    merged = compare.main(["--merge", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "all")])
    # paper task order, then method and NFE; values carried over unchanged
    assert [(r["task"], r["method"], r["nfe"]) for r in merged] == [
        ("inpaint_random", "diffpir", 2),
        ("denoise", "diffpir", 2),
        ("denoise", "diffpir", 3),
        ("denoise", "classical", 0),
    ]
    rows = _rows(tmp_path / "all.csv")
    assert float(rows[1]["psnr"]) == pytest.approx(a[0]["psnr"]) and float(rows[0]["psnr"]) == pytest.approx(
        b[0]["psnr"]
    )
    assert len(_rows(tmp_path / "all_images.csv")) == 2 * 3 + 1
    md = (tmp_path / "all.md").read_text()
    assert "## inpaint_random" in md and "## denoise" in md and "different image counts (1, 2)" in md
    with pytest.raises(SystemExit, match="nothing to merge"):
        (tmp_path / "empty.csv").write_text("task,method\n")
        compare.main(["--merge", str(tmp_path / "empty"), "--out", str(tmp_path / "none")])


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_recipes_bench_runs_end_to_end(tmp_path):
    """Four recipes, two steps each, on 20 synthetic labelled 'digits': every figure is there and finite."""
    bench = _load_bench("train_recipes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 20)):  # two held-out digits per class: one per half
        (tmp_path / "digits" / split).mkdir(parents=True)
        for i in range(n):
            img = np.zeros((32, 32), np.uint8)
            img[4 + i % 10 : 20 + i % 10, 8:24] = rng.integers(128, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "digits" / split / f"{i:05d}_{i % 10}.png")
    out = tmp_path / "res"
    data = str(tmp_path / "digits")
    recipes = ["ddpm", "v_min_snr_quad", "min_snr_wsd", "edm"]
    args = ["--recipes", *recipes, "--preset", "tiny", "--steps", "2", "--batch", "4"]
    bench.main([*args, "--samples", "4", "--restore-count", "2", "--threads", "1", "--data", data, "--out", str(out)])
    import json

    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["recipes"]) == recipes
    for r in res["recipes"].values():
        for key in ("denoise_sigma15", "denoise_sigma25", "denoise_sigma50", "inpaint_box", "deblur"):
            assert np.isfinite(r[key][0]) and r[key][0] > 0
        assert 0.0 <= r["recognised_typical"] <= r["recognised"] <= 1.0 and np.isfinite(r["frechet"])
        assert set(r["classes_typical"]) <= set(r["classes"])
    assert "| v_min_snr_quad |" in out.with_suffix(".md").read_text()
    assert 0.0 <= res["info"]["judge_typical_real"] <= res["info"]["judge_confident_real"]

    # --priors scores finished priors the same way (here a tiny grey export), without training.
    prior = export_prior(Prior(build_unet("tiny", in_channels=1, out_channels=1), NoiseSchedule.linear()), None,
                         tmp_path / "grey.safetensors")  # fmt: skip
    bench.main(["--priors", str(prior), "--box-steps", "3", "--samples", "4", "--restore-count", "2",
                "--threads", "1", "--data", data, "--out", str(out)])  # fmt: skip
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["recipes"]) == [str(prior)] and res["info"]["priors"] and res["info"]["box_steps"] == 3
    assert np.isfinite(res["recipes"][str(prior)]["inpaint_box"][0])
    assert out.with_suffix(".md").read_text().startswith("Trained priors scored alike")

    # --split val: the validation half and another draw of samples; the same prior, other figures.
    val_out = tmp_path / "res_val"
    bench.main(["--priors", str(prior), "--box-steps", "3", "--samples", "4", "--restore-count", "2",
                "--threads", "1", "--data", data, "--out", str(val_out), "--split", "val"])  # fmt: skip
    val = json.loads(val_out.with_suffix(".json").read_text())
    assert (val["info"]["split"], val["info"]["sample_seed"]) == ("val", 1) and res["info"]["sample_seed"] == 0
    assert val["baselines"] != res["baselines"], "the validation half restored the same digits as the evaluation half"
    assert "of the validation half" in val_out.with_suffix(".md").read_text()


def test_typicality_rejects_features_far_from_their_class():
    """Two Gaussian clusters of features: fresh draws from a cluster pass at about the calibration quantile; a point
    far from both, or one at cluster 0 labelled as class 1, is rejected; the radius is the quantile asked for."""
    bench = _load_bench("train_recipes")
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    scales = torch.tensor([1.0, 2.0])

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        return centres[y] + scales[y, None] * torch.randn(n, 4, generator=g), y

    train_f, train_y = draw(4000)
    calib_f, calib_y = draw(4000)
    model = bench.fit_typicality(train_f, train_y, calib_f, calib_y, quantile=0.9)
    assert torch.allclose(model.centroids, centres, atol=0.15)
    # the mean distance of a 4-d standard normal is about 1.88: the scales are 1.88 and 3.76
    assert torch.allclose(model.scales, 1.88 * scales, rtol=0.05)
    d = (calib_f - model.centroids[calib_y]).norm(dim=1) / model.scales[calib_y]
    assert float((d <= model.tau).float().mean()) == pytest.approx(0.9, abs=1e-3)
    test_f, test_y = draw(4000)
    assert float(bench.typical(test_f, test_y, model).float().mean()) == pytest.approx(0.9, abs=0.02)
    far = torch.tensor([[5.0, 30.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert bench.typical(far, torch.tensor([0, 1]), model).tolist() == [False, False]
    assert bench.typical(far[1:], torch.tensor([0]), model).tolist() == [True]


def test_junk_images_span_flat_to_noisy_fields():
    bench = _load_bench("train_recipes")
    a = bench.junk_images(200, torch.Generator().manual_seed(3))
    assert a.shape == (200, 1, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, bench.junk_images(200, torch.Generator().manual_seed(3)))  # seeded by its generator
    spread = a.flatten(1).std(1)
    assert float(spread.min()) < 0.02 and float(spread.max()) > 0.3  # nearly flat fields and heavy noise
    means = a.flatten(1).mean(1)
    assert float(means.min()) < 0.15 and float(means.max()) > 0.85  # dark to bright


def test_held_out_halves_keep_every_class_in_each_half():
    """Labels sorted by class (as the files are): both halves hold every class, half of each, and do not overlap."""
    bench = _load_bench("train_recipes")
    labels = torch.arange(10).repeat_interleave(6)
    images = torch.arange(60.0).view(60, 1, 1, 1)  # each image is its own index
    (vx, vy), (ex, ey) = bench.held_out_halves(images, labels)
    for y in (vy, ey):
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 3))
    idx_v, idx_e = vx.flatten().long(), ex.flatten().long()
    assert set(idx_v.tolist()).isdisjoint(idx_e.tolist()) and len(idx_v) + len(idx_e) == 60
    assert torch.equal(labels[idx_v], vy) and torch.equal(labels[idx_e], ey)  # images travel with their labels
    assert not torch.equal(ey, ey.sort().values)  # shuffled: a prefix mixes the classes
    with pytest.raises(SystemExit, match="two digits of a class"):
        bench.held_out_halves(images[:10:6], labels[:10:6])


def test_gpu_timings_dry_run_on_the_cpu(tmp_path):
    """The GPU script's timing half, dry-run on the CPU (what scripts/gpu_train_natural.sh runs with DRY_RUN=1)."""
    bench = _load_bench("gpu_timings")
    prior = export_prior(Prior(build_unet("tiny"), NoiseSchedule.linear()), None, tmp_path / "tiny.safetensors")
    bench.main(["--device", "cpu", "--prior", str(prior), "--train-preset", "tiny", "--nfe", "2", "--size", "32",
                "--batches", "1", "--train-batch", "2", "--train-size", "32",
                "--forward-size", "32", "--forward-batches", "1", "--repeats", "1", "--skip", "forward",
                "--out", str(tmp_path)])  # fmt: skip
    import json

    res = json.loads((tmp_path / "gpu_timings.json").read_text())
    assert res["restore"]["fp32_batch1"]["s_per_image"] > 0
    assert set(res["train"]) == {"fp32", "bf16", "bf16_cl"}
    assert (res["train"]["fp32"]["size"], res["train"]["fp32"]["batch"]) == (32, 2)  # the patches it was asked for


def test_held_out_halves_are_disjoint_and_hold_every_class():
    """The validation half (for choosing) and the evaluation half (for the figures) share no digit."""
    bench = _load_bench("train_recipes")
    labels = torch.arange(10).repeat_interleave(5)  # sorted by class, as the files are
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)  # each image its own index
    (val_x, val_y), (eval_x, eval_y) = bench.held_out_halves(images, labels)
    val_ids, eval_ids = set(val_x.flatten().tolist()), set(eval_x.flatten().tolist())
    assert not val_ids & eval_ids and len(val_ids) + len(eval_ids) == len(labels)
    assert set(val_y.tolist()) == set(eval_y.tolist()) == set(range(10))
