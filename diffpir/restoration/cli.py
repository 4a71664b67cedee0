"""``diffpir-restore``: the LightningCLI entry point for restoration (``predict`` only).

Usage::

    diffpir-restore predict --config configs/restore/deblur_gaussian.yaml
    diffpir-restore predict --config configs/restore/sr_x4.yaml --model.steps 20 --data.images my/photos
    diffpir-restore predict --config configs/restore/inpaint_box.yaml --trainer.devices 4   # DDP on 4 GPUs

Config sections: ``model`` (:class:`~diffpir.restoration.RestorationModule`), ``data``
(:class:`~diffpir.restoration.RestorationDataModule`), ``trainer``, ``writer``
(:class:`~diffpir.restoration.RestorationWriter`, always on) and ``trajectory``
(:class:`~diffpir.restoration.TrajectoryLogger`, always on; ``--trajectory.first_k 0`` turns it off).
The full config is saved as ``<writer.output_dir>/config.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diffpir.restoration.data import RestorationDataModule
from diffpir.restoration.module import RestorationModule
from diffpir.restoration.trajectory import TrajectoryLogger
from diffpir.restoration.writer import RestorationWriter

__all__ = ["RestoreCLI", "build_cli", "main"]

TRAINER_DEFAULTS: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}


class RestoreCLI(LightningCLI):
    """LightningCLI for :class:`RestorationModule` and :class:`RestorationDataModule` with the writer and the
    trajectory logger as configurable, always-present callbacks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RestorationWriter, "writer")
        parser.add_lightning_class_args(TrajectoryLogger, "trajectory")

    def predict(self, model, datamodule=None, return_predictions: bool | None = None, ckpt_path=None, **kwargs):
        """``Trainer.predict`` without keeping the predictions in memory (the writer stores them)."""
        self._save_config()
        return self.trainer.predict(
            model,
            datamodule=datamodule,
            return_predictions=bool(return_predictions),
            ckpt_path=ckpt_path,
            **kwargs,
        )

    @rank_zero_only
    def _save_config(self) -> None:
        out = Path(self.config[self.subcommand]["writer"]["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        parser = self._parser(self.subcommand)
        parser.save(self.config[self.subcommand], out / "config.yaml", overwrite=True)


def build_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> RestoreCLI:
    """The CLI object (``run=False``: parse and instantiate only, e.g. to test a config)."""
    kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS))
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


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``diffpir-restore`` (``python -m diffpir.restoration.cli``)."""
    build_cli(None if args is None else list(args))


if __name__ == "__main__":
    main()
