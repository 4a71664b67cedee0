"""Shared machinery of the benchmarks (``bench/compare_methods.py``, ``bench/ablations.py``) and ``diffpir.cli.tune``:
measurements of a task's validation/evaluation images, per-task method defaults, timing, peak memory and metrics.

Metrics follow the paper: PSNR and SSIM on uint8 RGB, LPIPS (VGG, and AlexNet) when the offline weights are there
and images have at least 32 px; FID and KID only over enough images to mean something (:func:`fid_kid`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from diffpir.cli.common import config_dir
from diffpir.methods.base import Method
from diffpir.restoration.data import RestorationBatch
from diffpir.sampler import DiffPIR

__all__ = [
    "write_csv",
    "CONFIG_DIR",
    "Metrics",
    "PeakMemory",
    "fid_kid",
    "load_batches",
    "method_defaults",
    "method_init_args",
    "run_method",
    "task_config",
]

CONFIG_DIR = config_dir("restore")  # the repository's configs/restore, or the packaged copy (a wheel install)

# Per-task defaults of the baselines, from their papers' / official code's settings.
_DPS_SCALE = {"blur": 0.3, "sr": 0.3, "inpaint": 0.5, "denoise": 0.3}  # DPS configs (gaussian/motion deblur, SR: 0.3)
_DPIR_ITERATIONS = {"blur": 8, "sr": 24, "inpaint": 8, "denoise": 8}  # DPIR: 8 for deblurring, 24 for SR


def task_config(task: str, config_dir: str | Path = CONFIG_DIR) -> dict[str, Any]:
    """The task's restoration config (``configs/restore/<task>.yaml``) as a dict; a minimal one when absent."""
    path = Path(config_dir) / f"{task}.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {"model": {}, "data": {"degradation": {"task": task}}}


def method_init_args(config: dict[str, Any]) -> dict[str, Any]:
    """The ``model.method.init_args`` of a restoration config (a dict; empty when absent)."""
    method = (config.get("model") or {}).get("method") or {}
    return dict(method.get("init_args") or {}) if isinstance(method, dict) else {}


def method_defaults(name: str, config: dict[str, Any], nfe: int | None = None) -> dict[str, Any]:
    """Keyword arguments of method ``name`` for the task of ``config`` at ``nfe`` network evaluations (None: the
    method's own default): DiffPIR takes the config's sampler settings; DPS its official step size per task;
    DPIR DPIR's iteration count per task (``nfe`` is ignored: its iterations are its NFEs)."""
    from diffpir.restoration.tasks import Degradation

    model = method_init_args(config)
    family = Degradation(**(config.get("data", {}).get("degradation") or {})).family
    if name == "diffpir":
        out = {k: model[k] for k in DiffPIR.PARAMS if model.get(k) is not None}  # model.method.init_args
        if nfe is not None:
            out["steps"] = nfe
        return out
    if name == "dps":
        return {"scale": _DPS_SCALE[family], **({"steps": nfe} if nfe is not None else {})}
    if name == "ddnm":
        return {"steps": nfe} if nfe is not None else {}
    if name in ("dpir", "dpir_ffdnet"):
        return {"iterations": _DPIR_ITERATIONS[family]}
    return {}


def load_batches(
    config: dict[str, Any],
    images: str | Path | Sequence[Path] | None = None,
    limit: int | None = None,
    crop: int | None = None,
    channels: int = 3,
    batch_size: int | None = None,
) -> list[RestorationBatch]:
    """Measurements of the config's task (``data.degradation``, seeded by ``data.seed`` and each image key, as
    ``diffpir-restore`` makes them) for ``images`` (a folder searched recursively, a list of files, else the config's
    ``data.images``, else the bundled sample photos), sorted by key, the first ``limit``, centre-cropped to at most
    ``crop`` px; grouped ``batch_size`` images at a time (None: all), one batch per image size."""
    from diffpir.datasets import sample_images
    from diffpir.io import list_image_files
    from diffpir.restoration.data import RestorationDataset, collate, image_keys
    from diffpir.restoration.tasks import Degradation

    data = dict(config.get("data") or {})
    spec = Degradation(**(data.get("degradation") or {}))
    source = images if images is not None else data.get("images")
    if source is None:
        files = list(sample_images())
        keys = [f.stem for f in files]
    elif isinstance(source, (str, Path)):
        files = list_image_files(Path(source))
        keys = image_keys(Path(source), files)
    else:
        files = [Path(f) for f in source]
        keys = [f.stem for f in files]
    if not files:
        raise ValueError(f"no images found in {source!r}")
    order = sorted(range(len(keys)), key=lambda i: keys[i])[:limit]
    files, keys = [files[i] for i in order], [keys[i] for i in order]
    ds = RestorationDataset(files, keys, spec, "benchmark", channels, int(data.get("seed", 0)), None, crop)
    items = [ds[i] for i in range(len(ds))]
    step = len(items) if not batch_size else batch_size
    return [b for i in range(0, len(items), step) for b in collate(items[i : i + step], spec)]


