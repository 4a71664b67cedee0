"""Restoration under Lightning: image I/O, degradation specs, data, predict, writer, trajectories.

Everything runs on the CPU with the ``tiny`` UNet on 16-24 px images and a handful of sampler steps.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_tiny_prior, quiet_trainer
from PIL import Image

from diffpir.io import read_image, safe_output_name, to_uint8, write_png_atomic
from diffpir.methods import DiffPIRMethod
from diffpir.prior import Prior
from diffpir.restoration import (
    TASKS,
    Degradation,
    RestorationDataModule,
    RestorationModule,
    RestorationWriter,
    TrajectoryLogger,
    build_operator,
    merge_metrics,
    stable_seed,
)
from diffpir.restoration.tasks import load_params, synthesize_params
from diffpir.sampler import DiffPIR

STEPS = 4


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
def _tiny_prior(channels: int = 3) -> Prior:
    return make_tiny_prior(in_channels=channels, out_channels=channels).eval()


def _write_images(folder: Path, n: int, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("images"), 5)


def _spec(task: str = "deblur_gaussian", **kw) -> Degradation:
    defaults = {"kernel_size": 5, "kernel_std": 1.0, "box": 6, "margin": 2}
    defaults.update(kw)
    return Degradation(task=task, **defaults)


def _predict(
    prior,
    images: Path | None,
    out: Path,
    spec: Degradation | None = None,
    batch_size: int = 2,
    callbacks=(),
    module_kw=None,
    data_kw=None,
    writer_kw=None,
) -> tuple[RestorationModule, RestorationWriter, L.Trainer]:
    kw = {"steps": STEPS, "lpips": False, **(module_kw or {})}
    method = DiffPIRMethod(**{k: kw.pop(k) for k in DiffPIR.PARAMS if k in kw})
    module = RestorationModule(prior, method=method, **kw)
    data = RestorationDataModule(
        images=None if images is None else str(images),
        degradation=spec or _spec(),
        batch_size=batch_size,
        **(data_kw or {}),
    )
    writer = RestorationWriter(str(out), **(writer_kw or {}))
    trainer = quiet_trainer(callbacks=[writer, *callbacks])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return module, writer, trainer


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# diffpir.io
# ---------------------------------------------------------------------------------------------------------
def test_read_image_formats_and_conversions(tmp_path):
    rng = np.random.default_rng(1)
    rgb = (rng.random((6, 7, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x = read_image(tmp_path / "rgb.png")
    assert x.shape == (3, 6, 7) and x.dtype == torch.float32
    assert torch.equal(to_uint8(x), torch.from_numpy(rgb).permute(2, 0, 1))

    grey = read_image(tmp_path / "rgb.png", channels=1)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert grey.shape == (1, 6, 7) and np.abs(grey[0].numpy() * 255 - luma).max() <= 1.01

    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    as_rgb = read_image(tmp_path / "grey.png", channels=3)
    assert as_rgb.shape == (3, 6, 7) and torch.equal(as_rgb[0], as_rgb[2])
    assert read_image(tmp_path / "grey.png", channels=None).shape == (1, 6, 7)

    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    expect = np.asarray(Image.open(tmp_path / "pal.png").convert("RGB"))
    assert torch.equal(to_uint8(read_image(tmp_path / "pal.png")), torch.from_numpy(expect).permute(2, 0, 1))

    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert torch.equal(read_image(tmp_path / "rgba.png", channels=None), x)  # alpha dropped

    v16 = (rng.random((6, 7)) * 65535).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    x16 = read_image(tmp_path / "g16.png", channels=1)
    assert torch.allclose(x16[0].double(), torch.from_numpy(v16.astype(np.float64) / 65535), atol=1e-6)

    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")  # not a torchvision format: Pillow fallback
    assert torch.equal(read_image(tmp_path / "rgb.bmp"), x)


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"empty\.png.*empty \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"cannot read image file .*text\.png"):
        read_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match=r"cannot read image file .*cut\.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match=r"missing\.png.* does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        read_image(tmp_path / "ok.png", channels=2)


def test_write_png_atomic_roundtrip(tmp_path):
    img = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    path = write_png_atomic(img, tmp_path / "sub" / "a.png")
    assert torch.equal(to_uint8(read_image(path)), to_uint8(img))
    write_png_atomic(torch.zeros(1, 5, 6), path)  # replaces the file
    assert read_image(path, channels=None).shape == (1, 5, 6)
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"expected an image \[1\|3, H, W\]"):
        write_png_atomic(torch.zeros(2, 5, 6), tmp_path / "b.png")


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/x", "a/b", "..", ".hidden", "sp ace", "é", "a" * 300])
def test_safe_output_name_stays_inside(tmp_path, key):
    name = safe_output_name(key)
    assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 130
    assert (tmp_path / f"{name}.png").resolve().parent == tmp_path.resolve()


def test_safe_output_name_keeps_plain_keys_and_separates_others():
    assert safe_output_name("img_01.v2-x") == "img_01.v2-x"
    assert safe_output_name("a/b") != safe_output_name("a_b")
    assert safe_output_name("a/b") == safe_output_name("a/b")
    with pytest.raises(ValueError, match="must not be empty"):
        safe_output_name("")


# ---------------------------------------------------------------------------------------------------------
# Degradation specs
# ---------------------------------------------------------------------------------------------------------
def test_stable_seed_is_stable_and_distinct():
    assert stable_seed(0, "img", "noise") == stable_seed(0, "img", "noise")
    assert len({stable_seed(s, k, p) for s in (0, 1) for k in ("a", "b") for p in ("noise", "sample")}) == 8
    assert 0 <= stable_seed(0, "x") < 2**63
    # pinned: a change would silently change every benchmark measurement
    assert stable_seed(0, "img0", "noise") == stable_seed("0", "img0", "noise")


@pytest.mark.parametrize("task", [t for t in TASKS if t not in ("deblur", "inpaint_mask")])
def test_every_task_builds_a_batched_operator(task):
    if task in ("deblur_motion", "deblur_blind"):
        spec = _spec(task, kernel_size=9)  # a motion kernel needs 9 px at least
    else:
        spec = _spec(task, kernel_std_max=2.0 if task == "deblur_gaussian" else None)
    h = w = 24
    params = [synthesize_params(spec, f"k{i}", h, w, seed=3) for i in range(2)]
    again = synthesize_params(spec, "k0", h, w, seed=3)
    assert all(torch.equal(params[0][k], again[k]) for k in again)  # deterministic per key
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    op = build_operator(spec, stacked)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    y = op(x)
    s = spec.size_multiple
    assert y.shape == (2, 3, h // s, w // s)
    assert op.x_shape(y.shape) == x.shape
    if stacked:  # per-image parameters differ between keys
        k = next(iter(stacked))
        assert not torch.equal(stacked[k][0], stacked[k][1])


def test_degradation_validation_messages():
    with pytest.raises(ValueError, match="unknown task 'blur'"):
        Degradation(task="blur")
    with pytest.raises(ValueError, match="task 'sr_x4' has scale 4, got scale=2: use task 'sr'"):
        Degradation(task="sr_x4", scale=2)
    with pytest.raises(ValueError, match="task 'inpaint_mask' needs a mask"):
        Degradation(task="inpaint_mask")
    with pytest.raises(ValueError, match="task 'deblur' needs a kernel"):
        Degradation(task="deblur")
    with pytest.raises(ValueError, match="real mode with task 'deblur_motion' needs the blur kernel"):
        load_params(Degradation(task="deblur_motion"), "a", 16, 16)
    with pytest.raises(ValueError, match="real mode with task 'inpaint_box' needs the mask"):
        load_params(Degradation(task="inpaint_box"), "a", 16, 16)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def test_benchmark_items_are_deterministic_per_key(images, tmp_path):
    dm = RestorationDataModule(str(images), degradation=_spec("inpaint_random"), seed=5, channels=3)
    dm.setup("predict")
    assert dm.keys == [f"img{i}" for i in range(5)]
    a, b = dm.dataset[2], dm.dataset[2]
    assert a.key == "img2" and torch.equal(a.y, b.y) and torch.equal(a.params["mask"], b.params["mask"])
    # the same image alone in another folder: same measurement (seeded by key, not position)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "img2.png").write_bytes((images / "img2.png").read_bytes())
    dm2 = RestorationDataModule(str(alone), degradation=_spec("inpaint_random"), seed=5, channels=3)
    dm2.setup("predict")
    assert torch.equal(dm2.dataset[0].y, a.y)
    # another seed, another measurement
    dm3 = RestorationDataModule(str(images), degradation=_spec("inpaint_random"), seed=6, channels=3)
    dm3.setup("predict")
    assert not torch.equal(dm3.dataset[2].params["mask"], a.params["mask"])


def test_collate_groups_sizes_and_stacks_kernels(tmp_path):
    folder = _write_images(tmp_path / "mixed", 2, size=16)
    _write_images(tmp_path / "big", 1, size=24, seed=9)
    (tmp_path / "big" / "img0.png").rename(folder / "large.png")
    dm = RestorationDataModule(str(folder), degradation=_spec("deblur_motion", kernel_size=9), batch_size=3, channels=3)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert [g.keys for g in batch] == [["img0", "img1"], ["large"]]
    assert batch[0].y.shape == (2, 3, 16, 16) and batch[1].y.shape == (1, 3, 24, 24)
    assert batch[0].op.kernel.shape == (2, 9, 9) and batch[0].x.shape == (2, 3, 16, 16)
    sub = batch[0].select([1])
    assert sub.keys == ["img1"] and torch.equal(sub.op.kernel[0], batch[0].op.kernel[1])


def test_dataloader_workers_give_the_same_batches(images):
    spec = _spec("deblur_motion", kernel_size=9)
    loaders = []
    for workers in (0, 1):
        dm = RestorationDataModule(str(images), degradation=spec, batch_size=2, num_workers=workers, channels=3)
        dm.setup("predict")
        loaders.append(list(dm.predict_dataloader()))
    for (a,), (b,) in zip(*loaders):
        assert a.keys == b.keys and torch.equal(a.y, b.y) and torch.equal(a.op.kernel, b.op.kernel)


def test_duplicate_keys_are_refused(tmp_path):
    folder = _write_images(tmp_path / "dup", 1)
    Image.open(folder / "img0.png").save(folder / "img0.jpg")
    dm = RestorationDataModule(str(folder), degradation=_spec())
    with pytest.raises(ValueError, match="two images share the key 'img0'"):
        dm.setup("predict")


def test_real_mode_reads_kernel_mask_and_truth(tmp_path, images):
    kernel = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float64)
    np.save(tmp_path / "k.npy", kernel)
    spec = Degradation(task="deblur", kernel=str(tmp_path / "k.npy"), sigma_n=0.01)
    dm = RestorationDataModule(str(images), mode="real", degradation=spec, truth=str(images), channels=3)
    dm.setup("predict")
    item = dm.dataset[0]
    assert torch.allclose(item.params["kernel"].double(), torch.from_numpy(kernel / kernel.sum()))
    assert torch.equal(item.y, read_image(images / "img0.png")) and torch.equal(item.x, item.y)

    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    spec = Degradation(task="inpaint_box", mask=str(tmp_path / "mask.png"), sigma_n=0.0)
    dm = RestorationDataModule(str(images), mode="real", degradation=spec, channels=1)
    dm.setup("predict")
    item = dm.dataset[1]
    assert item.y.shape == (1, 16, 16) and item.x is None
    assert item.params["mask"].shape == (1, 16, 16) and item.params["mask"][0, 0, :8].eq(1).all()

    spec = Degradation(task="sr_x4", sigma_n=0.05)  # y of 16 px restores to 64 px
    dm = RestorationDataModule(str(images), mode="real", degradation=spec, channels=3)
    dm.setup("predict")
    assert dm.dataset[0].x_size == (64, 64)


# ---------------------------------------------------------------------------------------------------------
# Predict + writer
# ---------------------------------------------------------------------------------------------------------
def test_predict_writes_pngs_csv_and_summary(prior_file, images, tmp_path):
    out = tmp_path / "out"
    module, writer, _ = _predict(
        str(prior_file), images, out, batch_size=2, writer_kw={"save_degraded": True, "save_grid": True}
    )
    assert module.images_sampled == 5
    names = sorted(p.name for p in (out / "restored").iterdir())
    assert names == [f"img{i}.png" for i in range(5)]
    assert len(list((out / "degraded").iterdir())) == 5
    grid = read_image(out / "grid" / "img0.png")
    assert grid.shape == (3, 16 + 4, 3 * 16 + 8)  # make_grid: 2 px padding around 3 panels

    rows = _csv(out / "metrics.csv")
    assert [r["key"] for r in rows] == [f"img{i}" for i in range(5)]
    # the CSV's PSNR is that of the written PNG against the truth
    from diffpir.metrics import psnr

    dm = RestorationDataModule(str(images), degradation=_spec(), channels=3)
    dm.setup("predict")
    truth = dm.dataset[3].x
    restored = read_image(out / "restored" / "img3.png")
    assert float(rows[3]["psnr"]) == pytest.approx(float(psnr(restored[None], truth[None])[0]), abs=1e-9)
    # beside it, the input's PSNR (the written measurement) and the classical baseline's
    from diffpir.methods.classical import Classical
    from diffpir.restoration.data import collate

    assert list(rows[0])[:5] == ["key", "file", "psnr", "psnr_input", "psnr_classical"]
    degraded = read_image(out / "degraded" / "img3.png")
    assert float(rows[3]["psnr_input"]) == pytest.approx(float(psnr(degraded[None], truth[None])[0]), abs=1e-9)
    (batch,) = collate([dm.dataset[3]], dm.degradation)
    classical = Classical()(batch.y, batch.op, None, sigma_n=batch.sigma_n).clamp(0, 1)
    assert float(rows[3]["psnr_classical"]) == pytest.approx(float(psnr(classical, truth[None])[0]), abs=1e-6)
    assert not (out / "failed.json").exists()  # nothing failed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 5 and summary["count_with_truth"] == 5
    assert summary["mean"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert summary["mean"]["ssim"] == pytest.approx(np.mean([float(r["ssim"]) for r in rows]))
    assert summary["settings"]["model"]["method"]["init_args"]["steps"] == STEPS
    assert summary["settings"]["data"]["degradation"]["task"] == "deblur_gaussian"
    assert writer.summary == summary


def test_results_do_not_depend_on_batch_size(live_prior_file, images, tmp_path):
    """Bitwise with the exact option (batches of 3 run image by image); without it, equal to round-off only (the
    network's convolutions may round differently per batch size, e.g. oneDNN on AVX2: tests/test_methods.py). The
    prior's eps depends on its input (the plain tiny prior outputs 0, which any batching would keep equal)."""
    spec = _spec("sr_x4", sigma_n=0.05)
    _predict(str(live_prior_file), images, tmp_path / "b1", spec, batch_size=1)
    _predict(str(live_prior_file), images, tmp_path / "b3", spec, batch_size=3, module_kw={"batch_invariant": True})
    for i in range(5):
        a = (tmp_path / "b1" / "restored" / f"img{i}.png").read_bytes()
        b = (tmp_path / "b3" / "restored" / f"img{i}.png").read_bytes()
        assert a == b, f"img{i} differs between batch sizes 1 and 3"


def test_rerun_skips_done_images_without_sampling(prior_file, images, tmp_path):
    out = tmp_path / "out"
    _predict(str(prior_file), images, out)
    first = (out / "restored" / "img1.png").read_bytes()
    (out / "summary.json").unlink()
    module, _, trainer = _predict(str(prior_file), images, out)
    assert module.images_sampled == 0 and len(trainer.datamodule.dataset) == 0  # the data module left all out
    assert json.loads((out / "summary.json").read_text())["count"] == 5  # merged although nothing ran
    (out / "restored" / "img1.png").unlink()
    module, _, trainer = _predict(str(prior_file), images, out)
    assert module.images_sampled == 1 and trainer.datamodule.dataset.keys == ["img1"]
    assert len(trainer.datamodule.keys) == 5  # every requested image, for the merge
    assert (out / "restored" / "img1.png").read_bytes() == first
    rows = _csv(out / "metrics.csv")
    assert sorted(r["key"] for r in rows) == [f"img{i}" for i in range(5)]  # no duplicates, none lost
    # asking for grids later makes the images not done any more
    module, _, _ = _predict(str(prior_file), images, out, writer_kw={"save_grid": True})
    assert module.images_sampled == 5


def test_merge_dedupes_rows_across_ranks(tmp_path):
    out = tmp_path / "out"
    (out / "metrics").mkdir(parents=True)
    for k in ("a", "b", "c"):
        write_png_atomic(torch.zeros(3, 4, 4), out / "restored" / f"{k}.png")
    rows0 = [
        {"key": "a", "file": "a.png", "psnr": 10.0, "written": 1},
        {"key": "c", "file": "c.png", "psnr": 30.0, "written": 1},
    ]
    rows1 = [
        {"key": "b", "file": "b.png", "psnr": 20.0, "written": 1},
        {"key": "a", "file": "a.png", "psnr": 10.0, "written": 1},  # a padded repeat on another rank
        {"key": "c", "file": "c.png", "psnr": 31.0, "written": 2},  # rewritten later: wins
        {"key": "gone", "file": "gone.png", "psnr": 1.0, "written": 1},  # no PNG: dropped
    ]
    (out / "metrics" / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows0))
    (out / "metrics" / "rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows1) + '{"key": "tr')
    summary = merge_metrics(out)
    rows = _csv(out / "metrics.csv")
    assert [(r["key"], float(r["psnr"])) for r in rows] == [("a", 10.0), ("b", 20.0), ("c", 31.0)]
    assert summary["count"] == 3 and summary["mean"]["psnr"] == pytest.approx(61 / 3)
    assert merge_metrics(out, keys=["a", "b"])["count"] == 2


def test_grey_prior_restores_grey_images(images, tmp_path):
    out = tmp_path / "out"
    _predict(_tiny_prior(channels=1), images, out, _spec("inpaint_box", sigma_n=0.0), data_kw={"limit": 2})
    img = read_image(out / "restored" / "img0.png", channels=None)
    assert img.shape == (1, 16, 16)
    # the known pixels stay close to the truth (sigma_n = 0: the data steps paste them; the last step has none)
    dm = RestorationDataModule(str(images), degradation=_spec("inpaint_box", sigma_n=0.0), channels=1, limit=1)
    dm.setup("predict")
    item = dm.dataset[0]
    known = item.params["mask"].bool().expand_as(item.x)
    assert (img[known] - item.x[known]).abs().max() <= 8 / 255


def test_prior_precision_is_float32_on_cpu(prior_file, images, tmp_path):
    _predict(str(prior_file), images, tmp_path / "p32", data_kw={"limit": 1})
    _predict(str(prior_file), images, tmp_path / "pbf", data_kw={"limit": 1}, module_kw={"prior_precision": "bf16"})
    assert (tmp_path / "p32/restored/img0.png").read_bytes() == (tmp_path / "pbf/restored/img0.png").read_bytes()
    with pytest.raises(ValueError, match="prior_precision must be one of"):
        RestorationModule(_tiny_prior(), prior_precision="8")


def test_mixed_sizes_in_one_batch_and_show_steps(prior_file, tmp_path):
    folder = _write_images(tmp_path / "mixed", 1, size=16)
    odd = (np.random.default_rng(9).random((17, 23, 3)) * 255).astype(np.uint8)  # not a multiple of the net's 2
    Image.fromarray(odd).save(folder / "large.png")
    out = tmp_path / "out"
    module, _, _ = _predict(
        str(prior_file), folder, out, _spec("denoise"), batch_size=2, module_kw={"show_steps": True}
    )
    assert module.images_sampled == 2
    assert read_image(out / "restored" / "large.png").shape == (3, 17, 23)
    # same result as alone
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "large.png").write_bytes((folder / "large.png").read_bytes())
    _predict(str(prior_file), alone, tmp_path / "out_alone", _spec("denoise"), batch_size=1)
    assert (out / "restored/large.png").read_bytes() == (tmp_path / "out_alone/restored/large.png").read_bytes()


