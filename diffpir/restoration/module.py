"""The LightningModule that restores images with DiffPIR (or a baseline) in ``predict_step``.

One :class:`RestorationModule` holds a :class:`~diffpir.prior.Prior` and a :class:`~diffpir.methods.Method`
(:class:`~diffpir.methods.DiffPIRMethod` by default; ``DPS``, ``DDNM``, ``DPIR``, ``DPIRFFDNet``, ``Classical``,
``BlindDiffPIR``), given as ``model.method`` (``class_path``/``init_args``) in a config; ``Trainer.predict``
feeds it batches from :class:`~diffpir.restoration.data.RestorationDataModule` and a
:class:`~diffpir.restoration.writer.RestorationWriter` stores what it returns. Multi-GPU is Lightning's DDP.

Reproducibility: each image's sampler noise comes from its own generator seeded by ``(seed, image key)`` (the
sampler's list-of-generators form; CPU generators, so a GPU run draws the same noise as a CPU run), hence an
image's noise does not depend on the batch or rank it lands in. Its result is then bitwise the same whatever batch
it lands in with ``batch_size: 1`` (the configs' default) or ``batch_invariant: true`` (DiffPIR's
``model.method.init_args``), and the same to
round-off otherwise (docs/reliability.md).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from diffpir.methods import DiffPIRMethod, Method
from diffpir.metrics import image_metrics
from diffpir.prior import Prior
from diffpir.priorfile import load_prior
from diffpir.restoration.data import RestorationBatch
from diffpir.restoration.tasks import image_generator
from diffpir.sampler import DataOperator, StepState

log = logging.getLogger("diffpir")


class StopRequested(Exception):
    """Raised by ``predict_step`` after a SIGTERM, before the next batch is sampled: everything restored so far is
    written (atomically) and a rerun of the same command restores the rest. ``diffpir-restore`` reports it in one
    line and exits with status 143 (128 + SIGTERM)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA, MPS or CPU) rather than a bug."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["PRECISIONS", "RestorationModule", "StepHook", "StopRequested"]

PriorPrecision = Literal["32", "bf16", "16"]
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
StepHook = Callable[[StepState], None]