def _rss_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux), NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PeakMemory:
    """Peak memory of a block, in MiB (``peak_mib``), and how far it rose above the memory in use on entry
    (``extra_mib``: the block's own working memory).

    CUDA: ``max_memory_allocated``. CPU: the process's peak resident set size, reset on entry through
    ``/proc/self/clear_refs`` on Linux (elsewhere the process's peak since it started, and no ``extra_mib``).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mib: float = float("nan")
        self.extra_mib: float = float("nan")
        self._start = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
            self._start = _rss_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = _rss_mib("VmHWM")
            if math.isnan(self.peak_mib):
                self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.extra_mib = self.peak_mib - self._start


@dataclass
class Metrics:
    """PSNR and SSIM (uint8), LPIPS with the nets in ``lpips_nets`` (skipped below 32 px or without weights)."""

    lpips_nets: Sequence[str] = ("vgg", "alex")
    device: torch.device | str = "cpu"
    _lpips: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from diffpir.metrics import LPIPSMetric, lpips_available

        for net in self.lpips_nets:
            if lpips_available(net):
                self._lpips[net] = LPIPSMetric(net).to(self.device)

    @property
    def names(self) -> list[str]:
        return ["psnr", "ssim", *[f"lpips_{n}" for n in self._lpips]]

    @torch.no_grad()
    def __call__(self, x: Tensor, truth: Tensor) -> list[dict[str, float]]:
        """Per-image metrics of ``x`` against ``truth`` (both ``[N, C, H, W]`` in [0, 1])."""
        from diffpir.metrics import image_metrics

        lpips = {f"lpips_{net}": functools.partial(self._lpips_on_device, m) for net, m in self._lpips.items()}
        return image_metrics(x.clamp(0, 1).float(), truth.float(), lpips)

    def _lpips_on_device(self, metric: Any, a: Tensor, b: Tensor) -> Tensor:
        return metric(a.to(self.device), b.to(self.device)).cpu()


def run_method(
    method: Method,
    batches: Sequence[RestorationBatch],
    prior: Any,
    metrics: Metrics,
    seed: int = 0,
    device: torch.device | str = "cpu",
    keep: bool = False,
    oracle: bool = False,
) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Restore every batch with ``method`` (per-image generators seeded by ``(seed, key)`` as ``diffpir-restore``)
    and measure it: one row per image with its metrics, ``seconds`` (per image, the batch's wall time divided
    evenly) and ``peak_mib`` (the batch's peak memory). Returns the rows and, with ``keep``, the restored images.

    ``oracle``: for the classical baseline, tune its parameter on the truth (:meth:`Classical.oracle`).
    """
    from diffpir.restoration.tasks import image_generator

    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    kept: list[Tensor] = []
    for batch in batches:
        batch = batch.to(device)
        gens = [image_generator(seed, key, "sample") for key in batch.keys]
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            if oracle and hasattr(method, "oracle"):
                x = method.oracle(batch.y.float(), batch.op, batch.sigma_n, batch.x.float())
            else:
                x = method(batch.y.float(), batch.op, prior, batch.sigma_n, generator=gens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / len(batch)
        x = x.clamp(0, 1)
        for key, m in zip(batch.keys, metrics(x, batch.x)):
            rows.append(
                {
                    "key": key,
                    **m,
                    "seconds": seconds,
                    "peak_mib": mem.peak_mib,
                    "extra_mib": mem.extra_mib,
                    "nfe": method.nfe,
                }
            )
        if keep:
            kept.append(x.cpu())
    return rows, kept


@functools.cache
def _inception(device: torch.device) -> torch.nn.Module:
    """pytorch-fid's Inception (pool3) on ``device``, with its weights provisioned offline; built once."""
    from pytorch_fid.inception import InceptionV3

    from diffpir.weights import provision_fid_weights

    provision_fid_weights()
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()


def _inception_features(images: Sequence[Tensor], device: torch.device, batch: int = 16) -> np.ndarray:
    """pool3 features (2048) of pytorch-fid's Inception for ``[N, C, H, W]`` images in [0, 1]."""
    net = _inception(device)
    x = torch.cat([im if im.shape[1] == 3 else im.expand(-1, 3, -1, -1) for im in images]).float()
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            feats.append(net(x[i : i + batch].to(device))[0].flatten(1).cpu().double())
    return torch.cat(feats).numpy()


def fid_kid(
    fake: Sequence[Tensor], real: Sequence[Tensor], device: torch.device | str = "cpu", kid_subset: int = 100
) -> dict[str, float]:
    """FID (pytorch-fid's Inception, offline weights) and KID (unbiased polynomial-kernel MMD^2, mean over random
    subsets of ``kid_subset`` images) of two image sets (lists of ``[N, C, H, W]`` in [0, 1]).

    Neither means much over few images: FID's covariance has 2048 x 2048 entries (thousands of images), KID is
    unbiased but noisy below ~100. The caller decides (see ``bench/compare_methods.py --fid-min/--kid-min``).
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    device = torch.device(device)
    f, r = _inception_features(fake, device), _inception_features(real, device)
    out = {}
    if len(f) >= 2:
        out["fid"] = float(
            calculate_frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
        )
    m = min(len(f), len(r), kid_subset)
    if m >= 2:
        rng = np.random.default_rng(0)
        d = f.shape[1]
        vals = []
        for _ in range(10):
            a, b = f[rng.choice(len(f), m, replace=False)], r[rng.choice(len(r), m, replace=False)]
            kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
            off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            vals.append(off - 2 * kxy.mean())
        out["kid"] = float(np.mean(vals))
    return out


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (0: leave as is)."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def mean_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """The mean of each of ``keys`` over ``rows`` (NaN where no row has it)."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and not math.isnan(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a CSV table; the columns are every key of any row, in first-seen order."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
