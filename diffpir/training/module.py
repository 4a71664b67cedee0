"""The LightningModule that trains an eps-prediction diffusion prior (DDPM's simple loss) with EMA weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffpir.checkpoints import safe_torch_load
from diffpir.models import PRESETS, UNet, build_unet
from diffpir.prior import Prior, eps_denoise
from diffpir.priorfile import check_unet_config, load_prior, preset_hint, prior_payload, schedule_to_dict
from diffpir.schedule import NoiseSchedule
from diffpir.seeding import mix_seed
from diffpir.training.ema import EMA

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int | None = None, cooldown: int = 0) -> float:
    """LR multiplier of optimizer step ``step`` (0-based), warm-up, stable, decay (Hägele et al. 2024):

    - rises linearly from ``1 / warmup`` to 1 over the first ``warmup`` steps (0: no warm-up);
    - stays at 1;
    - with ``cooldown > 0``, falls linearly to 0 over the last ``cooldown`` of ``total`` steps:
      ``(total - step) / cooldown`` once that is below 1 (step ``total - 1`` gets ``1 / cooldown``).
    """
    factor = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
    if cooldown > 0:
        if total is None:
            raise ValueError("a cooldown needs the run's total number of steps")
        factor *= min(1.0, max(0.0, (total - step) / cooldown))
    return factor


def _preset_of(config: dict[str, Any] | None) -> str | None:
    """The name of the UNet preset whose config is ``config`` (None when none is)."""
    if not config:
        return None
    for name in PRESETS:
        try:
            with torch.device("meta"):  # the full config (defaults filled in), without memory or init time
                if build_unet(name).config == dict(config):
                    return name
        except (KeyError, ValueError, TypeError):
            continue
    return None


def _describe_schedule(schedule: NoiseSchedule) -> str:
    """``"linear, T=1000, betas 0.0001-0.02"`` (or ``"non-linear, T=..."``) for error messages."""
    d = schedule_to_dict(schedule)
    if d["kind"] == "linear":
        return f"linear, T={d['T']}, betas {d['beta_start']:g}-{d['beta_end']:g}"
    return f"non-linear, T={schedule.T}"


def _same_schedule(a: NoiseSchedule, b: NoiseSchedule) -> bool:
    return a.T == b.T and bool(np.allclose(a.host("betas"), b.host("betas"), rtol=1e-9, atol=1e-12))


Prediction = Literal["eps", "v"]
LossWeighting = Literal["none", "min_snr"]
TimestepSampling = Literal["uniform", "quad", "lognormal"]
TIMESTEP_SAMPLINGS = ("uniform", "quad", "lognormal")
# EDM's training distribution of the noise level (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2).
LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2, 1.2


def sample_timesteps(
    n: int,
    T: int,
    generator: torch.Generator,
    kind: TimestepSampling = "uniform",
    mix: float = 0.5,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """Training timesteps ``t`` [N] (int64, on the generator's device).

    ``"uniform"``: ``t ~ U{0, ..., T-1}`` (DDPM). With probability ``mix`` a draw from another density instead,
    else uniform (the uniform share keeps the high-noise steps that sampling from pure noise needs; ``mix = 1``
    uses the other density alone):

    - ``"quad"``: ``t = floor(T u^2)`` (``u ~ U[0, 1)``: density proportional to ``1 / sqrt(t)``, the density of
      DiffPIR's ``skip="quad"`` step sequence, which spends most restoration steps at low noise);
    - ``"lognormal"``: EDM's noise levels (Karras et al. 2022): ``ln sigma ~ N(-1.2, 1.2^2)`` on the scale of
      ``x_t / sqrt(ab_t) = x0 + sigma_t eps``, i.e. the schedule's ``sigma_bar_t = sqrt((1 - ab_t) / ab_t)``,
      taken to the timestep whose ``sigma_bar`` is nearest (:meth:`~diffpir.schedule.NoiseSchedule.
      timestep_for_sigma`; levels beyond the schedule's ends go to ``t = 0`` or ``T - 1``). Needs the
      ``schedule``. About 95 % of the draws fall in ``sigma`` 0.03-3.2 (for the linear schedule, ``t`` 5-484).

    All draws are always made (one generator stream whatever ``mix`` is).
    """
    dev = generator.device
    uniform = torch.randint(0, T, (n,), generator=generator, device=dev)
    if kind == "uniform":
        return uniform
    if kind == "quad":
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        other = (T * u * u).long().clamp_(0, T - 1)
    elif kind == "lognormal":
        if schedule is None or schedule.T != T:
            raise ValueError(f"timestep_sampling='lognormal' needs the schedule (of {T} steps)")
        z = torch.randn(n, generator=generator, device=dev, dtype=torch.float64)
        other = schedule.timestep_for_sigma(torch.exp(LOGNORMAL_MEAN + LOGNORMAL_STD * z)).to(dev)
    else:
        raise ValueError(f"timestep_sampling must be one of {', '.join(map(repr, TIMESTEP_SAMPLINGS))}, got {kind!r}")
    pick = torch.rand(n, generator=generator, device=dev) < mix
    return torch.where(pick, other, uniform)


def loss_weights(snr: Tensor, prediction: Prediction, weighting: LossWeighting, gamma: float) -> Tensor:
    """Per-image weights of the squared error of the net's target.

    ``"none"``: 1 (DDPM's simple loss on whatever the net predicts). ``"min_snr"`` (Hang et al. 2023,
    Min-SNR-gamma): the x0-space weight ``min(SNR, gamma)`` expressed in the net's target, i.e.
    ``min(SNR, gamma) / SNR`` for eps and ``min(SNR, gamma) / (SNR + 1)`` for v.
    """
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {weighting!r}")
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1.0)


class DiffusionModule(LightningModule):
    """Trains ``net`` to predict the noise of the DDPM forward process (Ho et al. 2020, the "simple" loss).

    Loss: for images ``x0`` (the loader's [0, 1] batch mapped to [-1, 1]), ``t ~ U{0, ..., T-1}`` and
    ``eps ~ N(0, I)``: ``mean ||eps - net(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t)[:, :C]||^2``.

    learn_sigma nets (``out_channels == 2 C``, e.g. the official guided-diffusion checkpoints used through
    ``init_from``): only the first C output channels (eps) enter the loss; the variance channels get no loss
    term. Their output rows of the last conv receive exactly zero gradient, so with the default
    ``weight_decay=0`` AdamW leaves those rows bit-for-bit unchanged (the variance output still drifts a little,
    as the shared trunk is trained). DiffPIR uses eps only; sampling with learned variances after fine-tuning
    is not supported.

    Randomness: the ``t`` and noise of training step ``s`` are drawn from a generator seeded by
    ``(seed, s, micro-batch, rank)``, and the data order and crops are seeded per epoch, with the position in
    the epoch saved in checkpoints (see :mod:`diffpir.training.data`), so a resumed run repeats an
    uninterrupted run exactly (on the same hardware), also from a mid-epoch checkpoint.

    Validation (EMA weights when EMA is on; fixed seeds, so epochs compare):

    - ``val/loss``: the same loss, with ``t`` stratified over ``val_buckets`` equal buckets, and
      ``val/loss_t{lo}-{hi}`` per bucket (``hi`` inclusive);
    - ``val/psnr_sigma{s}``: PSNR (dB, images in [0, 1] = 0-255 PSNR) of the one-step denoiser at noise std
      ``s`` on the 0-255 scale, ``x0 = D(x + s/255 n)`` (:func:`~diffpir.prior.eps_denoise` of the EMA prior).

    Args:
        net: the eps-network, ``net(x [N, C, H, W] in [-1, 1], t [N] int64) -> [N, C or 2C, H, W]``; with a
            ``config`` dict (diffpir's :class:`~diffpir.models.UNet`) checkpoints also carry an exportable prior.
        lr: AdamW peak learning rate, reached after ``warmup_steps`` (linear warm-up, stepped per step).
        weight_decay: AdamW's decoupled weight decay.
        adam_betas: AdamW betas.
        warmup_steps: linear LR warm-up length in optimizer steps (0: none).
        cooldown_steps: linear LR decay to 0 over the last this many steps of the run (``trainer.max_steps``; 0:
            none; :func:`lr_factor`). The schedule (``lr`` included) follows the current settings on resume, so a
            run trained at a constant LR can be resumed with a larger ``max_steps`` and a cooldown that ends there.
        ema_decay: EMA decay (None: no EMA; validation and export then use the raw weights).
        ema_warmup: warm-up-aware EMA decay ``min(decay, (1 + n) / (10 + n))``.
        num_timesteps, beta_start, beta_end: the linear DDPM schedule.
        seed: seed of the training noise and of the validation noise.
        compile: ``torch.compile`` the network's training forward (CUDA only; ignored on CPU).
        init_from: a prior to start from (any path or name :func:`diffpir.priorfile.load_prior` accepts, e.g. an
            official guided-diffusion ``.pt`` with ``init_preset``); loaded at the start of ``fit`` (on every rank,
            before the first step and the sanity check) or of ``validate``, unless the weights come from a checkpoint
            (a resumed fit, ``validate --ckpt_path``, :meth:`from_checkpoint`): a resume does not read it again, so
            the file may have moved since. Its prediction and noise schedule must be this run's (else ValueError).
        init_preset: the UNet preset of ``init_from`` when the file does not say (official ``.pt`` files).
        val_sigmas: noise levels (0-255 scale) of the one-step denoising PSNR.
        val_buckets: number of timestep buckets of the validation loss.
        prediction: the net's target, ``"eps"`` (DDPM) or ``"v"`` (Salimans & Ho 2022). A v-net is exported with
            ``"prediction": "v"`` and :class:`~diffpir.prior.Prior` turns its output into eps, so a v-prior is
            an eps-model to every sampler.
        loss_weighting: ``"none"`` (the simple loss) or ``"min_snr"`` (Min-SNR-gamma, Hang et al. 2023).
        min_snr_gamma: gamma of ``"min_snr"``.
        timestep_sampling: ``"uniform"``, ``"quad"`` or ``"lognormal"`` (EDM's noise levels; see
            :func:`sample_timesteps`).
        timestep_mix: share of the ``"quad"`` / ``"lognormal"`` draws (the rest uniform).

    The validation loss is always the eps-MSE (whatever the recipe), so runs of different recipes compare.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        cooldown_steps: int = 0,
        ema_decay: float | None = 0.999,
        ema_warmup: bool = True,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        seed: int = 0,
        compile: bool = False,
        init_from: str | None = None,
        init_preset: str | None = None,
        val_sigmas: Sequence[float] = (15.0, 25.0, 50.0),
        val_buckets: int = 10,
        prediction: Prediction = "eps",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        timestep_sampling: TimestepSampling = "uniform",
        timestep_mix: float = 0.5,
    ):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            known = ", ".join(map(repr, TIMESTEP_SAMPLINGS))
            raise ValueError(f"timestep_sampling must be one of {known}, got {timestep_sampling!r}")
        if warmup_steps < 0 or cooldown_steps < 0:
            raise ValueError(f"warmup_steps and cooldown_steps must be >= 0, got {warmup_steps}, {cooldown_steps}")
        if not 0.0 <= timestep_mix <= 1.0 or min_snr_gamma <= 0:
            raise ValueError("timestep_mix must lie in [0, 1] and min_snr_gamma must be > 0")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.schedule = NoiseSchedule.linear(num_timesteps, beta_start, beta_end)
        self.ema = EMA(net, ema_decay, ema_warmup) if ema_decay is not None else None
        self._compiled: Callable | None = None
        self._gen: torch.Generator | None = None
        self._weights_set = False  # the net holds init_from's weights or a checkpoint's (see _init_weights_once)
        self.val_sigmas = [float(s) for s in val_sigmas]
        T = num_timesteps
        self.bucket_edges = [(k * T // val_buckets, (k + 1) * T // val_buckets - 1) for k in range(val_buckets)]
        self.val_bucket_loss = nn.ModuleList([MeanMetric() for _ in self.bucket_edges])
        self.val_psnr = nn.ModuleList([MeanMetric() for _ in self.val_sigmas])

    # -- helpers ------------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Image channels C (the net's ``in_channels`` when it says, else its first conv's)."""
        config = getattr(self.net, "config", None)
        if config and "in_channels" in config:
            return int(config["in_channels"])
        return int(next(m for m in self.net.modules() if isinstance(m, nn.Conv2d)).in_channels)

    @property
    def eval_net(self) -> nn.Module:
        """The weights used for validation, samples and export: the EMA copy if any, else the raw net."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def eval_prior(self) -> nn.Module:
        """The eval weights as an eps-model (:class:`~diffpir.prior.Prior`; converts v-predictions), for
        samples and validation."""
        prediction = self.hparams.get("prediction", "eps")
        try:
            return Prior(self.eval_net, self.schedule, prediction=prediction)
        except AttributeError:  # a plain eps-net without the UNet attributes Prior reads
            if prediction != "eps":
                raise
            return self.eval_net

    def prior_spec(self) -> dict[str, Any] | None:
        """``{"format", "unet", "schedule"[, "prediction"]}`` of the contract (docs/CONTRACTS.md), no weights
        (:func:`~diffpir.priorfile.prior_payload`); None for a network without a UNet ``config``."""
        if getattr(self.net, "config", None) is None:
            return None
        return prior_payload(self.net, self.schedule, self.hparams.get("prediction", "eps"))

    def _forward_train(self, x: Tensor, t: Tensor) -> Tensor:
        # Not `self._compiled or self.net`: truth-testing a compiled module calls len() on it, a TypeError.
        return (self.net if self._compiled is None else self._compiled)(x, t)

    @staticmethod
    def _images(batch: Any) -> Tensor:
        """The image tensor of a batch (a tensor, or the first entry of a tuple/list, or ``batch["image"]``)."""
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch["image"]
        return batch

    def _train_generator(self, batch_idx: int) -> torch.Generator:
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device)
        # Seeded by the optimizer step (and the micro-batch within gradient accumulation), not by batch_idx:
        # Lightning may renumber batches on resume.
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = batch_idx % accumulate
        return self._gen.manual_seed(mix_seed(self.hparams.seed, 3, self.global_step, micro, self.global_rank))

    # -- the shared step ----------------------------------------------------------------------------------------
    def model_step(
        self, batch: Any, generator: torch.Generator, stratify: int = 0, offset: int = 0
    ) -> dict[str, Tensor]:
        """The training loss of a batch of [0, 1] images (the recipe's; in eval mode the plain eps-MSE).

        :param generator: draws ``t`` and the noise (on its own device; results are moved to the batch's).
        :param stratify: if > 0, ``t`` of image ``i`` is drawn from bucket ``(i + offset) % stratify`` of that
            many equal buckets (lower-variance per-bucket estimates for validation); else ``t ~ U{0..T-1}``.
        :return: ``{"loss": scalar, "per_image": [N] loss of each image, "t": [N]}``.
        """
        hp = self.hparams
        prediction = hp.get("prediction", "eps")
        x0 = self._images(batch) * 2.0 - 1.0
        n, T, dev = x0.shape[0], self.schedule.T, generator.device
        if stratify:
            b = (torch.arange(n, device=dev) + offset) % stratify
            lo, hi = b * T // stratify, (b + 1) * T // stratify
            t = lo + (torch.rand(n, generator=generator, device=dev) * (hi - lo)).long().clamp_max(hi - lo - 1)
        elif self.training:
            kind, mix = hp.get("timestep_sampling", "uniform"), hp.get("timestep_mix", 0.5)
            t = sample_timesteps(n, T, generator, kind, mix, self.schedule)
        else:
            t = torch.randint(0, T, (n,), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        if not self.training:  # validation: the eps-MSE of the eps-model, comparable across recipes
            eps = self.eval_prior(x_t, t)[:, : x0.shape[1]]
            per_image = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
            return {"loss": per_image.mean(), "per_image": per_image, "t": t}
        out = self._forward_train(x_t, t)[:, : x0.shape[1]].float()
        if prediction == "v":
            a = self.schedule.extract("sqrt_alphas_cumprod", t, x0).float()
            b = self.schedule.extract("sqrt_one_minus_alphas_cumprod", t, x0).float()
            target = a * noise.float() - b * x0.float()
        else:
            target = noise.float()
        per_image = (out - target).pow(2).flatten(1).mean(1)
        weighting = hp.get("loss_weighting", "none")
        if weighting != "none":
            ab = self.schedule.extract("alphas_cumprod", t, x0).flatten().double()
            w = loss_weights(ab / (1.0 - ab), prediction, weighting, float(hp.get("min_snr_gamma", 5.0)))
            per_image = per_image * w.to(per_image.dtype)
        return {"loss": per_image.mean(), "per_image": per_image, "t": t}

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.model_step(batch, self._train_generator(batch_idx))
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=out["t"].shape[0])
        return out["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # One EMA update right after each optimizer step (so before any checkpoint callback of this batch).
        if self.ema is not None:
            self.ema.update(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )
        warmup, cooldown = int(hp.warmup_steps), int(hp.get("cooldown_steps", 0))
        total = self._total_steps() if cooldown > 0 else None

        # A function, not an object: LambdaLR saves (and a resume restores) the attributes of a callable object,
        # which would bring back the checkpoint's total and cooldown instead of this run's.
        def factor(step: int) -> float:
            return lr_factor(step, warmup, total, cooldown)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _total_steps(self) -> int:
        """The run's optimizer steps: the Trainer's ``estimated_stepping_batches`` (``max_steps``, or the
        epochs' steps when ``max_epochs`` ends the run first)."""
        trainer = self._trainer
        estimate = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if not (math.isfinite(estimate) and estimate > 0):
            raise ValueError(
                "model.cooldown_steps needs a run of known length (the LR reaches 0 at its end): set trainer.max_steps"
                f" or a finite trainer.max_epochs (got max_steps={getattr(trainer, 'max_steps', None)}, "
                f"max_epochs={getattr(trainer, 'max_epochs', None)})"
            )
        return int(estimate)

    def on_train_start(self) -> None:
        # A resume restores the optimizer's LR and the scheduler's base LR from the checkpoint, and LambdaLR only
        # recomputes the LR at its next step: set this step's LR from the current settings (lr, warm-up, cooldown,
        # max_steps) now. With unchanged settings this is the value the checkpoint holds.
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                continue
            sched.base_lrs = [float(self.hparams.lr)] * len(sched.optimizer.param_groups)
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["initial_lr"] = base
                group["lr"] = base * fn(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def setup(self, stage: str) -> None:
        self._check_data()
        if stage == "fit" and self._trainer is None:  # called by hand, outside a Trainer: nothing will be restored
            self._init_weights_once()
        if self.hparams.compile and self._compiled is None:
            device = self._trainer.strategy.root_device if self._trainer is not None else self.device
            if device.type == "cuda":
                self.enable_compile()
            else:
                log.info("compile=True ignored on %s (torch.compile is used on CUDA only)", device.type)

    def on_fit_start(self) -> None:
        # Not in setup(): Lightning restores a checkpoint (and sets trainer.ckpt_path) after setup() and before this
        # hook, on every rank. (Strategies that restore after this hook, such as FSDP, still load init_from here;
        # the checkpoint's weights then replace it.)
        self._init_weights_once()

    def on_validation_start(self) -> None:
        self._init_weights_once()  # `validate` without a checkpoint; a no-op within a fit (done at its start)

    def _init_weights_once(self) -> None:
        """Load ``init_from`` into the net, unless the net already holds its weights or those of a checkpoint."""
        if not self.hparams.init_from or self._weights_set:
            return
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        if ckpt_path:  # restored (on_load_checkpoint normally says so first)
            log.info("weights from %s: init_from is not loaded", ckpt_path)
        else:
            self.load_init_weights(self.hparams.init_from, self.hparams.init_preset)
        self._weights_set = True

    def enable_compile(self) -> None:
        """Run the training forward through ``torch.compile(net)``. The compiled wrapper is kept out of the
        module tree, so the checkpoint keys stay those of the plain network (validation runs uncompiled)."""
        object.__setattr__(self, "_compiled", torch.compile(self.net))

    def _check_data(self) -> None:
        dm = getattr(self._trainer, "datamodule", None)
        channels = getattr(dm, "channels", None)
        if channels is not None and int(channels) != self.channels:
            raise ValueError(
                f"the data has {channels} channel(s) but the network takes {self.channels}: set data.channels "
                f"to {self.channels} or pick a network preset with in_channels={channels}"
            )
        crop, multiple = getattr(dm, "crop_size", None), getattr(self.net, "size_multiple", 1)
        if crop is not None and crop % multiple:
            raise ValueError(f"data.crop_size={crop} must be a multiple of the network's size_multiple={multiple}")

    @torch.no_grad()
    def load_init_weights(self, source: str, preset: str | None = None) -> None:
        """Load the weights of a prior (path or name, see :func:`diffpir.priorfile.load_prior`) into the net (and
        restart the EMA there). The prior's UNet must have the same architecture as ``net``, and it must predict
        what this module trains (``prediction``) under the same noise schedule.

        :raises ValueError: another architecture, prediction or schedule (the message names the flag to pass).
        """
        try:
            prior = load_prior(source, preset=preset, map_location="cpu")
        except ValueError as err:
            raise ValueError(preset_hint(str(err), "--model.init_preset")) from None
        self._check_init_prior(source, prior)
        src = getattr(prior, "net", prior)
        state = src.state_dict()
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            config = getattr(src, "config", None)
            name = preset or _preset_of(config)
            fix = (
                f"--model.net.init_args.preset_or_config {name}"
                if name
                else "--model.net.init_args.preset_or_config with the prior's UNet config"
            )
            raise ValueError(
                f"init_from={source!r} does not fit the training network (a different architecture"
                f"{f': the prior is a {name!r} UNet' if name else ''}): train that network with {fix}"
            ) from err
        if self.ema is not None:
            self.ema.copy_from(self.net)
        rank_zero_info(f"initialised the network from {source}")

    def _check_init_prior(self, source: str, prior: Prior) -> None:
        """Refuse an ``init_from`` prior trained for another target or noise schedule than this run's (its weights
        would load, and the run would silently start by unlearning them)."""
        mine, theirs = self.hparams.get("prediction", "eps"), getattr(prior, "prediction", "eps")
        if theirs != mine:
            raise ValueError(
                f"init_from={source!r} is a {theirs}-prediction prior and this run trains {mine}-prediction: pass "
                f"--model.prediction {theirs} to fine-tune it (or start from an {mine}-prediction prior)"
            )
        schedule = getattr(prior, "schedule", None)
        if schedule is None or _same_schedule(schedule, self.schedule):
            return
        d = schedule_to_dict(schedule)
        fix = (
            f"pass --model.num_timesteps {d['T']} --model.beta_start {d['beta_start']:g} --model.beta_end "
            f"{d['beta_end']:g}"
            if d["kind"] == "linear"
            else "diffpir-train trains linear schedules only: start from a prior of a linear schedule"
        )
        raise ValueError(
            f"init_from={source!r} was trained with another noise schedule ({_describe_schedule(schedule)}) than "
            f"this run's ({_describe_schedule(self.schedule)}): {fix}"
        )

    # -- validation ---------------------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        n = x.shape[0]
        # Validation noise comes from CPU generators with fixed seeds: identical across epochs and devices.
        gen = torch.Generator().manual_seed(mix_seed(self.hparams.seed, 5, batch_idx))
        out = self.model_step(x, gen, stratify=len(self.bucket_edges), offset=batch_idx)
        self.log("val/loss", out["loss"], batch_size=n, sync_dist=True)
        k = len(self.bucket_edges)
        bucket = out["t"] * k // self.schedule.T
        for b, metric in enumerate(self.val_bucket_loss):
            # Always update (weight 0 when the bucket is empty) so that every rank syncs every metric.
            sel = (bucket == b).float()
            count = sel.sum()
            metric.update((out["per_image"] * sel).sum() / count.clamp_min(1.0), count)
        eps_model = self.eval_prior
        for i, (sigma, metric) in enumerate(zip(self.val_sigmas, self.val_psnr)):
            g = torch.Generator().manual_seed(mix_seed(self.hparams.seed, 11, i, batch_idx))
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            noisy = (x + sigma / 255.0 * noise) * 2.0 - 1.0  # x + sigma n on [0, 1] -> [-1, 1], std 2 sigma
            x0 = (eps_denoise(eps_model, self.schedule, noisy, 2.0 * sigma / 255.0).float().clamp(-1, 1) + 1.0) / 2.0
            mse = (x0 - x.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            metric.update(-10.0 * torch.log10(mse))

    def on_validation_epoch_end(self) -> None:
        # MeanMetric.compute() already reduces over the ranks (the same value on each, so every rank takes the
        # same branch below); sync_dist=True says so to Lightning, whose mean of equal values leaves them as is.
        for (lo, hi), metric in zip(self.bucket_edges, self.val_bucket_loss):
            value = metric.compute()
            metric.reset()
            if torch.isfinite(value):
                self.log(f"val/loss_t{lo}-{hi}", value, sync_dist=True)
        for sigma, metric in zip(self.val_sigmas, self.val_psnr):
            value = metric.compute()
            metric.reset()
            self.log(f"val/psnr_sigma{sigma:g}", value, sync_dist=True)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The net now holds the checkpoint's weights (``init_from`` is not loaded). Restored by a trainer (a resume,
        ``validate --ckpt_path``), a checkpoint whose weights do not fit this run's module is refused here with one
        line naming what differs (Lightning's own error lists every tensor)."""
        self._weights_set = True
        # from_checkpoint() builds the network the file describes (it fits); strict_loading=False asks for leniency.
        if self._trainer is not None and self.strict_loading:
            self._check_checkpoint_fits(checkpoint)
            self._check_checkpoint_target(checkpoint)

    def _check_checkpoint_target(self, checkpoint: Mapping[str, Any]) -> None:
        """:raises ValueError: resuming (``fit``) a checkpoint trained for another target or noise schedule: its
        weights would load and the run would go on learning something else."""
        hparams = checkpoint.get("hyper_parameters")
        trainer = self._trainer
        if not isinstance(hparams, Mapping) or trainer is None or trainer.state.fn != "fit":
            return
        keys = ("prediction", "num_timesteps", "beta_start", "beta_end")
        fixes = [f"--model.{k} {hparams[k]}" for k in keys if k in hparams and hparams[k] != self.hparams.get(k)]
        if fixes:
            where = f" {trainer.ckpt_path}" if trainer.ckpt_path else ""
            raise ValueError(
                f"checkpoint{where} was trained for another target or noise schedule than this run's: use its settings "
                f"({' '.join(fixes)}) to resume it, or start a new run with --trainer.logger.init_args.name NEW_NAME"
            )

    def _check_checkpoint_fits(self, checkpoint: Mapping[str, Any]) -> None:
        """:raises ValueError: the checkpoint's weights have other keys or shapes than this module's (another
        network, EMA on in one and off in the other); the message names the difference and the settings to use."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            return  # not ours to judge: Lightning reports it

        def shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
            out = {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()}
            if "ema.num_updates" in out and "ema.n_averaged" not in out:  # the former EMA layout (EMA._old_layout)
                out["ema.n_averaged"] = out.pop("ema.num_updates")
            return out

        theirs, mine = shapes(state), shapes(self.state_dict())
        if theirs == mine:
            return
        hparams = checkpoint.get("hyper_parameters")
        hparams = hparams if isinstance(hparams, Mapping) else {}
        differences, fixes = [], []

        def part(sd: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
            return {k: v for k, v in sd.items() if k.startswith(prefix)}

        if part(theirs, "net.") != part(mine, "net."):
            entry = checkpoint.get("diffpir_prior")
            config = entry.get("unet") if isinstance(entry, Mapping) else None
            name = _preset_of(config) if isinstance(config, Mapping) else None
            ours = _preset_of(getattr(self.net, "config", None))
            differences.append(
                f"the checkpoint's network ({f'the {name!r} UNet' if name else 'a UNet of no preset'}) is not this "
                f"run's ({f'the {ours!r} UNet' if ours else 'a UNet of no preset'})"
            )
            if name:
                fixes.append(f"--model.net.init_args.preset_or_config {name}")
                channels = config.get("in_channels")
                if channels is not None and channels != self.channels:
                    fixes.append(f"--data.channels {channels}")
        had_ema, has_ema = any(k.startswith("ema.") for k in theirs), self.ema is not None
        if had_ema != has_ema:
            if had_ema:
                decay = hparams.get("ema_decay")
                differences.append("the checkpoint has EMA weights and this run none (model.ema_decay: null)")
                fixes.append(f"--model.ema_decay {decay if decay is not None else 'DECAY'}")
            else:
                differences.append("the checkpoint has no EMA weights and this run has EMA (model.ema_decay set)")
                fixes.append("--model.ema_decay null")
        if not differences:
            extra = sorted(set(theirs) ^ set(mine)) or sorted(k for k in mine if theirs.get(k) != mine[k])
            differences.append(f"its weights have other keys or shapes ({', '.join(extra[:3])})")
        trainer = self._trainer
        where = f" {trainer.ckpt_path}" if trainer is not None and trainer.ckpt_path else ""
        advice = f"use the checkpoint's settings ({' '.join(fixes)})" if fixes else "use the checkpoint's settings"
        if trainer is not None and trainer.state.fn == "fit":
            advice += " to resume it, or start a new run with --trainer.logger.init_args.name NEW_NAME"
        raise ValueError(f"checkpoint{where} does not fit this run's model: {'; '.join(differences)}: {advice}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add ``checkpoint["diffpir_prior"]`` (docs/CONTRACTS.md): the prior description and the EMA (else raw)
        weights on the CPU, written by :func:`~diffpir.priorfile.prior_payload` as exported files are."""
        if getattr(self.net, "config", None) is None:
            return  # a network without a config cannot be rebuilt from the file
        prediction = self.hparams.get("prediction", "eps")
        state = self.eval_net.state_dict()
        checkpoint["diffpir_prior"] = prior_payload(self.net, self.schedule, prediction, state_dict=state)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu", **overrides: Any) -> DiffusionModule:
        """Rebuild a module from a training checkpoint of this class: Lightning's :meth:`load_from_checkpoint`
        (``weights_only=True``, strict), given the network it cannot build itself (``net`` is not a
        hyper-parameter): the UNet of the file's ``"diffpir_prior"`` entry, its config bounded as a prior file's.

        The guards Lightning's path lacks come first: the file is read by
        :func:`~diffpir.checkpoints.safe_torch_load` (local regular files only, URLs, FIFOs and folders refused
        before anything is opened; a file carrying code is refused with a one-line error, nothing run), and the
        file's hyper-parameters cannot name a class to build (Lightning's ``_instantiator`` is switched off).

        :param overrides: hyper-parameters replacing the checkpoint's (e.g. ``val_sigmas``).
        :raises ValueError: not a diffpir training checkpoint, or weights that do not fit the UNet it describes.
        """
        ckpt = safe_torch_load(path, map_location=map_location)
        entry = ckpt.get("diffpir_prior") if isinstance(ckpt, Mapping) else None
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path} has no 'diffpir_prior' entry: not a diffpir training checkpoint")
        try:
            net = UNet(**check_unet_config(entry.get("unet")))
        except ValueError as err:
            raise ValueError(f"{path}: malformed 'diffpir_prior' entry: {err}") from None
        del ckpt, entry
        overrides = {**overrides, "net": net, "_instantiator": None}
        try:
            return cls.load_from_checkpoint(path, map_location, strict=True, weights_only=True, **overrides)
        except RuntimeError as err:  # load_state_dict: the weights do not fit
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{path}: the weights do not fit the network the checkpoint describes ({first})") from None


def loss_bucket_names(num_timesteps: int = 1000, buckets: int = 10) -> list[str]:
    """The metric names of the per-bucket validation loss."""
    T = num_timesteps
    return [f"val/loss_t{k * T // buckets}-{(k + 1) * T // buckets - 1}" for k in range(buckets)]


__all__ = [
    "DiffusionModule",
    "lr_factor",
    "loss_bucket_names",
    "loss_weights",
    "sample_timesteps",
]