@pytest.mark.skipif(not __import__("diffpir.metrics").metrics.lpips_available(), reason="LPIPS weights absent")
def test_lpips_column_when_available(prior_file, images, tmp_path):
    out = tmp_path / "out"
    folder = _write_images(tmp_path / "img32", 2, size=32)
    module = RestorationModule(str(prior_file), method=DiffPIRMethod(steps=2), lpips=True)
    data = RestorationDataModule(str(folder), degradation=_spec("denoise"))
    trainer = quiet_trainer(callbacks=[RestorationWriter(str(out))])
    trainer.predict(module, datamodule=data, return_predictions=False)
    rows = _csv(out / "metrics.csv")
    assert all(0 <= float(r["lpips"]) < 2 for r in rows)
    assert "lpips" in json.loads((out / "summary.json").read_text())["mean"]


# ---------------------------------------------------------------------------------------------------------
# TensorBoard trajectories
# ---------------------------------------------------------------------------------------------------------
def test_trajectory_events(prior_file, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    steps = 5
    traj = TrajectoryLogger(keys=["img1"], every=2)
    _predict(str(prior_file), images, out, batch_size=2, callbacks=[traj], module_kw={"steps": steps})
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    base = "trajectory/img1"
    assert {f"{base}/{s}" for s in ("psnr", "psnr_pred", "residual", "residual_pred", "t")} <= set(tags["scalars"])
    assert not any("img0" in t for t in tags["scalars"])  # only the chosen image
    psnr_events = ea.Scalars(f"{base}/psnr")
    assert [e.step for e in psnr_events] == list(range(steps))
    assert [e.value for e in ea.Scalars(f"{base}/t")][0] == 999.0
    assert [e.step for e in ea.Images(f"{base}/grid")] == [0, 2, 4]
    rows = {r["key"]: r for r in _csv(out / "metrics.csv")}
    assert psnr_events[-1].value == pytest.approx(float(rows["img1"]["psnr"]), abs=1e-4)
    # the data-corrected estimate fits y better than the prior's on the steps with a data step
    hat = [e.value for e in ea.Scalars(f"{base}/residual")][:-1]
    pred = [e.value for e in ea.Scalars(f"{base}/residual_pred")][:-1]
    assert all(h <= p + 1e-6 for h, p in zip(hat, pred))


def test_trajectory_first_k(prior_file, images, tmp_path):
    traj = TrajectoryLogger(first_k=2, every=100)
    _predict(str(prior_file), images, tmp_path / "out", batch_size=3, callbacks=[traj])
    assert traj.chosen == {"img0", "img1"}
    files = list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*.rank0"))
    assert len(files) == 1
    with pytest.raises(ValueError, match="every must be at least 1"):
        TrajectoryLogger(every=0)


def test_trajectory_keys_not_in_the_run_warn(prior_file, images, tmp_path):
    traj = TrajectoryLogger(keys=["img1", "img_1"], every=100)
    with pytest.warns(UserWarning, match=r"trajectory keys \['img_1'\] are not among the images of this run"):
        _predict(str(prior_file), images, tmp_path / "out", data_kw={"limit": 2}, callbacks=[traj])
    assert traj.chosen == {"img1", "img_1"}


def test_psnr_is_finite_number(prior_file, images, tmp_path):
    """A guard on the CSV format: numbers parse back as finite floats."""
    out = tmp_path / "out"
    _predict(str(prior_file), images, out, _spec("inpaint_random", sigma_n=0.0), data_kw={"limit": 2})
    for r in _csv(out / "metrics.csv"):
        assert math.isfinite(float(r["psnr"])) and math.isfinite(float(r["seconds"]))
        assert int(r["nfe"]) == STEPS


def test_image_metrics_is_the_one_per_image_metric_of_module_and_benchmarks():
    """Issue 15: one per-image metric function (uint8 PSNR/SSIM, LPIPS when given) for the restoration module
    and the benchmarks' ``Metrics``; SSIM only from its 11 px window, LPIPS from 32 px, grey repeated to RGB."""
    from diffpir.cli.evaluate import Metrics
    from diffpir.metrics import image_metrics, quantize, ssim

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 1, 40, 40, generator=g)
    x = (truth + 0.05 * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    seen = []

    def fake_lpips(a, b):
        seen.append(tuple(a.shape))
        return (a - b).abs().mean(dim=(1, 2, 3))

    rows = image_metrics(x, truth, {"lpips": fake_lpips})
    mse = ((quantize(x) - quantize(truth)) ** 2).mean(dim=(1, 2, 3))
    for i, row in enumerate(rows):
        assert set(row) == {"psnr", "ssim", "lpips"}
        assert row["psnr"] == pytest.approx(10 * math.log10(255**2 / float(mse[i])), rel=1e-6)
        assert row["ssim"] == float(ssim(x, truth)[i])
        assert row["lpips"] == pytest.approx(float((x[i] - truth[i]).abs().mean()), rel=1e-6)
    assert seen == [(2, 3, 40, 40)]
    assert set(image_metrics(x[..., :16, :16], truth[..., :16, :16], {"lpips": fake_lpips})[0]) == {"psnr", "ssim"}
    assert set(image_metrics(x[..., :10, :10], truth[..., :10, :10])[0]) == {"psnr"}
    assert Metrics(lpips_nets=())(x, truth) == image_metrics(x, truth)


def test_done_images_are_left_out_before_the_ranks_split_the_rest(images):
    """Issue 15: on a resume the data module drops done images in setup, so a DistributedSampler gives every rank a
    share of what is left (before, one rank could get only finished images and restore nothing)."""
    from torch.utils.data import DistributedSampler

    dm = RestorationDataModule(str(images), degradation=_spec(), channels=3)
    dm.setup("predict")
    dm.skip_done(lambda key: key not in ("img3", "img4"))
    assert dm.dataset.keys == ["img3", "img4"] and dm.keys == [f"img{i}" for i in range(5)]
    shares = [list(DistributedSampler(dm.dataset, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert shares == [[0], [1]]
    dm.setup("predict")  # a later setup applies it again
    assert dm.dataset.keys == ["img3", "img4"]
