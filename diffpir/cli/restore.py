"""``diffpir-restore``: the LightningCLI entry point for restoration (``predict`` only).

Usage::

    diffpir-restore predict --config configs/restore/deblur_gaussian.yaml
    diffpir-restore predict --config configs/restore/sr_x4.yaml --model.method.steps 20 --data.images my/photos
    diffpir-restore predict --config configs/restore/inpaint_box.yaml --trainer.devices 4 --trainer.strategy ddp

Config sections: ``model`` (:class:`~diffpir.restoration.RestorationModule`), ``data``
(:class:`~diffpir.restoration.RestorationDataModule`), ``trainer``, ``writer``
(:class:`~diffpir.restoration.RestorationWriter`, always on) and ``trajectory``
(:class:`~diffpir.restoration.TrajectoryLogger`, always on; ``--trajectory.first_k 0`` turns it off).
The full config is saved as ``<writer.output_dir>/config.yaml``.

Restoration never loads a Lightning checkpoint: ``predict`` has no ``--ckpt_path`` or ``--weights_only`` (the prior
comes from ``--model.prior``, read by :func:`diffpir.priorfile.load_prior`), and the trainer's checkpoint loader is
guarded anyway (:func:`diffpir.checkpoints.guard_checkpoint_loading`).

Errors and exit status: a wrong option or config key is reported by jsonargparse (the key named, usage shown,
status 2). An error that stops the run before it restores anything (a prior file that is missing, refused
because it carries code, or does not fit; no images found; a degradation setting that concerns every image, checked
before the prior loads: a missing or unreadable kernel/mask file, an even ``kernel_size``, real-mode inpainting
without ``--data.degradation.mask``, ...) prints one line ``diffpir-restore: error: ...`` without a traceback (set
``DIFFPIR_DEBUG=1`` to get it) and exits with status 1. Images that cannot be restored
are reported one by one and skipped while the others are restored; the run then ends with
``restored N of M images; K failed: see <output_dir>/failed.json`` and exit status 1; the status is 1 too whenever
a requested image is missing at the end. An output folder holding restorations made with other settings is refused
before anything is written (status 1). SIGTERM stops the run before the next image (what is restored stays, nothing
partial is left): one line, status 143; the same command resumes.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffpir.checkpoints import disable_remote_configs, guard_checkpoint_loading
from diffpir.cli.common import (
    USER_ERRORS,
    install_stop_watchdog,
    progress_bars_wanted,
    quiet_console,
    report_error,
    stop_gracefully_on_sigterm,
)
from diffpir.priorfile import preset_hint
from diffpir.restoration.data import RestorationDataModule
from diffpir.restoration.module import RestorationModule, StopRequested
from diffpir.restoration.tasks import Degradation, check_run
from diffpir.restoration.trajectory import TrajectoryLogger
from diffpir.restoration.writer import RestorationWriter, write_text_atomic

__all__ = ["RestoreCLI", "build_cli", "main"]

"""Exceptions that :func:`main` reports as one line (bad files, refused checkpoints, wrong settings)."""

TRAINER_DEFAULTS: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}

KEPT_ON_SWITCH = frozenset({"steps"})
"""Settings that a config wrote for one method and that carry over to another method chosen with ``--model.method``:
the NFE budget means the same for every sampler. Every other shared name (``lambda_``: DiffPIR's weight is not DPIR's;
``eta``: DiffPIR's noise mix is not DDNM's) goes back to the new method's default."""

log = logging.getLogger("diffpir")


def _method_spec(value: Any) -> tuple[str | None, dict[str, Any]]:
    """``(class name, init_args)`` of a ``model.method`` value from a config file (a dict or a bare class path)."""
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1], {}
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return value["class_path"].rsplit(".", 1)[-1], dict(value.get("init_args") or {})
    return None, {}


def _cli_method_keys(argv: Sequence[str]) -> set[str]:
    """The method settings given on the command line (``--model.method.KEY [VALUE]`` or ``--model.method.KEY=V``)."""
    keys = set()
    for token in argv:
        for prefix in ("--model.method.init_args.", "--model.method."):
            if isinstance(token, str) and token.startswith(prefix):
                keys.add(token[len(prefix) :].split("=", 1)[0])
                break
    return keys


