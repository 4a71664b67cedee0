"""Data for restoration: the images, their measurements and per-image operators, batched for ``predict``.

Two modes (:class:`RestorationDataModule`):

- ``benchmark``: clean images (a folder, or the bundled samples) are degraded on the fly by a
  :class:`~diffpir.restoration.tasks.Degradation`; the kernel/mask and the noise of each image come from generators
  seeded by ``(seed, image key)``, so an image's measurement does not depend on the order, batch or rank it is
  loaded in. The clean image is kept as the truth for metrics.
- ``real``: the images are measurements ``y``; the operator's parameters come from the spec (kernel file, mask
  image, scale, sigma_n). An optional ``truth`` folder (same keys) enables metrics.

An image's key is its path relative to the image folder, without suffix, with ``/`` separators
(``"sub/cat"`` for ``<images>/sub/cat.png``).

Batching: :func:`collate` groups the items of a batch by image size; each group is one
:class:`RestorationBatch` with stacked tensors and one batched operator (per-image kernels/masks stacked).
A batch of images of different sizes is thus run as one sampler call per size. Results do not depend on the
grouping (per-image generators); for throughput, use images of one size.

Bad inputs: an image that cannot be restored (unreadable, truncated or empty file, NaN pixels, above
``max_pixels``, a kernel or mask that does not fit, a truth of the wrong size, ...) does not stop the run. Its item
carries the reason (:attr:`RestorationItem.error`); :func:`collate` hands the failures on in
:attr:`RestorationBatch.failures` (an image-less batch when every image of the batch failed), and the
:class:`~diffpir.restoration.writer.RestorationWriter` reports and records them (``failed.json``) while the other
images are restored.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffpir.io import ImageTooLargeError, image_header, list_image_files, read_image, safe_output_name
from diffpir.operators import Operator
from diffpir.restoration.tasks import (
    Degradation,
    build_operator,
    degrade,
    image_generator,
    load_params,
    synthesize_params,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "RestorationBatch",
    "RestorationDataModule",
    "RestorationDataset",
    "RestorationItem",
    "collate",
    "image_keys",
]

log = logging.getLogger("diffpir")
Mode = Literal["benchmark", "real"]
DEFAULT_MAX_PIXELS = 1 << 25
"""Images above this many pixels (33.5 M, e.g. 8192 x 4096) are refused unless ``max_pixels`` is raised."""


def image_keys(root: Path, files: Sequence[Path]) -> list[str]:
    """Keys of ``files`` under ``root``: relative paths without suffix, ``/``-separated.

    Raises ``ValueError`` when two files share a key (``cat.png`` and ``cat.jpg``) or an output name
    (:func:`diffpir.io.safe_output_name`)."""
    keys: dict[str, Path] = {}
    names: dict[str, Path] = {}
    for f in files:
        rel = f.relative_to(root) if root.is_dir() else Path(f.name)
        key = rel.with_suffix("").as_posix()
        if key in keys:
            raise ValueError(f"two images share the key {key!r}: {keys[key]} and {f}; rename one of them")
        name = safe_output_name(key)
        if name in names:  # safe_output_name keeps distinct keys apart unless their hashes collide: never silently
            raise ValueError(f"{names[name]} and {f} would both be written as {name}.png; rename one of them")
        keys[key], names[name] = f, f
    return list(keys)


@contextlib.contextmanager
def _one_thread():
    """Run the block on one torch thread. Measurements are synthesised so: FFT and convolution results can depend on
    the thread count (MKL), and a measurement must not depend on whether the main process (all threads) or a
    DataLoader worker (one thread) made it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _center_crop(x: Tensor, h: int, w: int) -> Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


@dataclass
class RestorationItem:
    """One image: ``y`` ``[C, h, w]``, ``x`` (truth) ``[C, H, W]`` or None, operator ``params``.

    A failed item has ``error`` (why it cannot be restored) and ``file`` (the input file), and no tensors. A padding
    item (``padding``: a rank with no image left, see :meth:`RestorationDataModule.predict_dataloader`) has neither
    and is dropped by :func:`collate`.
    """

    key: str
    y: Tensor | None
    x: Tensor | None
    params: dict[str, Tensor]
    x_size: tuple[int, int]
    file: str = ""
    error: str | None = None
    padding: bool = False


