"""Training: image-folder data (seeded crops, errors), EMA, the DDPM loss, validation metrics, checkpoints,
exact resume, DDP, the CLI (fit + export) and fine-tuning from a prior file. Tiny nets, tiny images."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer as shared_quiet_trainer
from lightning.pytorch import Callback, Trainer
from torchvision.io import write_png

from diffpir.cli.train import main as cli_main
from diffpir.models import build_unet
from diffpir.prior import eps_denoise
from diffpir.priorfile import export_prior, load_prior
from diffpir.schedule import NoiseSchedule
from diffpir.training import (
    EMA,
    DiffusionModule,
    EpochSampler,
    ImageCropDataset,
    ImageFolderDataModule,
    SampleGridCallback,
    ddim_sample,
    list_images,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


# -- helpers ------------------------------------------------------------------------------------------------
def write_images(folder: Path, n: int, size: tuple[int, int] = (20, 24), channels: int = 3, seed: int = 0):
    """``n`` smooth random PNGs (uint8) of ``size`` (h, w) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        low = torch.rand(channels, 1, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low.transpose(0, 1), size=size, mode="bilinear")[0]
        img = (img + 0.1 * torch.rand(img.shape, generator=g)).clamp(0, 1)
        write_png((img * 255).round().to(torch.uint8), str(folder / f"img{i:02d}.png"))
    return folder