def reset_switched_method(config: Any, argv: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """After ``--model.method OTHER`` on top of a config written for another method, put the settings that the config
    wrote for the old method back to OTHER's defaults (jsonargparse keeps every shared name, so ``--model.method
    DPIR`` on a DiffPIR config would run DPIR with DiffPIR's ``lambda_`` 7 instead of its 0.23), except
    :data:`KEPT_ON_SWITCH` and what the command line sets. Changes ``config`` in place; returns ``{key: (config's
    value, new value or None when the key is dropped)}``."""
    method = config.get("model", {}).get("method") if hasattr(config, "get") else None
    if method is None or not getattr(method, "class_path", None):
        return {}
    old_name, old_args = None, {}
    for path in config.get("config") or []:
        text = path.get_content() if hasattr(path, "get_content") else Path(str(path)).read_text()
        data = yaml.safe_load(text) or {}
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and "method" in model:
            old_name, old_args = _method_spec(model["method"])
    new_name = method.class_path.rsplit(".", 1)[-1]
    if old_name is None or old_name == new_name or method.get("init_args") is None:
        return {}
    module, _, name = method.class_path.rpartition(".")  # jsonargparse has resolved it to an import path
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    given = _cli_method_keys(argv)
    changed: dict[str, tuple[Any, Any]] = {}
    init_args = method.init_args
    for key, value in old_args.items():
        if key in KEPT_ON_SWITCH or key in given or key not in init_args:
            continue
        param = params.get(key)
        if param is None:  # a class that takes it through **kwargs: without it, its own default applies
            del init_args[key]
            changed[key] = (value, None)
        elif param.default is not inspect.Parameter.empty and init_args[key] != param.default:
            init_args[key] = param.default
            changed[key] = (value, param.default)
    for key, (value, new) in changed.items():
        now = f"{new_name}'s default {new}" if new is not None else f"{new_name}'s default"
        log.info(
            "--model.method %s: %s set back to %s (the config's %r was for %s); --model.method.%s sets it",
            new_name,
            key,
            now,
            value,
            old_name,
            key,
        )
    return changed


class RestoreCLI(LightningCLI):
    """LightningCLI for :class:`RestorationModule` and :class:`RestorationDataModule` with the writer and the
    trajectory logger as configurable, always-present callbacks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # ckpt_path/weights_only are left out: restoration never loads a Lightning checkpoint (a flag or a config
        # could otherwise make Lightning fetch a URL and unpickle it).
        return {"predict": {"model", "dataloaders", "datamodule", "ckpt_path", "weights_only", "return_predictions"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RestorationWriter, "writer")
        parser.add_lightning_class_args(TrajectoryLogger, "trajectory")
        # without a config, DiffPIR with the sampler's defaults (so that --model.method.steps 20 alone works)
        parser.set_defaults({"model.method": {"class_path": "diffpir.methods.DiffPIRMethod"}})
        # the data's channels are the prior's (1 or 3), known once the module has loaded it
        parser.link_arguments("model", "data.channels", compute_fn=_prior_channels, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = (
            [] if isinstance(args, dict) or hasattr(args, "as_dict") else list(sys.argv[1:] if args is None else args)
        )
        if any(a == "--data.channels" or a.startswith("--data.channels=") for a in self._argv):
            raise ValueError(
                "--data.channels is not an option here: the images are read with the prior's channels (a grey "
                "prior reads colour images as grey); leave it out"
            )
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Check what concerns the whole run before anything (the prior first) is loaded: one error, naming the
        option, instead of one per image. A method chosen on the command line over a config written for another one
        gets its own defaults (:func:`reset_switched_method`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        reset_switched_method(config, getattr(self, "_argv", []))
        data = config.get("data") or {}
        spec = data.get("degradation")
        try:
            if spec is None:
                degradation = Degradation()
            else:
                degradation = Degradation(**(spec.as_dict() if hasattr(spec, "as_dict") else dict(spec)))
        except ValueError as err:
            raise ValueError(f"--data.degradation: {err}") from None
        check_run(degradation, data.get("mode", "benchmark"))
        out = (config.get("writer") or {}).get("output_dir")
        if out and Path(str(out)).exists() and not Path(str(out)).is_dir():
            raise ValueError(f"--writer.output_dir {str(out)!r} is a file, not a folder: choose a folder")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        from diffpir.cli.train import watch_launched_processes

        trainer = guard_checkpoint_loading(super().instantiate_trainer(**kwargs))
        watch_launched_processes(trainer)
        return trainer

    def predict(self, model, datamodule=None, **kwargs):
        """``Trainer.predict`` without keeping the predictions in memory (the writer stores them) and without a
        checkpoint. The output folder's settings are checked before ``config.yaml`` is written."""
        for cb in self.trainer.callbacks:
            if isinstance(cb, RestorationWriter):
                cb.check_settings(model, datamodule, write=rank_zero_only.rank == 0)
        stop_gracefully_on_sigterm()  # SIGTERM: stop before the next image (StopRequested), not in the middle
        self._save_config()
        return self.trainer.predict(model, datamodule=datamodule, return_predictions=False, ckpt_path=None)

    @rank_zero_only
    def _save_config(self) -> None:
        out = Path(self.config[self.subcommand]["writer"]["output_dir"])
        parser = self._parser(self.subcommand)
        write_text_atomic(out / "config.yaml", parser.dump(self.config[self.subcommand]))

    @property
    def failed(self) -> int:
        """Images the run could not restore (0 before a run)."""
        return sum(int(getattr(cb, "failed", 0)) for cb in self.trainer.callbacks if isinstance(cb, RestorationWriter))

    @property
    def missing(self) -> int:
        """Requested images neither restored nor failed at the end of the run (0 before a run)."""
        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, RestorationWriter)]
        return sum(int(getattr(cb, "missing", 0)) for cb in writers)