def failed_item(key: str, file: str | Path, error: BaseException | str) -> RestorationItem:
    """The item of an image that cannot be restored, with the reason."""
    reason = error if isinstance(error, str) else (str(error) or type(error).__name__)
    return RestorationItem(key, None, None, {}, (0, 0), file=str(file), error=reason)


@dataclass
class RestorationBatch:
    """Images of one size restored together.

    Attributes:
        keys: the image keys, ``[N]``.
        y: measurements ``[N, C, h, w]`` in [0, 1] (noisy, unclipped in benchmark mode).
        op: the batched operator (its per-image kernels/masks stacked along N).
        params: the stacked parameters ``op`` was built from (``kernel`` ``[N, kh, kw]``, ``mask``
            ``[N, 1, H, W]``).
        spec: the degradation spec (for rebuilding ``op`` on a subset, :meth:`select`).
        sigma_n: the noise level the sampler assumes.
        x: the truth ``[N, C, H, W]`` in [0, 1], or None (real mode without a truth folder).
        failures: images of the loader batch that cannot be restored, ``{"key", "file", "reason"}`` each
            (carried by the first group of a batch; a batch whose images all failed is one group with no images
            and ``op=None``).
    """

    keys: list[str]
    y: Tensor
    op: Operator | None
    params: dict[str, Tensor]
    spec: Degradation
    sigma_n: float
    x: Tensor | None = None
    failures: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, **kwargs) -> RestorationBatch:
        """The batch on ``device`` (tensors and operator moved)."""
        op = self.op.to(device) if self.op is not None else None
        return replace(
            self,
            y=self.y.to(device),
            op=op,
            params={k: v.to(device) for k, v in self.params.items()},
            x=None if self.x is None else self.x.to(device),
        )

    def select(self, index: Sequence[int]) -> RestorationBatch:
        """The sub-batch of the images at ``index`` (the operator rebuilt from their parameters)."""
        idx = list(index)
        params = {k: v[idx] for k, v in self.params.items()}
        op = build_operator(self.spec, params).to(self.y.device)
        return replace(
            self,
            keys=[self.keys[i] for i in idx],
            y=self.y[idx],
            op=op,
            params=params,
            x=None if self.x is None else self.x[idx],
        )


def collate(items: Sequence[RestorationItem], spec: Degradation) -> list[RestorationBatch]:
    """Group ``items`` by (measurement size, image size, parameter shapes), stack each group and build its
    operator.

    Returns one :class:`RestorationBatch` per group, in order of first appearance; failed items go to the first
    group's ``failures`` (an image-less group when no item succeeded). Within a group, every item carries the
    same kinds of parameters (true for items of one data set); a group with a truth for only some images drops
    the truths (no metrics for it) rather than failing.
    """
    groups: dict[tuple, list[RestorationItem]] = {}
    items = [it for it in items if not it.padding]
    failures = [{"key": it.key, "file": it.file, "reason": it.error} for it in items if it.error is not None]
    for it in items:
        if it.error is None:
            shapes = tuple((k, tuple(v.shape)) for k, v in sorted(it.params.items()))
            groups.setdefault((tuple(it.y.shape), it.x_size, shapes), []).append(it)
    out = []
    for group in groups.values():
        params = {k: torch.stack([it.params[k] for it in group]) for k in group[0].params}
        has_x = [it.x is not None for it in group]
        x = torch.stack([it.x for it in group]) if all(has_x) else None
        out.append(
            RestorationBatch(
                keys=[it.key for it in group],
                y=torch.stack([it.y for it in group]),
                op=build_operator(spec, params),
                params=params,
                spec=spec,
                sigma_n=float(spec.sigma_n),
                x=x,
            )
        )
    if not out:  # every item failed (the failures ride on an image-less group), or padding only
        out.append(RestorationBatch([], torch.empty(0), None, {}, spec, float(spec.sigma_n)))
    out[0].failures = failures
    return out


class _Collate:
    """A picklable collate function bound to a spec (for DataLoader workers)."""

    def __init__(self, spec: Degradation):
        self.spec = spec

    def __call__(self, items: Sequence[RestorationItem]) -> list[RestorationBatch]:
        return collate(items, self.spec)


