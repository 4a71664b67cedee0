"""Every YAML in configs/train/ parses with the training CLI and instantiates its trainer, model and data (no
training, no data read, no weights loaded)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import diffpir.training
from diffpir.cli.train import build_cli
from diffpir.models import UNet
from diffpir.training import DiffusionModule, ImageFolderDataModule, SampleGridCallback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))


def test_the_expected_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"smoke", "digits", "natural", "finetune_ffhq"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers and checkpoint folders are relative to the working directory
    cli = build_cli(["--config", str(path)], run=False)
    assert isinstance(cli.trainer, Trainer)
    assert isinstance(cli.model, DiffusionModule) and isinstance(cli.model.net, UNet)
    assert isinstance(cli.datamodule, ImageFolderDataModule)
    # The data and the network agree on channels and size.
    assert cli.datamodule.channels == cli.model.channels
    assert cli.datamodule.crop_size % cli.model.net.size_multiple == 0
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert any(isinstance(cb, SampleGridCallback) for cb in cli.trainer.callbacks)
    last = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    assert len(last) == 1 and last[0].dirpath is not None  # a fixed folder: `--ckpt_path last` finds it
    assert isinstance(last[0], diffpir.training.ModelCheckpoint)  # last.ckpt holds the final step
    assert cli.trainer.gradient_clip_val is not None


def test_natural_config_is_resumable_with_timed_checkpoints(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(next(p for p in CONFIGS if p.stem == "natural"))], run=False)
    (last,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    assert last._train_time_interval == timedelta(minutes=10) and last.save_on_exception
    assert cli.datamodule.crop_size == 64 and 32 <= cli.datamodule.batch_size <= 64
    assert cli.model.net.config["model_channels"] == 64


def test_num_threads_option(tmp_path: Path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        build_cli(["--config", str(next(p for p in CONFIGS if p.stem == "smoke")), "--num_threads", "1"], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_finetune_config_points_at_an_official_prior(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(next(p for p in CONFIGS if p.stem == "finetune_ffhq"))], run=False)
    assert cli.model.hparams.init_preset == "ffhq_10m" and cli.model.hparams.init_from
    assert cli.model.net.learn_sigma and cli.model.net.config["image_size"] == cli.datamodule.crop_size == 256


def _finetune_commands(readme: Path) -> list[list[str]]:
    """The arguments of the ``fit ... --model.init_from natural`` commands in a README's shell blocks."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if "fit" in args and "--model.init_from" in args:
                commands.append(args[args.index("fit") :])
    return commands


@pytest.mark.parametrize("readme", ["README.md", "train/README.md"])
def test_readme_fine_tune_commands_hold_out_the_users_own_images(readme: str, tmp_path: Path, monkeypatch):
    """natural.yaml validates on data/natural/val: the READMEs' fine-tunes of the bundled prior on "my/photos" hold out
    a fifth of those photos instead (parsed and instantiated, nothing read)."""
    monkeypatch.chdir(tmp_path)
    (command,) = _finetune_commands(ROOT / readme)
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in command[1:]]  # run from the repository
    cli = build_cli(args, run=False)
    assert cli.model.hparams.init_from == "natural"
    assert cli.datamodule.data_dir == "my/photos" and cli.datamodule.val_dir is None
    assert cli.datamodule.val_fraction == 0.2
