"""``diffpir-train``: LightningCLI for fitting/validating priors, plus ``export`` (EMA weights -> prior file).

Usage::

    diffpir-train fit --config configs/train/digits.yaml
    diffpir-train fit --config configs/train/natural.yaml --ckpt_path last      # resume
    diffpir-train validate --config configs/train/digits.yaml --ckpt_path runs/digits/checkpoints/last.ckpt
    diffpir-train export --ckpt runs/digits/checkpoints/last.ckpt --out priors/digits.safetensors [--fp16]

``export`` is handled here; every other subcommand goes to :class:`lightning.pytorch.cli.LightningCLI`.

Checkpoints are loaded from local files only and never in a way that runs code, whatever a flag or a config says:
``ckpt_path`` must be ``last``, ``best``, ``hpc`` or a local regular file (URLs, ``file://`` and FIFOs are refused
before anything is built), ``weights_only: false`` is refused, and the trainer loads every checkpoint with
``torch.load(weights_only=True)`` (:mod:`diffpir.checkpoints`). ``export`` and ``--model.init_from`` read through
:func:`diffpir.prior.load_prior`, which holds to the same rules.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from diffpir.checkpoints import check_ckpt_args, disable_remote_configs, guard_checkpoint_loading
from diffpir.training.data import ImageFolderDataModule
from diffpir.training.module import DiffusionModule


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

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        check_ckpt_args(config.get("ckpt_path"), config.get("weights_only"))  # before anything is read or built

    def _parse_ckpt_path(self) -> None:
        """Left out: LightningCLI would read ``hyper_parameters`` from the ``ckpt_path`` file into the config, so a
        file could choose which classes get imported and built (``model.net.class_path``) or set ``init_from``. The
        model comes from the config given on the command line; the checkpoint only brings weights and state."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = int(config.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs):
        return guard_checkpoint_loading(super().instantiate_trainer(**kwargs))


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs) -> DiffpirCLI:
    """The LightningCLI object (``run=False``: parse and instantiate only; then call ``cli.trainer.fit``)."""
    disable_remote_configs()  # no config or value is fetched from a URL
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
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
    print(f"wrote {path} ({human_size(path.stat().st_size)})")
    return path


def human_size(n: int) -> str:
    """``n`` bytes as ``"812 B"``, ``"33.1 kB"``, ``"12.4 MB"`` or ``"1.2 GB"`` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffpir-train``."""
    argv = list(sys.argv[1:] if args is None else args)
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
