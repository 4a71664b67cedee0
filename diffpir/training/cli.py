"""``diffpir-train``: LightningCLI for fitting/validating priors, plus ``export`` (EMA weights -> prior file).

Usage::

    diffpir-train fit --config configs/train/digits.yaml
    diffpir-train fit --config configs/train/natural.yaml --ckpt_path last      # resume
    diffpir-train validate --config configs/train/digits.yaml --ckpt_path runs/digits/checkpoints/last.ckpt
    diffpir-train export --ckpt runs/digits/checkpoints/last.ckpt --out priors/digits.safetensors [--fp16]

``export`` is handled here; every other subcommand goes to :class:`lightning.pytorch.cli.LightningCLI`.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from diffpir.training.data import ImageFolderDataModule
from diffpir.training.module import DiffusionModule
from diffpir.utils import install_stop_watchdog, progress_bars_wanted, quiet_console, set_child_processes


def watch_launched_processes(trainer: Trainer) -> None:
    """Let the stop watchdog (:func:`diffpir.utils.install_stop_watchdog`) find the DDP processes that
    ``trainer``'s launcher starts, to forward SIGTERM to them."""
    set_child_processes(lambda: [p.pid for p in getattr(trainer.strategy.launcher, "procs", None) or []])


class DiffpirCLI(LightningCLI):
    """LightningCLI for :class:`DiffusionModule` and :class:`ImageFolderDataModule`.

    The network is given in the config as ``model.net`` (``class_path: diffpir.models.build_unet`` with a
    preset name, or ``diffpir.models.UNet`` with all its arguments). ``config.yaml`` is written to the log dir
    (overwritten on resume).

    Extra option: ``--num_threads N`` sets ``torch.set_num_threads(N)`` before anything is built (0: torch's
    default). On a CPU shared with other jobs, 1 thread can be several times faster than oversubscribing.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        watch_launched_processes(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = int(config.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs) -> DiffpirCLI:
    """The LightningCLI object (``run=False``: parse and instantiate only; then call ``cli.trainer.fit``)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("trainer_defaults", {"enable_progress_bar": progress_bars_wanted()})
    kwargs.setdefault(
        "parser_kwargs",
        {
            "description": "Train a DDPM prior (fit, validate) with Lightning. One more subcommand, handled before "
            "this parser: `diffpir-train export --ckpt CKPT --out FILE.safetensors [--fp16]` writes a checkpoint's "
            "EMA weights as a prior file (see `diffpir-train export --help`)."
        },
    )
    return DiffpirCLI(
        DiffusionModule,
        ImageFolderDataModule,
        args=None if args is None else list(args),
        run=run,
        **kwargs,
    )


def export(ckpt: str, out: str, fp16: bool = False) -> Path:
    """Write the EMA weights of a training checkpoint (or any prior :func:`diffpir.prior.load_prior` reads) as
    a safetensors prior file; returns its path."""
    from diffpir.prior import export_prior, load_prior

    prior = load_prior(ckpt)
    return export_prior(prior, None, out, dtype=torch.float16 if fp16 else None)


def export_main(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="diffpir-train export",
        description="Export the EMA weights of a training checkpoint as a prior file (safetensors).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by diffpir-train fit")
    parser.add_argument("--out", required=True, help="output path, e.g. priors/natural.safetensors")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    ns = parser.parse_args(list(argv))
    path = export(ns.ckpt, ns.out, ns.fp16)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffpir-train``."""
    argv = list(sys.argv[1:] if args is None else args)
    quiet_console()
    install_stop_watchdog()
    try:
        if argv and argv[0] == "export":
            export_main(argv[1:])
            return
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    except (ValueError, OSError, pickle.UnpicklingError) as err:  # bad files, refused checkpoints: one line
        from diffpir.restoration.cli import report_error

        report_error("diffpir-train", err)


if __name__ == "__main__":
    main()