def tiny_net(seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny preset with seeded (non-zero) weights, so outputs and gradients are not trivial."""
    net = build_unet("tiny", **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.02))
    return net


def quiet_trainer(**kwargs) -> Trainer:
    """:func:`conftest.quiet_trainer` that runs no validation unless asked and stops on ``max_steps`` only."""
    return shared_quiet_trainer(**{"num_sanity_val_steps": 0, "limit_val_batches": 0, "max_epochs": -1, **kwargs})


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images", 6)


# -- data ---------------------------------------------------------------------------------------------------
def test_list_images_recursive_and_suffixes(tmp_path: Path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "a" / "deep", 1)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "deep" / "img00.png").rename(tmp_path / "a" / "deep" / "UPPER.PNG")
    files = list_images(tmp_path / "a")
    assert [f.name for f in files] == ["UPPER.PNG", "img00.png", "img01.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_crops_seeded_per_epoch_and_index(images: Path):
    ds = ImageCropDataset(list_images(images), crop_size=16, patches_per_image=3, seed=5)
    assert len(ds) == 18
    a, b = ds[(1, 4)], ds[(1, 4)]
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(ds[(1, 4)], ds[(2, 4)])  # a new epoch draws new crops
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(ds[4], ds[(0, 4)])  # a plain index is epoch 0
    grey = ImageCropDataset(list_images(images), channels=1, crop_size=8, resize_to=12, scale_range=(0.5, 1.0))
    assert grey[(0, 0)].shape == (1, 8, 8)


def test_epoch_sampler_orders_by_epoch_and_splits_ranks(images: Path):
    ds = ImageCropDataset(list_images(images), crop_size=16, patches_per_image=2)
    s0 = EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    s0.set_epoch(3)
    keys = list(s0)
    assert {e for e, _ in keys} == {3} and sorted(i for _, i in keys) == list(range(12))
    again = EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    again.set_epoch(3)
    assert list(again) == keys  # epoch 3 has the same order whether or not epochs 0-2 ran first
    ranks = [EpochSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    parts = [{i for _, i in s} for s in ranks]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(12))


def test_loader_with_workers_gives_the_same_batches(images: Path):
    batches = {}
    for workers in (0, 2):
        dm = ImageFolderDataModule(str(images), val_fraction=0, crop_size=16, patches_per_image=2, batch_size=4)
        dm.num_workers = workers
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(2)
        batches[workers] = torch.cat(list(loader))
    assert torch.equal(batches[0], batches[2])


def test_unreadable_files_are_skipped_counted_and_named(images: Path, caplog):
    (images / "broken.png").write_bytes(b"not an image at all")
    dm = ImageFolderDataModule(str(images), val_fraction=0, crop_size=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.num_skipped == 1 and dm.train_set.bad_files[0].endswith("broken.png")
    assert len(dm.train_set.files) == 6
    assert "broken.png" in caplog.text


def test_empty_folder_and_small_images_fail_clearly(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images .* found under .*empty"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")
    write_images(tmp_path / "small", 2, size=(10, 30))
    with pytest.raises(ValueError, match=r"img00\.png is 30x10, smaller than crop_size=16; lower crop_size"):
        ImageFolderDataModule(str(tmp_path / "small"), val_fraction=0, crop_size=16).setup("fit")
    write_images(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="too few to hold out"):
        ImageFolderDataModule(str(tmp_path / "one"), val_fraction=0.5, crop_size=16).setup("fit")


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path):
    write_images(tmp_path / "imgs", 10)
    splits = [ImageFolderDataModule(str(tmp_path / "imgs"), val_fraction=0.2, seed=s).split_files() for s in (1, 1, 2)]
    train, val = splits[0]
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert splits[0] == splits[1] and splits[0] != splits[2]


# -- EMA ----------------------------------------------------------------------------------------------------
def test_ema_warmup_decay_update_and_state():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert ema.update(net) == pytest.approx(0.1)
    torch.testing.assert_close(ema.module.weight, 0.1 * before + 0.9 * net.weight)
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9 and int(ema.num_updates) == 201
    restored = EMA(torch.nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.count == 201 and torch.equal(restored.module.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.parameters())
    # a checkpoint of the former layout (the update count under "num_updates") continues the same average
    old = {("num_updates" if k == "n_averaged" else k): v for k, v in ema.state_dict().items()}
    old["num_updates"] = old["num_updates"] - 1
    again = EMA(torch.nn.Linear(3, 2), decay=0.9)
    again.load_state_dict(old)
    assert again.count == 201 and int(again.n_averaged) == 202
    assert again.update(net) == ema.update(net) == 0.9 and torch.equal(again.module.weight, ema.module.weight)
    assert EMA(net, decay=0.9, warmup=False).current_decay() == 0.9


# -- loss ---------------------------------------------------------------------------------------------------
def test_model_step_is_the_ddpm_simple_loss_on_eps_channels():
    net = tiny_net(out_channels=6)  # learn_sigma-style: eps then variance channels
    module = DiffusionModule(net, ema_decay=None)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = module.model_step(x, torch.Generator().manual_seed(1))
    # The same draws by hand.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    sched = NoiseSchedule.linear()
    x_t = sched.q_sample(x * 2 - 1, t, noise)
    expected = (net(x_t, t)[:, :3] - noise).pow(2).mean()
    assert torch.equal(out["t"], t)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    head = net.out[-1]
    assert head.weight.grad[3:].abs().max() == 0 and head.bias.grad[3:].abs().max() == 0
    assert head.weight.grad[:3].abs().max() > 0


def test_stratified_validation_timesteps_cover_all_buckets():
    module = DiffusionModule(tiny_net(), ema_decay=None)
    out = module.model_step(torch.rand(20, 3, 8, 8), torch.Generator().manual_seed(0), stratify=10, offset=3)
    buckets = out["t"] // 100
    assert sorted(buckets.tolist()) == sorted(list(range(10)) * 2)
    assert buckets[0] == 3


@pytest.mark.parametrize("t", [0, 300, 999])
def test_eps_denoise_is_exact_for_the_oracle_eps(t):
    """D(x, sigma) of the true eps is x0 for any sigma; the net is asked at the timestep of sigma with the
    unit-variance input x / sqrt(1 + sigma^2) (= x_t when sigma = sigma_bar_t); only the first C channels count."""
    sched = NoiseSchedule.linear()
    sigma = float(sched.sigma_bar[t])
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    n = torch.randn(2, 3, 8, 8)
    seen = {}

    def oracle(x_in, tt):  # a learn_sigma layout: eps, then variance channels that must be ignored
        seen.update(x=x_in, t=tt)
        return torch.cat([n, torch.full_like(n, 1e3)], 1)

    x = x0 + sigma * n
    torch.testing.assert_close(eps_denoise(oracle, sched, x, sigma), x0, atol=1e-6 * (1 + sigma), rtol=0)
    assert seen["t"].tolist() == [t, t]
    torch.testing.assert_close(seen["x"], sched.extract("sqrt_alphas_cumprod", seen["t"], x) * x, atol=1e-6, rtol=1e-5)


def test_hparams_are_primitive():
    module = DiffusionModule(tiny_net(), val_sigmas=(25.0,))

    def primitive(v):
        if isinstance(v, (list, tuple)):
            return all(primitive(u) for u in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and primitive(u) for k, u in v.items())
        return v is None or isinstance(v, (bool, int, float, str))

    assert "net" not in module.hparams
    assert all(primitive(v) for v in module.hparams.values())


# -- fitting, checkpoints, resume ------------------------------------------------------------------------------
def _dm(images: Path, **kw) -> ImageFolderDataModule:
    opts = dict(val_fraction=0, crop_size=16, patches_per_image=2, batch_size=4, seed=0)
    opts.update(kw)
    return ImageFolderDataModule(str(images), **opts)


def test_resume_continues_steps_optimizer_and_ema_exactly(images: Path, tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    init = tiny_net(seed=3).state_dict()

    def fresh() -> DiffusionModule:
        net = build_unet("tiny")
        net.load_state_dict(init)
        return DiffusionModule(net, lr=1e-3, warmup_steps=4, ema_decay=0.9, seed=7)

    # 6 images x 2 crops / batch 4 = 3 steps per epoch.
    straight = fresh()
    quiet_trainer(max_steps=6).fit(straight, _dm(images))

    first = fresh()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    quiet_trainer(max_steps=4, callbacks=[saver], enable_checkpointing=True).fit(first, _dm(images))
    # step 2: mid-epoch; step 3: end of epoch 0.
    for step in (2, 3):
        ckpt = tmp_path / f"step={step}.ckpt"
        saved = torch.load(ckpt, weights_only=True)["state_dict"]
        resumed = fresh()
        trainer = quiet_trainer(max_steps=6)
        trainer.fit(resumed, _dm(images), ckpt_path=str(ckpt))
        assert trainer.global_step == 6 and int(resumed.ema.num_updates) == 6
        assert int(saved["ema.n_averaged"]) == step + 1  # the starting copy, then one update per step
        for name, a, b in [("net", straight.net, resumed.net), ("ema", straight.ema, resumed.ema)]:
            for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
                assert torch.equal(va, vb), f"resumed from step {step}: {name}.{k} differs"


def test_checkpoint_carries_the_prior_and_loads_weights_only(images: Path, tmp_path: Path):
    module = DiffusionModule(tiny_net(), ema_decay=0.9)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, _dm(images))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = ckpt["diffpir_prior"]
    assert spec["format"] == 1 and spec["unet"] == module.net.config
    assert spec["schedule"] == {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    ema_sd = module.ema.module.state_dict()
    assert spec["state_dict"].keys() == ema_sd.keys()
    assert all(torch.equal(spec["state_dict"][k], v) for k, v in ema_sd.items())
    assert not torch.equal(ema_sd["out.2.weight"], module.net.state_dict()["out.2.weight"])
    prior = load_prior(path)
    assert torch.equal(prior.net.out[2].weight, module.ema.module.out[2].weight)
    rebuilt = DiffusionModule.from_checkpoint(str(path))
    assert torch.equal(rebuilt.ema.module.out[2].weight, module.ema.module.out[2].weight)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (self.marker,))


def test_from_checkpoint_loads_through_lightning_with_the_guards(tmp_path: Path, monkeypatch):
    """Lightning's load_from_checkpoint (weights_only) behind the guards: overrides apply, the file's
    hyper-parameters cannot pick an instantiator, and URLs, folders, code and other architectures are refused."""
    import lightning

    module = DiffusionModule(tiny_net(), ema_decay=0.9, val_sigmas=(25.0,))
    with torch.no_grad():
        module.ema.module.out[2].weight.add_(1.0)  # the EMA copy differs from the net
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    ckpt["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"  # allow-listed by Lightning
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint chose how the module is built")

    monkeypatch.setattr("lightning.pytorch.cli.instantiate_module", refuse)
    rebuilt = DiffusionModule.from_checkpoint(path, val_sigmas=(15.0,))
    assert type(rebuilt) is DiffusionModule and rebuilt.val_sigmas == [15.0] and rebuilt.hparams.ema_decay == 0.9
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    assert rebuilt.net.config == module.net.config

    with pytest.raises(ValueError, match="is a URL"):
        DiffusionModule.from_checkpoint("https://example.com/m.ckpt")
    with pytest.raises(ValueError, match="is a folder"):
        DiffusionModule.from_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"diffpir_prior": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused to load"):
        DiffusionModule.from_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    other = dict(ckpt, diffpir_prior={**ckpt["diffpir_prior"], "unet": {**module.net.config, "model_channels": 16}})
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="do not fit the network the checkpoint describes"):
        DiffusionModule.from_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a diffpir training checkpoint"):
        DiffusionModule.from_checkpoint(tmp_path / "plain.ckpt")


def test_validation_metrics_are_logged_and_reproducible(images: Path):
    module = DiffusionModule(tiny_net(), ema_decay=0.9, val_sigmas=(15, 25, 50))
    dm = _dm(images, val_fraction=0.34, batch_size=2)
    trainer = quiet_trainer(limit_val_batches=2)
    first = trainer.validate(module, dm, verbose=False)[0]
    second = trainer.validate(module, dm, verbose=False)[0]
    assert first == second
    for k in ("val/loss", "val/psnr_sigma15", "val/psnr_sigma25", "val/psnr_sigma50"):
        assert math.isfinite(first[k])
    assert first["val/psnr_sigma15"] > first["val/psnr_sigma50"]
    assert sum(k.startswith("val/loss_t") for k in first) >= 2
    assert "val/loss_t0-99" in first or "val/loss_t900-999" in first


def test_ddim_samples_are_seeded_and_in_range():
    net = tiny_net().eval()
    sched = NoiseSchedule.linear()
    a = ddim_sample(net, sched, (2, 3, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(net, sched, (2, 3, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_sample_grid_callback_logs_a_grid(images: Path, tmp_path: Path):
    from lightning.pytorch.loggers import TensorBoardLogger

    cb = SampleGridCallback(num_samples=4, steps=3)
    module = DiffusionModule(tiny_net(), ema_decay=0.9)
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=1, callbacks=[cb], logger=TensorBoardLogger(tmp_path, name="tb")
    )
    trainer.fit(module, _dm(images, val_fraction=0.34))
    assert cb.last_grid is not None and cb.last_grid.shape[0] == 3
    assert list((Path(trainer.log_dir) / "samples").glob("step*.png"))


def test_bf16_mixed_precision_trains_on_cpu(images: Path):
    module = DiffusionModule(tiny_net(), ema_decay=0.9)
    trainer = quiet_trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(module, _dm(images))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert module.net.out[2].weight.dtype == torch.float32 and int(module.ema.num_updates) == 2


def test_compiled_forward_keeps_the_checkpoint_keys():
    module = DiffusionModule(tiny_net())
    keys = list(module.state_dict())
    module.enable_compile()  # compiles lazily, at the first call (not made here)
    assert list(module.state_dict()) == keys
    assert module._compiled is not None and module._compiled._orig_mod is module.net


def test_compiled_training_step_runs_and_matches_the_plain_one(monkeypatch):
    """The compiled forward is actually called in a training step (the eager backend keeps this fast; the GPU
    script compiles with inductor) and gives the plain network's loss."""
    import functools

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # an eager backend that counts the graphs it is handed
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    module = DiffusionModule(tiny_net())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = module.model_step(x, torch.Generator().manual_seed(1))["loss"]
    assert counter.frame_count == 0
    module.enable_compile()
    compiled = module.model_step(x, torch.Generator().manual_seed(1))["loss"]
    assert counter.frame_count >= 1  # the training forward went through the compiled module
    torch.testing.assert_close(compiled, plain)


def test_channel_mismatch_is_reported(images: Path):
    module = DiffusionModule(build_unet("tiny"))
    with pytest.raises(ValueError, match="data has 1 channel.*network takes 3"):
        quiet_trainer(max_steps=1).fit(module, _dm(images, channels=1))


# -- fine-tuning from a prior file ------------------------------------------------------------------------------
def test_init_from_loads_a_prior_and_restarts_the_ema(tmp_path: Path):
    source = tiny_net(seed=11)
    path = export_prior(source, None, tmp_path / "p.safetensors")
    module = DiffusionModule(build_unet("tiny"), init_from=str(path))
    module.on_fit_start()  # loaded at the start of a fit (setup() comes before Lightning restores a checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(module.net.state_dict().values(), source.state_dict().values()))
    assert torch.equal(module.ema.module.out[2].weight, source.out[2].weight) and module.ema.count == 0
    wrong = DiffusionModule(build_unet("small"), init_from=str(path))
    with pytest.raises(ValueError, match="does not fit the training network"):
        wrong.on_fit_start()


# -- CLI ------------------------------------------------------------------------------------------------------
def test_cli_fit_smoke_config_then_export(images: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(
        ["fit", "--config", str(CONFIGS / "smoke.yaml"), "--data.data_dir", str(images), "--data.crop_size", "16"]
        + ["--trainer.max_steps", "3"]
    )
    ckpt = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # smoke.yaml saves every 2 steps, and diffpir's ModelCheckpoint the final step too (Lightning's would keep step 2)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    assert list((tmp_path / "runs" / "smoke").glob("version_*/samples/*.png"))
    cli_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "p.safetensors"), "--fp16"])
    prior = load_prior(tmp_path / "p.safetensors")
    spec = torch.load(ckpt, weights_only=True)["diffpir_prior"]
    torch.testing.assert_close(prior.net.out[2].weight, spec["state_dict"]["out.2.weight"].half().float())
    # Resume continues the step count.
    cli_main(
        ["fit", "--config", str(CONFIGS / "smoke.yaml"), "--data.data_dir", str(images), "--data.crop_size", "16"]
        + ["--trainer.max_steps", "4", "--ckpt_path", "last"]
    )
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4