def _prior_channels(model: RestorationModule) -> int:
    return model.channels


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> RestoreCLI:
    """The CLI object (``run=False``: parse and instantiate only, e.g. to test a config)."""
    disable_remote_configs()  # no config or value is fetched from a URL
    kwargs.setdefault("trainer_defaults", {**TRAINER_DEFAULTS, "enable_progress_bar": progress_bars_wanted()})
    kwargs.setdefault("save_config_callback", None)
    kwargs.setdefault("seed_everything_default", False)
    kwargs.setdefault("auto_configure_optimizers", False)
    if not run:
        args = list(args or [])
        if args and args[0] == "predict":
            args = args[1:]
    return RestoreCLI(
        RestorationModule,
        RestorationDataModule,
        args=None if args is None else list(args),
        run=run,
        **kwargs,
    )


def _log_to_stderr() -> None:
    """Show the ``diffpir`` loggers' INFO lines (skipped images, the final count) on stderr."""
    logger = logging.getLogger("diffpir")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffpir-restore`` (``python -m diffpir.cli.restore``).

    Exits with status 1 when images could not be restored (see ``failed.json``) or are missing, or when the run could
    not start (one-line message, see the module docstring); 2 for a wrong option or config key; 143 after SIGTERM."""
    _log_to_stderr()
    quiet_console()
    if args is None:  # the console script's own process (and its DDP workers), not a caller's: see the docstring
        install_stop_watchdog()
    try:
        cli = build_cli(None if args is None else list(args))
    except StopRequested:
        print(
            "diffpir-restore: stopped by SIGTERM before the next image: what was restored is kept, nothing partial is "
            "left; run the same command again to restore the rest",
            file=sys.stderr,
        )
        raise SystemExit(143) from None
    except USER_ERRORS as err:
        if "preset=" in str(err):  # load_prior's hint in the command line's words
            err = ValueError(preset_hint(str(err), "--model.preset"))
        report_error("diffpir-restore", err)
        return
    if cli.subcommand == "predict" and (cli.failed or cli.missing):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
