"""``diffpir-train``: LightningCLI for fitting/validating priors, plus ``export`` (EMA weights -> prior file).

Usage::

    diffpir-train fit --config configs/train/digits.yaml
    diffpir-train fit --config configs/train/natural.yaml --ckpt_path last      # resume
    diffpir-train validate --config configs/train/digits.yaml --ckpt_path runs/digits/checkpoints/last.ckpt
    diffpir-train export --ckpt runs/digits/checkpoints/last.ckpt --out priors/digits.safetensors [--fp16]

``export`` is handled here; ``fit`` and ``validate`` go to :class:`lightning.pytorch.cli.LightningCLI` (its ``test``
and ``predict`` are left out: a prior has no test or predict step).

Checkpoints are loaded from local files only and never in a way that runs code, whatever a flag or a config says:
``ckpt_path`` must be ``last``, ``best``, ``hpc`` or a local regular file (URLs, ``file://`` and FIFOs are refused
before anything is built), ``weights_only: false`` is refused, and the trainer loads every checkpoint with
``torch.load(weights_only=True)`` (:mod:`diffpir.checkpoints`). ``export`` and ``--model.init_from`` read through
:func:`diffpir.priorfile.load_prior`, which holds to the same rules.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffpir.checkpoints import check_ckpt_args, disable_remote_configs, file_kind, guard_checkpoint_loading
from diffpir.cli.common import (
    install_stop_watchdog,
    progress_bars_wanted,
    quiet_console,
    report_error,
    set_child_processes,
    stop_gracefully_on_sigterm,
)
from diffpir.training.data import ImageFolderDataModule
from diffpir.training.module import DiffusionModule


def watch_launched_processes(trainer: Trainer) -> None:
    """Let the stop watchdog (:func:`diffpir.cli.common.install_stop_watchdog`) find the DDP processes that
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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` only: the module has no ``test_step`` or ``predict_step``, so Lightning's ``test``
        and ``predict`` could only fail (``export`` is handled before this parser)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)"
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        check_ckpt_args(config.get("ckpt_path"), config.get("weights_only"))  # before anything is read or built
        check_ckpt_path(config.get("ckpt_path"))  # a local file that is not a checkpoint: one line

    def _parse_ckpt_path(self) -> None:
        """Left out: LightningCLI would read ``hyper_parameters`` from the ``ckpt_path`` file into the config, so a
        file could choose which classes get imported and built (``model.net.class_path``) or set ``init_from``. The
        model comes from the config given on the command line; the checkpoint only brings weights and state."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = guard_checkpoint_loading(super().instantiate_trainer(**kwargs))
        watch_launched_processes(trainer)
        checkpoints_follow_logger(trainer)
        trainer.callbacks.append(BatchStarted())
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = int(config.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)

    def before_fit(self) -> None:
        refuse_to_overwrite(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        # SIGTERM: Lightning records it and stops between two steps (SIGTERMException), and a
        # ModelCheckpoint(save_on_exception) saves a whole step. The watchdog's exit-at-once handler would raise
        # SystemExit wherever the main thread is, e.g. half-way through the optimizer's update of the weights or
        # before the EMA's, and the checkpoint saved then would not be the state of any step.
        stop_gracefully_on_sigterm()

    def fit(self, **kwargs: Any) -> None:
        with remove_unused_run_folders(self.trainer):
            self.trainer.fit(**kwargs)

    def validate(self, **kwargs: Any) -> None:
        with remove_unused_run_folders(self.trainer):
            self.trainer.validate(**kwargs)


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` that is not a checkpoint file with one line, before anything is built (a text
    file otherwise ends in a traceback from deep inside ``torch.load``)."""
    if ckpt_path is None or str(ckpt_path) in LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r}: no such file (give a .ckpt, or 'last' to resume the run)")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol 2+: first byte 0x80)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} is not a checkpoint (a .ckpt written by diffpir-train fit): give one, "
            "or 'last' to resume the run of the config"
        )


def checkpoints_follow_logger(trainer: Trainer) -> None:
    """One run, one folder: a ``ModelCheckpoint`` without ``dirpath`` writes to ``<save_dir>/<name>/checkpoints`` of
    the run's logger (``runs/smoke/checkpoints`` for smoke.yaml), so ``--trainer.logger.init_args.name`` moves the
    checkpoints with the logs and ``--ckpt_path last`` finds the run's ``last.ckpt`` again. (Lightning's own default,
    ``version_N/checkpoints``, would start every run in a new folder where ``last`` is never found.)"""
    logger = trainer.logger
    save_dir = getattr(logger, "save_dir", None) if logger is not None else None
    if save_dir is None:
        return
    folder = Path(save_dir) / str(getattr(logger, "name", "") or "") / "checkpoints"
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None) is None:
            cb.dirpath = str(folder)


class BatchStarted(Callback):
    """Records whether the run got as far as a training or validation batch (for :func:`remove_unused_run_folders`)."""

    def __init__(self) -> None:
        self.started = False

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.started = True

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.started = True


# What a run writes into its new log folder before its first batch, besides the SummaryWriter's event file (named
# with the process id, see _remove_unused): LightningCLI's config.yaml, the logger's hparams.yaml.
_UNUSED_RUN_FILES = ("config.yaml", "hparams.yaml")


@contextmanager
def remove_unused_run_folders(trainer: Trainer) -> Iterator[None]:
    """A run that fails or is stopped before its first batch (a refused ``--ckpt_path``, a missing ``--data.val_dir``,
    Ctrl-C during set-up) leaves nothing new behind: the logger's version folder (``runs/<name>/version_N``) that it
    created is removed, with its checkpoint folder and the folders above them, when they hold nothing but what the
    run itself wrote before any batch (its own TensorBoard event file, config.yaml, hparams.yaml).

    Never a folder that existed before the run, nor one holding anything else, nor after a batch has started (its
    logs and checkpoints are kept). Only where the run's rank zero runs in this process (one device, or DDP
    launched as subprocesses): with ``ddp_spawn`` this process cannot tell whether a batch ran."""
    watch = next((cb for cb in trainer.callbacks if isinstance(cb, BatchStarted)), None)
    launcher = trainer.strategy.launcher
    if (
        watch is None
        or not trainer.is_global_zero
        or not (launcher is None or isinstance(launcher, _SubprocessScriptLauncher))
    ):
        yield
        return
    log_dirs = [Path(lg.log_dir) for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, CSVLogger))]
    ckpt_dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    new: list[Path] = []  # folders that do not exist yet, deepest first
    for folder in (*log_dirs, *ckpt_dirs):
        while not folder.exists() and folder not in new and folder.parent != folder:
            new.append(folder)
            folder = folder.parent
    new.sort(key=lambda f: len(f.parts), reverse=True)
    try:
        yield
    except BaseException:
        if not watch.started:
            _remove_unused(new, log_dirs)
        raise


def _remove_unused(folders: list[Path], log_dirs: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where empty, after removing, in the ``log_dirs`` among them, the files a run
    writes before its first batch. Anything else stays, and so does every folder above it."""
    own_events = re.compile(rf"^events\.out\.tfevents\..*\.{os.getpid()}\.\d+$")
    for folder in folders:
        try:
            if folder in log_dirs and not folder.is_symlink() and folder.is_dir():
                for f in folder.iterdir():
                    if f.is_file() and not f.is_symlink() and (f.name in _UNUSED_RUN_FILES or own_events.match(f.name)):
                        f.unlink()
            folder.rmdir()  # only an empty folder
        except OSError:
            continue


