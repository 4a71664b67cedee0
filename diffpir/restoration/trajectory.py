"""TensorBoard trajectories of chosen images: how x_t, the prior's x0 and the data-corrected x0 evolve.

For each chosen image (by key, or the first ``first_k`` keys of the data set) and each sampler step ``i``:

- scalars (every step), on the [0, 1] scale, with step = ``i``:
  ``trajectory/<key>/psnr`` (of the data-corrected ``x0_hat``, uint8-quantised like the written PNG, so the
  last step's value is the PSNR of the restored image), ``trajectory/<key>/psnr_pred`` (of the prior's
  ``x0_pred``), ``trajectory/<key>/residual`` and ``trajectory/<key>/residual_pred`` (the data residual
  ``||y - H x0||_2`` of either), ``trajectory/<key>/t`` (the timestep);
- an image (every ``every``-th step and the last) ``trajectory/<key>/grid``: x_t | x0_pred | x0_hat;
- with a method that estimates the blur kernel (``blind_diffpir``), at the same steps ``trajectory/<key>/kernel``:
  the kernel estimate after the step (scaled to its maximum, 4x enlarged); the residuals then use that estimate.

PSNRs need the truth (benchmark mode, or real mode with ``truth``); residuals are always logged.

Each rank writes its own event file (``events.out.tfevents.*.rank<r>``) into ``log_dir``, so images restored on
any rank are logged; TensorBoard reads all the files of a folder together.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from diffpir.io import safe_output_name
from diffpir.operators import Blur
from diffpir.restoration.data import RestorationBatch
from diffpir.restoration.writer import RestorationWriter
from diffpir.sampler import StepState

__all__ = ["TrajectoryLogger"]


class TrajectoryLogger(Callback):
    """Logs sampler trajectories of chosen images to TensorBoard.

    Args:
        keys: image keys to follow (None: use ``first_k``).
        first_k: follow the first ``first_k`` images of the data set (by key) when ``keys`` is None; 0 disables.
        every: log the image grid every ``every``-th step (and at the last step).
        log_dir: event file folder; None: ``<writer output_dir>/tensorboard`` when a
            :class:`~diffpir.restoration.writer.RestorationWriter` is present, else ``trainer.log_dir``.
    """

    def __init__(
        self,
        keys: list[str] | None = None,
        first_k: int = 1,
        every: int = 10,
        log_dir: str | None = None,
    ):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if first_k < 0:
            raise ValueError(f"first_k must be >= 0, got {first_k}")
        self.keys = list(keys) if keys is not None else None
        self.first_k = first_k
        self.every = every
        self.log_dir = log_dir
        self._chosen: set[str] = set()
        self._writer = None
        self._rank = 0
        self._module: Any = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._rank = trainer.global_rank
        self._module = pl_module
        if self.keys is not None:
            self._chosen = set(self.keys)
            dm = trainer.datamodule
            unknown = sorted(self._chosen - set(dm.keys)) if dm is not None and hasattr(dm, "keys") else []
            if unknown:
                warnings.warn(
                    f"trajectory keys {unknown} are not among the images of this run (its keys: "
                    f"{', '.join(list(dm.keys)[:5])}{', ...' if len(dm.keys) > 5 else ''}): no trajectory is logged "
                    f"for them; check the spelling (keys are file names without suffix) or data.limit",
                    stacklevel=2,
                )
        elif self.first_k > 0:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "keys"):
                raise ValueError("TrajectoryLogger(first_k=...) needs a data module with .keys; pass keys instead")
            self._chosen = set(list(dm.keys)[: self.first_k])
        else:
            self._chosen = set()
        if self.log_dir is None:
            writer_dirs = [cb.output_dir for cb in trainer.callbacks if isinstance(cb, RestorationWriter)]
            # trainer.log_dir broadcasts: every rank computes it here, in setup.
            self.log_dir = str(Path(writer_dirs[0]) / "tensorboard") if writer_dirs else trainer.log_dir
        pl_module.add_step_hook(self.sampler_callback)

    @property
    def chosen(self) -> set[str]:
        """The keys whose trajectories are logged (after setup)."""
        return set(self._chosen)

    def _summary_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), filename_suffix=f".rank{self._rank}")
        return self._writer

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # -- the sampler hook -------------------------------------------------------------------------------------
    def sampler_callback(self, batch: RestorationBatch):
        """A per-step callback for the sampler on ``batch``, or None when no chosen image is in it (registered on
        the module in :meth:`setup`)."""
        idx = [i for i, k in enumerate(batch.keys) if k in self._chosen]
        if not idx or self._module is None:
            return None
        nfe = self._module.method.nfe
        every = self.every
        tags = {i: f"trajectory/{safe_output_name(batch.keys[i])}" for i in idx}
        sel = torch.tensor(idx, device=batch.y.device)
        y = batch.y.float()
        truth = batch.x

        def log(state: StepState) -> None:
            from diffpir.metrics import psnr

            tb = self._summary_writer()
            step = state.index
            x0_hat = ((state.x0_hat + 1) / 2).float()
            x0_pred = ((state.x0_pred + 1) / 2).float()
            kernel = getattr(state, "kernel", None)  # blind methods: the current kernel estimate
            op = batch.op if kernel is None else Blur(kernel.to(y.device, y.dtype), normalize=False)
            res_hat = _residual(op, y, x0_hat, sel)
            res_pred = _residual(op, y, x0_pred, sel)
            if truth is not None:
                p_hat = psnr(x0_hat[sel].clamp(0, 1), truth[sel])
                p_pred = psnr(x0_pred[sel].clamp(0, 1), truth[sel])
            for j, i in enumerate(idx):
                tag = tags[i]
                tb.add_scalar(f"{tag}/residual", float(res_hat[j]), step)
                tb.add_scalar(f"{tag}/residual_pred", float(res_pred[j]), step)
                tb.add_scalar(f"{tag}/t", float(state.t), step)
                if truth is not None:
                    tb.add_scalar(f"{tag}/psnr", float(p_hat[j]), step)
                    tb.add_scalar(f"{tag}/psnr_pred", float(p_pred[j]), step)
                if step % every == 0 or step == nfe - 1:
                    tb.add_image(f"{tag}/grid", _grid(state.x_t[i], x0_pred[i], x0_hat[i]), step)
                    if kernel is not None:
                        tb.add_image(f"{tag}/kernel", _kernel_image(kernel[i if kernel.shape[0] > 1 else 0]), step)

        return log


def _residual(op, y: Tensor, x: Tensor, sel: Tensor) -> Tensor:
    """``||y_i - H(x)_i||_2`` for the images at ``sel`` (H applied to the whole batch: per-image params)."""
    r = y - op(x)
    return r[sel].flatten(1).norm(dim=1)


def _kernel_image(k: Tensor) -> Tensor:
    """A kernel ``[kh, kw]`` as a ``[1, 4 kh, 4 kw]`` image in [0, 1] (scaled to its maximum)."""
    img = (k / k.amax().clamp_min(1e-12)).float().cpu()[None, None]
    return torch.nn.functional.interpolate(img, scale_factor=4, mode="nearest")[0].clamp(0, 1)


def _grid(x_t: Tensor, x0_pred: Tensor, x0_hat: Tensor) -> Tensor:
    """x_t (from [-1, 1]) | x0_pred | x0_hat, as one ``[3, H, 3W + pad]`` image in [0, 1]."""
    from torchvision.utils import make_grid

    panels = torch.stack([((x_t + 1) / 2).float(), x0_pred, x0_hat]).clamp(0, 1).cpu()
    return make_grid(panels, nrow=3, padding=2, pad_value=1.0)
