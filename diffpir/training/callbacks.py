"""Callbacks of the training runs: a grid of DDIM samples of the (EMA) prior, logged after validation; progress
lines; a ModelCheckpoint that also saves the final step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffpir.schedule import NoiseSchedule

log = logging.getLogger(__name__)


@torch.no_grad()
def ddim_sample(
    net,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int, int],
    steps: int = 25,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Unconditional DDIM sampling (Song et al. 2021) with an eps-network; returns images in [0, 1].

    Timesteps: ``schedule.timesteps(steps, "uniform")`` (999, ..., 0). At each step ``t -> s``:

    1. ``x0 = clip((x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), -1, 1)`` and ``eps`` recomputed from the clipped x0;
    2. ``sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)``;
    3. ``x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z``.

    The last step returns its x0. Noise comes from ``generator`` (on its own device; CPU by default).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(shape, generator=generator, device=gen_device).to(device)
    ts = schedule.timesteps(steps, "uniform")
    ab = schedule.host("alphas_cumprod")
    c = shape[1]
    x0 = x
    for i, t in enumerate(ts):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        # 1. x0 and eps.
        eps = net(x, tt)[:, :c].float()
        x0 = schedule.x0_from_eps(x, tt, eps).clamp(-1.0, 1.0)
        if i == len(ts) - 1:
            break
        eps = schedule.eps_from_x0(x, tt, x0)
        # 2.-3. Move to the next timestep.
        a_t, a_s = float(ab[t]), float(ab[ts[i + 1]])
        sigma = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator, device=gen_device).to(device)
    return (x0 + 1.0) / 2.0


class SampleGridCallback(Callback):
    """After validation, draw ``num_samples`` DDIM samples from the prior's EMA weights (rank zero only) and log
    them as one grid: ``add_image("val/samples", grid, global_step)`` on every logger that has ``add_image``
    (TensorBoard), and as ``<log_dir>/samples/step{global_step:07d}.png`` when ``save_png``.

    The noise comes from a CPU generator seeded by ``seed``: the same starting noise every time, so the grids
    show how the prior evolves.

    Args:
        num_samples: images in the grid.
        steps: DDIM steps (25 by default; eta 0 = deterministic).
        eta: DDIM stochasticity.
        seed: seed of the sampling noise.
        every_n_validations: sample after every n-th validation run (the last one of a fit always samples).
        image_size: sample size (default: the datamodule's ``crop_size``, else the net's ``image_size``).
        save_png: also write the grid as a PNG next to the logs.
    """

    def __init__(
        self,
        num_samples: int = 16,
        steps: int = 25,
        eta: float = 0.0,
        seed: int = 0,
        every_n_validations: int = 1,
        image_size: int | None = None,
        save_png: bool = True,
    ):
        super().__init__()
        self.num_samples = num_samples
        self.steps = steps
        self.eta = eta
        self.seed = seed
        self.every_n_validations = max(1, every_n_validations)
        self._validations = 0
        self.image_size = image_size
        self.save_png = save_png
        self.last_grid: Tensor | None = None
        self._log_dir: str | None = None

    def _size(self, trainer: Trainer, pl_module: LightningModule) -> int:
        if self.image_size:
            return self.image_size
        size = getattr(trainer.datamodule, "crop_size", None) if trainer.datamodule is not None else None
        if size is None:
            size = (getattr(pl_module.net, "config", None) or {}).get("image_size", 32)
        return int(size)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts the logger's folder): every rank asks
        # here, never on rank zero alone, or the other ranks would wait for it forever.
        self._log_dir = trainer.log_dir if self.save_png else None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Decided identically on every rank; only the sampling and the writing below are rank zero's, and they
        # involve no collective (no log_dir, barrier, broadcast or self.log).
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations and not trainer.fit_loop.done:
            return
        if not trainer.is_global_zero:
            return
        size = self._size(trainer, pl_module)
        shape = (self.num_samples, pl_module.channels, size, size)
        gen = torch.Generator().manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                images = ddim_sample(
                    pl_module.eval_prior,
                    pl_module.schedule,
                    shape,
                    self.steps,
                    self.eta,
                    gen,
                    pl_module.device,
                )
        finally:
            pl_module.train(was_training)
        grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=max(1, round(self.num_samples**0.5)), padding=2)
        self.last_grid = grid
        step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/samples", grid, step)
        if self.save_png and self._log_dir is not None:
            path = Path(self._log_dir) / "samples" / f"step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)


class ProgressLogCallback(Callback):
    """One log line every ``every_n_steps`` optimizer steps (rank zero): step, epoch, ``train/loss``, images per
    second and learning rate. Meant for background runs with the progress bar off (a readable log file)."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = max(1, every_n_steps)
        self._t0: float | None = None
        self._step0 = 0
        self._images = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += int(images.shape[0]) * trainer.world_size
        if self._t0 is None:  # the first step (start-up, warm-up) is not timed
            self._t0, self._step0, self._images = time.monotonic(), trainer.global_step, 0
            return
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero:
            return
        elapsed = time.monotonic() - self._t0
        loss = trainer.callback_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        rank_zero_info(
            f"step {step} epoch {trainer.current_epoch} loss {float(loss) if loss is not None else float('nan'):.4f}"
            f" lr {lr:.3g} {self._images / max(elapsed, 1e-9):.1f} img/s"
        )
        self._t0, self._step0, self._images = time.monotonic(), step, 0


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (same arguments) that also saves
    ``last.ckpt`` when training ends at a step it has not saved yet, and whose save on a stop (``save_on_exception``:
    Ctrl-C, SIGTERM, an error) rewrites ``last.ckpt`` only.

    Lightning's own saves ``last`` at the end of training only if it never saved ``last`` during the run, so with
    ``train_time_interval`` a run that reaches ``max_steps`` keeps the checkpoint of up to one interval earlier and
    loses the steps since (for a cooldown, the end of its decay). And on an exception it writes the same state
    twice: to ``last.ckpt`` and to a step-numbered ``epoch=E-step=S.ckpt`` that no ``save_top_k`` bookkeeping ever
    removes, so a run stopped and resumed (``--ckpt_path last``) over many sittings piled up one full checkpoint per
    stop. With ``save_last: true`` only ``last.ckpt`` is written; without ``save_last`` (nothing else to write to)
    and with ``save_last: link`` (``last`` is a link to that file) the step-numbered file stays, as in Lightning.

    With ``save_on_exception``, a SIGTERM received during the last batch of an epoch stops the run at the end of that
    batch (``SIGTERMException``, as Lightning does after the other batches) rather than after the end of the epoch,
    where Lightning's stop saves a state it does not restore right (the resumed run cuts its next epoch short)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.save_on_exception and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # rank zero decides (as in Lightning's own check under DDP); every rank gets here at the same batch
            if trainer.strategy.broadcast(bool(trainer.received_sigterm), src=0):
                raise SIGTERMException
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.save_last is not True or not self._should_save_on_exception(trainer):
            super().on_exception(trainer, pl_module, exception)
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"{type(exception).__name__} at step {trainer.global_step}: saved {self.last_model_path}")


__all__ = ["ModelCheckpoint", "ProgressLogCallback", "SampleGridCallback", "ddim_sample"]