def refuse_to_overwrite(trainer: Trainer, ckpt_path: str | None) -> None:
    """A new ``fit`` (no ``--ckpt_path``) whose checkpoint folder already holds checkpoints would overwrite them
    (``last.ckpt`` first): refuse, saying how to resume or start a separate run."""
    if ckpt_path is not None:
        return
    for cb in trainer.checkpoint_callbacks:
        folder = Path(cb.dirpath) if getattr(cb, "dirpath", None) else None
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
        if found:
            raise ValueError(
                f"{folder} already holds the checkpoints of an earlier run ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}) that this run would overwrite: resume it with --ckpt_path last, "
                "or start a separate run with --trainer.logger.init_args.name NEW_NAME (or move the folder away)"
            )


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs) -> DiffpirCLI:
    """The LightningCLI object (``run=False``: parse and instantiate only; then call ``cli.trainer.fit``)."""
    disable_remote_configs()  # no config or value is fetched from a URL
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


def check_export_paths(ckpt: str, out: str) -> None:
    """Refuse an ``--out`` that would replace something other than an earlier export: the ``--ckpt`` file itself
    (the training checkpoint would be lost), a folder, or an existing file that is not a safetensors file (a
    checkpoint, an image, ...). An existing safetensors file is replaced (a new export of the same prior)."""
    out_path = Path(out)
    if not out_path.exists():  # nothing to replace (a link is resolved: atomic_output handles links)
        return
    if out_path.is_dir():
        raise ValueError(
            f"--out {out!r} is a folder: give the file to write, e.g. {str(out_path / 'prior.safetensors')!r}"
        )
    if os.path.exists(ckpt) and os.path.samefile(out_path, ckpt):
        other = out_path.with_suffix(".safetensors")
        hint = f", e.g. {str(other)!r}" if other.name != out_path.name else ""
        raise ValueError(
            f"--out {out!r} is the file being exported (--ckpt): it would be overwritten; write the prior to another "
            f"file{hint}"
        )
    kind = file_kind(out_path)
    if kind != "safetensors":
        raise ValueError(
            f"--out {out!r} already exists and is not a safetensors prior (its first bytes look like: {kind}): export "
            f"would overwrite it; choose another file name, or move that file away first"
        )


def export(ckpt: str, out: str, fp16: bool = False) -> Path:
    """Write the EMA weights of a training checkpoint (or any prior :func:`diffpir.priorfile.load_prior` reads) as
    a safetensors prior file; returns its path. ``out`` may replace an earlier safetensors export, never the
    checkpoint or another kind of file (:func:`check_export_paths`)."""
    from diffpir.priorfile import export_prior, load_prior

    check_export_paths(ckpt, out)
    prior = load_prior(ckpt)
    return export_prior(prior, None, out, dtype=torch.float16 if fp16 else None)


def export_main(argv: Sequence[str]) -> Path:
    parser = ArgumentParser(
        prog="diffpir-train export",
        description="Export the EMA weights of a training checkpoint as a prior file (safetensors).",
    )
    parser.add_argument(
        "--ckpt", type=str, required=True, help="Lightning checkpoint (.ckpt) written by diffpir-train fit"
    )
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="output path, e.g. priors/natural.safetensors (never the --ckpt file; an existing file only if it is an "
        "earlier safetensors export)",
    )
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
    quiet_console()
    if args is None:  # the console script's own process (and its DDP workers), not a caller's: see the docstring
        install_stop_watchdog()
    try:
        if argv and argv[0] == "export":
            export_main(argv[1:])
            return
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    except (ValueError, OSError, pickle.UnpicklingError) as err:  # bad files, refused checkpoints: one line
        report_error("diffpir-train", err)
    except SIGTERMException:  # Lightning's stop after SIGTERM (SystemExit without a status): 128 + 15 as before
        print("diffpir-train: stopped by SIGTERM between two training steps", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