class RestorationModule(L.LightningModule):
    """DiffPIR restoration (or a baseline's) as a ``predict_step``.

    Args:
        prior: a prior file (safetensors, training ``.ckpt``, guided-diffusion ``.pt``) or a bundled prior name
            (``natural``, ``digits``); from Python also a :class:`~diffpir.prior.Prior` (tests, notebooks).
        preset: UNet preset for plain guided-diffusion state dicts (``ffhq_10m``, ``imagenet_256_uncond``).
        method: the restoration method (a :class:`~diffpir.methods.Method`; None:
            :class:`~diffpir.methods.DiffPIRMethod` with the sampler's defaults). In a config, by ``class_path``
            and ``init_args`` like ``model.net`` in training:
            ``{class_path: diffpir.methods.DiffPIRMethod, init_args: {steps: 100, lambda_: 7.0}}``; the other
            methods (``DPS``, ``DDNM``, ``DPIR``, ``DPIRFFDNet``, ``Classical``, ``BlindDiffPIR``) alike.
        prior_precision: ``"32"``, ``"bf16"`` or ``"16"``: the prior runs under ``torch.autocast`` with that dtype
            on CUDA; on the CPU it always runs in float32. The sampler's own arithmetic stays float32.
        seed: seeds each image's sampler noise together with its key.
        lpips: compute LPIPS (``True``), not (``False``), or when its offline weights are present (``None``);
            images smaller than 32 px get none (the backbones pool them away).
        lpips_net: LPIPS backbone, ``"vgg"`` (the paper's) or ``"alex"``.
        show_steps: a tqdm progress bar over the sampler steps of each batch (rank 0).
        tile_size: images with a side above ``tile_size`` run the prior on overlapping tiles
            (:class:`~diffpir.tiling.TiledPrior`; at most the training size for attention nets), so the network's
            memory stays bounded; the data step still sees the whole image. None or 0: never tile.
        tile_overlap: least overlap of neighbouring tiles in pixels (blended across it).
        tile_batch: tiles per network call.

    ``predict_step`` returns one dict per restored image: ``key``, ``restored`` ``[C, H, W]`` in [0, 1] (CPU),
    ``degraded`` (``y``, CPU), ``truth`` (or None), ``metrics`` (``psnr``, ``ssim`` and ``lpips`` when known) and
    ``seconds`` (the batch's sampling time per image). Images a writer reports done never reach it (the data module
    leaves them out). An image whose restoration holds NaN or infinite values (a diverging sampler) is returned as a
    failure (``key``, ``error``) instead, so it is listed in ``failed.json``, makes the exit status non-zero and is
    retried on a rerun.
    """

    def __init__(
        self,
        prior: str = "natural",  # or a Prior object from Python; typed str so that the CLI never reads the file
        preset: str | None = None,
        method: Method | None = None,
        prior_precision: PriorPrecision = "32",
        seed: int = 0,
        lpips: bool | None = None,
        lpips_net: Literal["vgg", "alex"] = "vgg",
        show_steps: bool = False,
        tile_size: int | None = 512,
        tile_overlap: int = 32,
        tile_batch: int = 4,
    ):
        super().__init__()
        prior_precision = str(prior_precision)
        if prior_precision not in PRECISIONS:
            raise ValueError(f"prior_precision must be one of {list(PRECISIONS)}, got {prior_precision!r}")
        self.method: Method = DiffPIRMethod() if method is None else method
        if not isinstance(self.method, Method):
            raise ValueError(f"method must be a diffpir.methods.Method, got {type(self.method).__name__}")
        self.save_hyperparameters(ignore=["prior", "method"])
        self.hparams["prior"] = prior if isinstance(prior, str) else f"<{type(prior).__name__} object>"
        # The method as a config would give it (what settings.json and summary.json record).
        cls, method_config = type(self.method), self.method.config()
        self.hparams["method"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": method_config}
        self.hparams["prior_precision"] = prior_precision
        self.prior: Prior = load_prior(prior, preset=preset) if isinstance(prior, str) else prior
        self.prior.requires_grad_(False).eval()
        self.prior.autocast_dtype = PRECISIONS[prior_precision]
        if tile_size and isinstance(self.prior, Prior):
            from diffpir.tiling import TiledPrior

            self.prior = TiledPrior.wrap(self.prior, tile_size, tile_overlap, tile_batch)
        self.seed = int(seed)
        self.show_steps = show_steps
        self.images_sampled = 0  # images run through the sampler by this process (skipped ones excluded)
        self.step_hooks: list[Callable[[RestorationBatch], StepHook | None]] = []  # see add_step_hook
        self.lpips_metric: nn.Module | None = None  # built in on_predict_start when LPIPS is wanted

    @property
    def channels(self) -> int:
        """Image channels the prior takes (1 or 3)."""
        return int(self.prior.in_channels)

    # -- metrics ----------------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        want = self.hparams.lpips
        if want is None or want:
            from diffpir.metrics import LPIPSMetric, lpips_available

            if want or lpips_available(self.hparams.lpips_net):
                self.lpips_metric = LPIPSMetric(self.hparams.lpips_net).to(self.device)

    @torch.no_grad()
    def reference_metrics(self, batch: RestorationBatch) -> list[dict[str, float]]:
        """What to judge a restoration against, per image (uint8 PSNR against the truth):

        - ``psnr_input``: the measurement ``y`` (clipped to [0, 1]); for SR, whose ``y`` is smaller, its upsampling
          ``op.initial_estimate(y)`` (bicubic);
        - ``psnr_classical``: the task's classical restoration (:class:`~diffpir.methods.classical.Classical`:
          Wiener deconvolution, bicubic upsampling, harmonic fill or SURE smoothing; no network, a small fraction of
          a diffusion run's cost); not computed when the method is ``classical`` itself (``psnr`` is that), nor for
          blind deblurring (the classical baseline needs the kernel, which is unknown there).
        """
        from diffpir.methods.classical import Classical
        from diffpir.metrics import psnr
        from diffpir.operators import BlindBlur

        y, x = batch.y.float(), batch.x
        shown = y if tuple(y.shape[-2:]) == tuple(x.shape[-2:]) else batch.op.initial_estimate(y)
        values = {"psnr_input": psnr(shown.clamp(0, 1), x)}
        if not isinstance(self.method, Classical) and not isinstance(batch.op, BlindBlur):
            baseline = Classical()(y, batch.op, None, sigma_n=batch.sigma_n)
            values["psnr_classical"] = psnr(baseline.clamp(0, 1), x)
        return [{k: float(v[i]) for k, v in values.items()} for i in range(x.shape[0])]

    # -- prediction -------------------------------------------------------------------------------------------
    def add_step_hook(self, make: Callable[[RestorationBatch], StepHook | None]) -> None:
        """Register ``make(batch) -> hook or None``: each sampled batch's hook is called with every step's
        :class:`~diffpir.sampler.StepState` (e.g. :class:`~diffpir.restoration.TrajectoryLogger` registers one in
        its ``setup``)."""
        if make not in self.step_hooks:
            self.step_hooks.append(make)

    def _step_hooks(self, batch: RestorationBatch) -> list[StepHook]:
        return [hook for hook in (make(batch) for make in self.step_hooks) if hook is not None]

    def _stop_requested(self) -> bool:
        """Whether the process got SIGTERM (Lightning's signal connector records it and lets the run go on)."""
        trainer = self._trainer
        return bool(trainer is not None and getattr(trainer, "received_sigterm", False))

    def predict_step(
        self, batch: RestorationBatch | Sequence[RestorationBatch], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """Restore every image of ``batch`` (one or several size groups; the data module has left out the images
        the writer reports done); one dict per image."""
        if self._stop_requested():
            raise StopRequested("SIGTERM")
        groups = [batch] if isinstance(batch, RestorationBatch) else list(batch)
        out: list[dict[str, Any]] = []
        for group in groups:
            if out and self._stop_requested():
                break  # the groups restored so far are written; the next predict_step stops the run
            if len(group):  # an image-less group carries only failures (the writer records them)
                out.extend(self._restore_or_split(group))
        return out

    def _restore_or_split(self, batch: RestorationBatch) -> list[dict[str, Any]]:
        """:meth:`restore`; when memory runs out, again image by image (same results: generators are per image),
        and an image that does not fit alone becomes a failure (``failed.json``) instead of stopping the run."""
        try:
            return self.restore(batch)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            _release_memory()
            if len(batch) > 1:
                log.warning("out of memory restoring %d images together; retrying them one at a time", len(batch))
                return [r for i in range(len(batch)) for r in self._restore_or_split(batch.select([i]))]
            h, w = batch.op.x_shape(batch.y.shape)[-2:] if batch.op is not None else batch.y.shape[-2:]
            tiles = "a smaller --model.tile_size" if self.hparams.get("tile_size") else "--model.tile_size 256"
            reason = (
                f"out of memory restoring a {w}x{h} image ({type(err).__name__}): use {tiles}, "
                "--model.prior_precision bf16 on a GPU, or a smaller image"
            )
            log.warning("%s: %s", batch.keys[0], reason)
            return [{"key": batch.keys[0], "file": "", "error": reason}]

    def restore(self, batch: RestorationBatch) -> list[dict[str, Any]]:
        """Run the sampler on one size group and package the per-image results."""
        gens = [image_generator(self.seed, key, "sample") for key in batch.keys]
        hooks = self._step_hooks(batch)
        bar = None
        if self.show_steps:
            from tqdm.auto import tqdm

            rank_zero = self._trainer is None or self._trainer.is_global_zero
            # disable=None: tqdm draws on a terminal only, never \r redraws into a log file
            bar = tqdm(
                total=self.method.nfe,
                desc=f"sampling {len(batch)} image(s)",
                leave=False,
                disable=None if rank_zero else True,
            )

        def callback(state: StepState) -> None:
            for hook in hooks:
                hook(state)
            if bar is not None:
                bar.update(1)

        start = time.perf_counter()
        x = self.method(
            batch.y.float(),
            batch.op,
            self.prior,
            sigma_n=batch.sigma_n,
            generator=gens,
            callback=callback if (hooks or bar is not None) else None,
        )
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds = (time.perf_counter() - start) / len(batch)
        if bar is not None:
            bar.close()
        self.images_sampled += len(batch)
        bad = (~torch.isfinite(x)).flatten(1).sum(1).cpu()  # NaN/inf: a failure, never a black image
        restored = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
        extras = self._extra_outputs()
        metrics = self._metrics(restored, batch, extras)
        if batch.x is not None:
            for row, ref in zip(metrics, self.reference_metrics(batch)):
                row.update(ref)
        restored, y = restored.cpu(), batch.y.cpu()
        truth = batch.x.cpu() if batch.x is not None else None
        out: list[dict[str, Any]] = []
        for i, key in enumerate(batch.keys):
            if bad[i]:
                reason = (
                    f"the restoration has {int(bad[i])} NaN or infinite value(s) out of {x[i].numel()}: the sampler "
                    f"diverged with these settings (e.g. a huge lambda_ or sigma_n, or a prior that outputs NaN); "
                    f"change them and run again"
                )
                out.append({"key": key, "file": "", "error": reason})
                continue
            out.append(
                {
                    "key": key,
                    "restored": restored[i],
                    "degraded": y[i],
                    "truth": None if truth is None else truth[i],
                    "metrics": metrics[i],
                    "seconds": seconds,
                    "nfe": self.method.nfe,
                    **({"extras": {name: v[i] for name, v in extras.items()}} if extras else {}),
                }
            )
        return out

    def _extra_outputs(self) -> dict[str, Tensor]:
        """Per-image outputs of the method's last call besides the image (``{"kernels": [N, kh, kw]}`` for
        ``blind_diffpir``), on the CPU; the writer saves them (``<output_dir>/<name>/<image>.npy`` and ``.png``)."""
        get = getattr(self.method, "extra_outputs", None)
        return {name: v.detach().cpu() for name, v in get().items()} if callable(get) else {}

    def _metrics(self, restored: Tensor, batch: RestorationBatch, extras: dict[str, Tensor]) -> list[dict[str, float]]:
        """:func:`~diffpir.metrics.image_metrics` against the truth (after the best integer alignment within the
        method's ``align_shift`` pixels, border of that width left out), plus ``kernel_ncc`` when the method
        estimated a kernel and the true one is known."""
        if batch.x is None:
            metrics: list[dict[str, float]] = [{} for _ in batch.keys]
        else:
            shift = int(getattr(self.method, "align_shift", 0))
            a, b = restored, batch.x
            if shift:
                from diffpir.methods.blind import align_images

                a, b, _ = align_images(restored, batch.x, shift)
            lpips = self.lpips_metric
            metrics = image_metrics(a, b, None if lpips is None else {"lpips": lpips})
        if "kernels" in extras and "kernel" in batch.params:
            from diffpir.methods.blind import kernel_ncc

            ncc = kernel_ncc(extras["kernels"], batch.params["kernel"].cpu())
            for m, v in zip(metrics, ncc.tolist()):
                m["kernel_ncc"] = v
        return metrics

    def forward(self, y: Tensor, op: DataOperator, sigma_n: float, keys: Sequence[str]) -> Tensor:
        """Restore ``y`` ``[N, C, h, w]`` through ``op`` outside a Trainer (per-key generators as in predict)."""
        gens = [image_generator(self.seed, key, "sample") for key in keys]
        return self.method(y, op, self.prior, sigma_n=sigma_n, generator=gens).clamp(0, 1)