class RestorationDataset(Dataset):
    """Images to restore, as :class:`RestorationItem` s (see the module docstring for the modes).

    Args:
        files: image files (clean images in benchmark mode, measurements in real mode).
        keys: their keys (same order).
        spec: the degradation.
        mode: ``"benchmark"`` or ``"real"``.
        channels: 1 or 3, as the prior takes.
        seed: seeds the per-image kernels, masks and noise (benchmark mode).
        truth: real mode: ``key -> clean image file`` for metrics (may be partial or empty).
        crop: benchmark mode: centre-crop the clean images to at most ``crop x crop`` first.
        max_pixels: images with more pixels fail (their header is read, their pixels are not decoded);
            None: no limit.

    An image that cannot be restored gives a failed item (``item.error`` says why) instead of raising.
    """

    def __init__(
        self,
        files: Sequence[Path],
        keys: Sequence[str],
        spec: Degradation,
        mode: Mode = "benchmark",
        channels: int = 3,
        seed: int = 0,
        truth: dict[str, Path] | None = None,
        crop: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if len(files) != len(keys):
            raise ValueError("files and keys differ in length")
        if mode not in ("benchmark", "real"):
            raise ValueError(f"mode must be 'benchmark' or 'real', got {mode!r}")
        self.files, self.keys = list(files), list(keys)
        self.spec, self.mode, self.channels, self.seed = spec, mode, channels, seed
        self.truth = truth or {}
        self.crop = crop
        self.max_pixels = max_pixels
        self.padding = 0  # padding items after the images (set by the data module for ranks with no image left)

    def __len__(self) -> int:
        return len(self.files) + self.padding

    def __getitem__(self, i: int) -> RestorationItem:
        """Item ``i``, or a failed item naming the file and the reason when it cannot be restored (a padding item
        past the images)."""
        if i >= len(self.files):
            return RestorationItem("", None, None, {}, (0, 0), padding=True)
        try:
            item = self._item(i)
            self._check(item, self.files[i])
        except Exception as err:  # one bad image must not stop the others: report it, restore the rest
            return failed_item(self.keys[i], self.files[i], err)
        item.file = str(self.files[i])
        return item

    def _read(self, path: Path) -> Tensor:
        return read_image(path, self.channels, max_pixels=self.max_pixels)

    def _item(self, i: int) -> RestorationItem:
        key, spec = self.keys[i], self.spec
        if self.mode == "real":
            self._check_output_size(self.files[i])
        img = self._read(self.files[i])
        if self.mode == "benchmark":
            return self._benchmark_item(key, img, self.files[i])
        y = img
        n = spec.size_multiple
        h, w = y.shape[-2] * n, y.shape[-1] * n
        params = load_params(spec, key, h, w)
        x = None
        if key in self.truth:
            x = self._read(self.truth[key])
            if tuple(x.shape[-2:]) != (h, w):
                hint = f" (the measurement is {y.shape[-1]}x{y.shape[-2]}, scale {n})" if n > 1 else ""
                raise ValueError(
                    f"truth {str(self.truth[key])!r} is {x.shape[-1]}x{x.shape[-2]} but the restoration of "
                    f"{str(self.files[i])!r} is {w}x{h}{hint}: give a truth of the restored size or remove it"
                )
        return RestorationItem(key, y, x, params, (h, w))

    def _check_output_size(self, file: Path) -> None:
        """Real mode: the restoration (``scale`` times the measurement for SR) must stay within ``max_pixels``;
        checked on the header, before anything is decoded."""
        n = self.spec.size_multiple
        if self.max_pixels is None or n == 1:
            return  # the input's own check in read_image is the output's
        h, w, _ = image_header(file)
        if h * n * w * n > self.max_pixels:
            raise ImageTooLargeError(
                f"image file {str(file)!r} is {w}x{h}; restored at the SR scale {n} it would be {w * n}x{h * n} = "
                f"{h * n * w * n} pixels, above the limit of {self.max_pixels} pixels; use a smaller scale, crop "
                f"the image, or raise data.max_pixels if you have the memory"
            )

    def _benchmark_item(self, key: str, x: Tensor, file: Path) -> RestorationItem:
        spec = self.spec
        full = (int(x.shape[-2]), int(x.shape[-1]))
        h, w = full
        if self.crop is not None:
            h, w = min(h, self.crop), min(w, self.crop)
        m = spec.size_multiple
        if h < m or w < m:
            raise ValueError(
                f"image {str(file)!r} of size {x.shape[-1]}x{x.shape[-2]} is smaller than the SR scale {m}: "
                f"use a larger image or a smaller scale"
            )
        if h % m or w % m:
            warnings.warn(
                f"image {str(file)!r}: {w}x{h} is not divisible by the SR scale {m}; centre-cropped to "
                f"{w - w % m}x{h - h % m}",
                stacklevel=2,
            )
        h, w = h - h % m, w - w % m
        x = _center_crop(x, h, w).contiguous()
        with _one_thread():
            params = synthesize_params(spec, key, h, w, self.seed, full)
            y = degrade(spec, x, params, image_generator(self.seed, key, "noise"))
        return RestorationItem(key, y, x, params, (h, w))

    def _check(self, item: RestorationItem, file: Path) -> None:
        """What the sampler would refuse, checked per image: the prior's channels, and the operator must take
        ``y`` (sizes of kernel and mask, non-finite values)."""
        if item.y.shape[0] != self.channels:
            raise ValueError(
                f"image {str(file)!r} was read with {item.y.shape[0]} channels but the prior takes {self.channels}: "
                f"convert it to {'grey' if self.channels == 1 else 'RGB'} (e.g. as a PNG)"
            )
        op = build_operator(self.spec, {k: v[None] for k, v in item.params.items()})
        try:
            op.check(item.y[None].float())
        except ValueError as err:
            raise ValueError(f"{err} (image {str(file)!r})") from None


class RestorationDataModule(L.LightningDataModule):
    """Images and degradations for ``Trainer.predict`` with a :class:`~diffpir.restoration.RestorationModule`.

    Args:
        images: a folder of images (searched recursively) or one image file; None: the bundled sample
            photographs (benchmark mode).
        mode: ``"benchmark"`` (clean images, degraded here) or ``"real"`` (degraded images).
        degradation: the task and its parameters (see :class:`~diffpir.restoration.tasks.Degradation`).
        truth: real mode: a folder of clean images with the same keys, for metrics.
        seed: seeds each image's kernel/mask and noise in benchmark mode (with the image key).
        batch_size: images per batch (a batch of mixed sizes runs as one sampler call per size).
        num_workers: DataLoader workers.
        limit: restore only the first ``limit`` images (by key); at least 1 (None: all).
        crop: benchmark mode: centre-crop clean images to at most ``crop x crop`` pixels (at least 1; None: no crop).
        channels: 1 or 3; None: the prior's (``RestorationModule.channels``), else 3.
        max_pixels: images with more pixels (height x width) are refused (reported and skipped, their pixels
            never decoded); in real-mode SR the restored size (``scale`` times larger each way) is what counts.
            None: no limit. Large images restore with bounded network memory through the
            module's ``tile_size``; this limit guards the rest (decompression bombs, the FFTs of the data step).

    Images that cannot be restored are reported and skipped (see the module docstring); the run goes on.
    """

    def __init__(
        self,
        images: str | None = None,
        mode: Mode = "benchmark",
        degradation: Degradation | None = None,
        truth: str | None = None,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        limit: int | None = None,
        crop: int | None = None,
        channels: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        if mode not in ("benchmark", "real"):
            raise ValueError(f"mode must be 'benchmark' or 'real', got {mode!r}")
        if mode == "real" and images is None:
            raise ValueError("real mode needs images: the folder of degraded images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels or null, got {max_pixels}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (the number of images to restore) or null for all, got {limit}")
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be a positive size in pixels or null (no crop), got {crop}")
        if crop is not None and mode == "real":
            warnings.warn(
                "data.crop applies to benchmark mode only: real measurements are restored whole (crop them first)",
                stacklevel=2,
            )
        self.images, self.mode = images, mode
        self.degradation = degradation if degradation is not None else Degradation()
        self.truth_dir, self.seed = truth, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.limit, self.crop, self.channels = limit, crop, channels
        self.max_pixels = max_pixels
        self.dataset: RestorationDataset | None = None
        self._keys: list[str] = []
        self._files_of: dict[str, Path] = {}
        self._done: Callable[[str], bool] | None = None
        self._exclude: Path | None = None
        self.save_hyperparameters(ignore=["degradation"])
        self.hparams["degradation"] = self.degradation.to_dict()

    def _files(self) -> tuple[list[Path], list[str]]:
        if self.images is None:
            from diffpir.datasets import sample_images

            files = list(sample_images())
            keys = [f.stem for f in files]
        else:
            root = Path(self.images)
            files = list_image_files(root)
            keys = image_keys(root, files)
        if not files:
            raise ValueError(f"no images found in {self.images!r}")
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        files, keys = [files[i] for i in order], [keys[i] for i in order]
        if self.limit is not None:
            files, keys = files[: self.limit], keys[: self.limit]
        return files, keys

    def _channels(self) -> int:
        if self.channels is not None:
            return self.channels
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return int(getattr(module, "channels", 3))

    def setup(self, stage: str | None = None) -> None:
        files, keys = self._files()
        self._keys = list(keys)
        self._files_of = dict(zip(keys, files))
        truth: dict[str, Path] = {}
        if self.truth_dir is not None:
            root = Path(self.truth_dir)
            tfiles = list_image_files(root)
            truth = dict(zip(image_keys(root, tfiles), tfiles))
        self.dataset = RestorationDataset(
            files, keys, self.degradation, self.mode, self._channels(), self.seed, truth, self.crop, self.max_pixels
        )
        if self._done is not None or self._exclude is not None:
            self.skip_done(self._done, self._exclude)

    def skip_done(self, done: Callable[[str], bool] | None, exclude: str | Path | None = None) -> None:
        """Leave out of the data set the images that ``done(key)`` reports finished (the
        :class:`~diffpir.restoration.writer.RestorationWriter` calls this from its ``setup`` with its ``is_done``),
        before a DistributedSampler splits the rest among the ranks, so that on a resume every rank gets a share of
        what is left. :attr:`keys` still lists every requested image; applied again by a later :meth:`setup`.

        ``exclude``: a folder (the writer's output folder) whose images are not inputs even when it lies inside
        ``images``: they are left out of the data set and of :attr:`keys`, so that a rerun does not restore its own
        outputs."""
        self._done = done
        if exclude is not None:
            self._exclude = Path(exclude)
        ds = self.dataset
        if ds is None:
            return
        if self._exclude is not None and self.images is not None:
            ex = self._exclude.resolve()
            inside = {ds.keys[i] for i, f in enumerate(ds.files) if ex in Path(f).resolve().parents}
            if inside:
                log.warning(
                    "left out %d image(s) inside the output folder %s (outputs, not inputs)", len(inside), self._exclude
                )
                keep = [i for i, key in enumerate(ds.keys) if key not in inside]
                ds.files, ds.keys = [ds.files[i] for i in keep], [ds.keys[i] for i in keep]
                self._keys = [k for k in self._keys if k not in inside]
        if done is None:
            return
        todo = [i for i, key in enumerate(ds.keys) if not done(key)]
        if len(todo) < len(ds):
            log.info("skipping %d of %d images already restored", len(ds) - len(todo), len(self._keys))
            ds.files, ds.keys = [ds.files[i] for i in todo], [ds.keys[i] for i in todo]

    def input_file(self, key: str) -> Path | None:
        """The file image ``key`` is read from (None for an unknown key)."""
        if self.dataset is None:
            self.setup("predict")
        return self._files_of.get(key)

    @property
    def keys(self) -> list[str]:
        """The keys of every requested image, in order, including those :meth:`skip_done` left out."""
        if self.dataset is None:
            self.setup("predict")
        return list(self._keys)

    def predict_dataloader(self) -> DataLoader:
        """The images left to restore. With fewer of them than processes (a resume of a DDP run, ``data.limit``
        below the device count), padding items that restore nothing fill up to one per process: Lightning's
        distributed predict sampler needs one item per rank."""
        if self.dataset is None:
            self.setup("predict")
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        n = len(self.dataset.files)
        self.dataset.padding = world - n if 0 < n < world else 0
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.degradation),
            persistent_workers=False,
        )