def _smoke(images: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    """``diffpir-train`` arguments of a smoke.yaml run on ``images`` (16 px crops: 2 steps an epoch on 6 images)."""
    args = [subcommand, "--config", str(CONFIGS / "smoke.yaml"), "--data.data_dir", str(images)]
    return [*args, "--data.crop_size", "16", *extra]


def _cli_error(args: list[str], capsys) -> str:
    """The one-line error ``diffpir-train`` exits with (status 1, no traceback)."""
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("diffpir-train: error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _last(tmp_path: Path, name: str = "smoke") -> dict:
    return torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_fine_tune_starts_from_init_from_and_a_resume_never_reads_it_again(images: Path, tmp_path: Path, monkeypatch):
    """A fresh fit loads init_from before its first step (lr 0: the trained weights stay the prior's); the resume of
    that run restores the checkpoint and does not read init_from, which may have moved away since."""
    monkeypatch.chdir(tmp_path)
    source = tiny_net(seed=11)
    prior = export_prior(source, None, tmp_path / "p.safetensors")
    cli_main(_smoke(images, "--model.init_from", str(prior), "--model.lr", "0", "--trainer.max_steps", "1"))
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 1
    for k, v in source.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"net.{k}"], v), k
        assert torch.equal(ckpt["state_dict"][f"ema.module.{k}"], v), k
    prior.rename(tmp_path / "moved.safetensors")
    cli_main(_smoke(images, "--model.init_from", str(prior), "--trainer.max_steps", "3", "--ckpt_path", "last"))
    resumed = _last(tmp_path)
    assert resumed["global_step"] == 3
    assert not torch.equal(resumed["state_dict"]["net.out.2.weight"], source.out[2].weight)  # lr 1e-3 from step 1
    # The Python API: trainer.fit(ckpt_path=...) does not read init_from either.
    module = DiffusionModule(build_unet("tiny"), init_from=str(prior), ema_decay=0.99)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(module, _dm(images), ckpt_path=str(tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 4


@pytest.mark.parametrize("case", ["prediction", "schedule", "plain_state_dict"])
def test_init_from_mismatches_are_one_line_errors_naming_the_flag(
    case, images: Path, tmp_path: Path, monkeypatch, capsys
):
    """A v-prior into an eps run, a prior of another schedule, a state dict without a preset: refused before any step,
    with the flag a diffpir-train user passes."""
    from diffpir.prior import Prior

    monkeypatch.chdir(tmp_path)
    net = tiny_net(seed=5)
    if case == "prediction":
        path = export_prior(Prior(net, NoiseSchedule.linear(), prediction="v"), None, tmp_path / "v.safetensors")
        says = "is a v-prediction prior and this run trains eps-prediction: pass --model.prediction v"
    elif case == "schedule":
        path = export_prior(net, NoiseSchedule.linear(500, 1e-4, 0.04), tmp_path / "t500.safetensors")
        says = (
            "another noise schedule (linear, T=500, betas 0.0001-0.04) than this run's (linear, T=1000, betas "
            "0.0001-0.02): pass --model.num_timesteps 500 --model.beta_start 0.0001 --model.beta_end 0.04"
        )
    else:
        path = tmp_path / "plain.pt"
        torch.save({"w": torch.zeros(2)}, path)
        says = "plain state dict that matches no UNet preset; pass --model.init_preset NAME (known:"
    err = _cli_error(_smoke(images, "--model.init_from", str(path), "--trainer.max_steps", "1"), capsys)
    assert says in err, err
    if case != "plain_state_dict":
        assert f"init_from={str(path)!r}" in err, err
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any step
    if case == "prediction":  # with the flag it fine-tunes, as a v-prior
        cli_main(_smoke(images, "--model.init_from", str(path), "--model.prediction", "v", "--trainer.max_steps", "1"))
        ckpt = _last(tmp_path)
        assert ckpt["global_step"] == 1 and ckpt["diffpir_prior"]["prediction"] == "v"


def test_resume_with_another_network_or_without_ema_names_the_difference(
    images: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cli_main(_smoke(images, "--trainer.max_steps", "1"))
    before = (tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt").read_bytes()
    resume = ["--trainer.max_steps", "2", "--ckpt_path", "last"]
    err = _cli_error(_smoke(images, *resume, "--model.ema_decay", "null"), capsys)
    assert "does not fit this run's model: the checkpoint has EMA weights and this run none" in err, err
    assert "use the checkpoint's settings (--model.ema_decay 0.99) to resume it" in err, err
    assert "--trainer.logger.init_args.name NEW_NAME" in err and "size mismatch" not in err, err
    digits = ["--model.net.init_args.preset_or_config", "digits", "--data.channels", "1"]
    err = _cli_error(_smoke(images, *resume, *digits), capsys)
    assert "the checkpoint's network (the 'tiny' UNet) is not this run's (the 'digits' UNet)" in err, err
    assert "(--model.net.init_args.preset_or_config tiny --data.channels 3)" in err, err
    assert (tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt").read_bytes() == before
    # another target or schedule: the weights would load, and the run would go on learning something else
    err = _cli_error(_smoke(images, *resume, "--model.prediction", "v", "--model.beta_end", "0.01"), capsys)
    assert "trained for another target or noise schedule" in err, err
    assert "(--model.prediction eps --model.beta_end 0.02) to resume it" in err, err
    assert (tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt").read_bytes() == before
    # validate --ckpt_path too (and it has no run to start instead)
    err = _cli_error(_smoke(images, "--ckpt_path", "last", "--model.ema_decay", "null", subcommand="validate"), capsys)
    assert "the checkpoint has EMA weights" in err and "NEW_NAME" not in err, err


def _val_metrics(args: list[str]) -> dict[str, float]:
    from diffpir.cli.train import build_cli

    cli = build_cli(args)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_validate_with_init_from_validates_that_prior(images: Path, tmp_path: Path, monkeypatch):
    """``validate --model.init_from P`` scores P's weights: the same metrics as validating the checkpoint P was
    exported from, not those of the untrained network."""
    monkeypatch.chdir(tmp_path)
    cli_main(_smoke(images, "--trainer.max_steps", "2"))
    ckpt = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    cli_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "p.safetensors")])
    of_ckpt = _val_metrics(_smoke(images, "--ckpt_path", str(ckpt), subcommand="validate"))
    of_prior = _val_metrics(_smoke(images, "--model.init_from", str(tmp_path / "p.safetensors"), subcommand="validate"))
    untrained = _val_metrics(_smoke(images, subcommand="validate"))
    assert {"val/loss", "val/psnr_sigma25"} <= of_ckpt.keys()
    assert of_prior == of_ckpt
    assert untrained["val/loss"] != of_ckpt["val/loss"]


def test_cli_offers_fit_validate_and_export_only(images: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["diffpir-train"])
    with pytest.raises(SystemExit) as info:
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "{fit,validate}" in out, out
    assert "predict" not in out and "test" not in out, out
    for sub in ("test", "predict"):
        with pytest.raises(SystemExit) as info:
            cli_main(_smoke(images, subcommand=sub))
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"invalid choice: '{sub}'" in err and "Traceback" not in err, err[-1000:]
    assert not (tmp_path / "runs").exists()


def test_export_never_overwrites_the_checkpoint_or_another_kind_of_file(
    images: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cli_main(_smoke(images, "--trainer.max_steps", "1"))
    ckpt = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    for out in (str(ckpt), "runs/smoke/checkpoints/../checkpoints/last.ckpt"):
        err = _cli_error(["export", "--ckpt", str(ckpt), "--out", out], capsys)
        assert "is the file being exported (--ckpt)" in err and "e.g. " in err and "last.safetensors" in err, err
    other = tmp_path / "other.ckpt"
    other.write_bytes(data)
    err = _cli_error(["export", "--ckpt", str(ckpt), "--out", str(other)], capsys)
    assert "already exists and is not a safetensors prior" in err, err
    assert _cli_error(["export", "--ckpt", str(ckpt), "--out", str(tmp_path)], capsys).endswith("prior.safetensors'")
    assert ckpt.read_bytes() == data and other.read_bytes() == data
    # an earlier export is replaced
    out = tmp_path / "p.safetensors"
    cli_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--fp16"])
    cli_main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    spec = torch.load(ckpt, weights_only=True)["diffpir_prior"]
    assert torch.equal(load_prior(out).net.out[2].weight, spec["state_dict"]["out.2.weight"])  # fp32 again


def test_data_messages_and_docs_name_every_readable_image_type(tmp_path: Path):
    from diffpir.io import IMAGE_SUFFIXES

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images") as info:
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")
    assert f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})" in str(info.value)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert f"`{' '.join(IMAGE_SUFFIXES)}`" in docs  # the Data section lists what is read


# -- DDP ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_cpu_processes(images: Path):
    module = DiffusionModule(tiny_net(), ema_decay=0.9)
    # 4 training images x 2 crops / (batch 2 x 2 ranks) = 2 steps per epoch, then validation.
    trainer = quiet_trainer(max_steps=2, devices=2, strategy="ddp_spawn", limit_val_batches=1)
    trainer.fit(module, _dm(images, patches_per_image=2, batch_size=2, val_fraction=0.34))
    # ddp_spawn sends the weights (EMA count included) and the metrics back to this process.
    assert int(module.ema.num_updates) == 2
    assert not torch.equal(module.ema.module.out[2].weight, tiny_net().out[2].weight)
    assert {"train/loss", "val/loss", "val/psnr_sigma25"} <= set(trainer.callback_metrics)


@pytest.mark.slow
def test_cli_ddp_spawn_fine_tunes_and_resumes_through_the_guarded_loader(images: Path, tmp_path: Path, monkeypatch):
    """``--trainer.strategy ddp_spawn`` pickles the trainer, its guarded checkpoint loader included, into the process
    it starts: init_from is loaded there before the first step, and the resume loads last.ckpt there (init_from,
    deleted meanwhile, is not read). One device, so two short spawns."""
    monkeypatch.chdir(tmp_path)
    source = tiny_net(seed=13)
    prior = export_prior(source, None, tmp_path / "p.safetensors")
    spawn = ["--trainer.strategy", "ddp_spawn", "--model.init_from", str(prior)]
    cli_main(_smoke(images, *spawn, "--model.lr", "0", "--trainer.max_steps", "1"))
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["net.out.2.weight"], source.out[2].weight)
    prior.unlink()
    cli_main(_smoke(images, *spawn, "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert _last(tmp_path)["global_step"] == 2


def test_lr_factor_warms_up_holds_then_cools_down_to_zero():
    from diffpir.training.module import lr_factor

    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 0, total=8, cooldown=4) for s in range(8)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert lr_factor(0, 2, total=2, cooldown=4) == 0.5 * 0.5  # warm-up and decay overlap: both apply
    assert lr_factor(9, 0, total=8, cooldown=4) == 0.0
    with pytest.raises(ValueError, match="total"):
        lr_factor(0, 0, cooldown=4)


class _LrLog(Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cooldown_follows_the_resumed_runs_settings(images: Path, tmp_path: Path):
    """A run at a constant LR, resumed inside the cooldown of a longer max_steps and with another lr, follows the
    new settings from its first step (not the checkpoint's LR, nor its schedule)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = _LrLog()
    quiet_trainer(max_steps=8, callbacks=[full]).fit(
        DiffusionModule(tiny_net(), lr=1e-2, warmup_steps=0, cooldown_steps=4, ema_decay=None), _dm(images)
    )
    assert full.lrs == pytest.approx([1e-2] * 5 + [7.5e-3, 5e-3, 2.5e-3])

    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    constant = DiffusionModule(tiny_net(), lr=2e-2, warmup_steps=0, ema_decay=None)
    quiet_trainer(max_steps=5, callbacks=[saver], enable_checkpointing=True).fit(constant, _dm(images))
    resumed = _LrLog()
    module = DiffusionModule(tiny_net(), lr=1e-2, warmup_steps=0, cooldown_steps=4, ema_decay=None)
    trainer = quiet_trainer(max_steps=8, callbacks=[resumed])
    trainer.fit(module, _dm(images), ckpt_path=str(tmp_path / "step=5.ckpt"))
    assert trainer.global_step == 8
    assert resumed.lrs == pytest.approx([7.5e-3, 5e-3, 2.5e-3])


def test_cooldown_needs_a_run_of_known_length(images: Path):
    module = DiffusionModule(tiny_net(), warmup_steps=0, cooldown_steps=4, ema_decay=None)
    with pytest.raises(ValueError, match="max_steps"):
        quiet_trainer(max_steps=-1, max_epochs=-1).fit(module, _dm(images))
    # max_epochs ends this run first (3 steps an epoch): the decay ends there, not at max_steps.
    log = _LrLog()
    epochs = DiffusionModule(tiny_net(), lr=1e-2, warmup_steps=0, cooldown_steps=2, ema_decay=None)
    quiet_trainer(max_steps=100, max_epochs=2, callbacks=[log]).fit(epochs, _dm(images))
    assert log.lrs == pytest.approx([1e-2] * 5 + [5e-3])
    with pytest.raises(ValueError, match="cooldown_steps"):
        DiffusionModule(tiny_net(), cooldown_steps=-1)


def test_model_checkpoint_saves_the_final_step(images: Path, tmp_path: Path):
    """last.ckpt holds the final step even when the last periodic save was earlier (Lightning's own keeps that)."""
    from diffpir.training import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=3)
    module = DiffusionModule(tiny_net(), warmup_steps=0, ema_decay=0.9)
    quiet_trainer(max_steps=5, callbacks=[saver], enable_checkpointing=True).fit(module, _dm(images))
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert torch.equal(ckpt["state_dict"]["net.out.2.weight"], module.net.out[2].weight)
