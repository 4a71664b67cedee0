"""Image-folder data for training diffusion priors: random crops (patches) of photos, seeded per epoch.

Images come out of the loaders as float32 ``[C, H, W]`` tensors in [0, 1]; :class:`~diffpir.training.module.
DiffusionModule` maps them to [-1, 1].

Determinism: every random choice of the data pipeline (the order of an epoch, the position and scale of each crop,
the flip) is drawn from a ``torch.Generator`` seeded by ``(seed, epoch, index)``. The epoch reaches the dataset
through the sampler: :class:`EpochSampler` (a ``DistributedSampler``, so Lightning keeps it under DDP) yields
``(epoch, index)`` keys, which also reach worker processes. So epoch ``e`` sees the same crops whether the run
started at epoch 0 or resumed at ``e``, with any number of workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffpir.io import IMAGE_SUFFIXES, read_image
from diffpir.io import list_image_files as list_images
from diffpir.seeding import mix_seed

log = logging.getLogger(__name__)

IMAGE_KINDS = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
"""The image file types the training data is read from (:data:`diffpir.io.IMAGE_SUFFIXES`), for messages."""


class ImageCropDataset(Dataset):
    """``patches_per_image`` crops of each image of ``files``, as float ``[C, crop_size, crop_size]`` in [0, 1].

    Item ``index`` is crop ``index % patches_per_image`` of image ``index // patches_per_image``. A key may be an
    ``int`` (epoch 0) or an ``(epoch, index)`` tuple (see :class:`EpochSampler`). For each key, a generator
    seeded by ``(seed, epoch, index)`` draws:

    1. a scale ``s ~ U(scale_range)`` (only if the range is not ``(1, 1)``); the crop covers a square region of side
       ``round(crop_size / s)`` (at most the shorter image side) which is resized to ``crop_size``;
    2. the region's position, uniformly (or the centre when ``random_crop`` is off);
    3. a horizontal flip with probability 1/2 (when ``hflip``).

    With ``resize_to``, images are first resized (antialiased) so that their shorter side is ``resize_to``.

    Args:
        files: image paths (already checked or not; unreadable ones are reported and skipped, see ``bad_files``).
        channels: 1 (grey) or 3 (RGB).
        cache: keep the decoded images in memory (uint8; decoded once, in the process that builds the dataset,
            then shared with forked workers). Worth it for a few dozen large photos cropped many times an epoch.
        check: decode every file at construction to drop unreadable ones and to fail early on images too small
            for the crop (always done when ``cache``). Without it, a file that fails later (unreadable, or smaller
            than the crop) is replaced by the next item and a warning names it.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        channels: Literal[1, 3] = 3,
        crop_size: int = 64,
        patches_per_image: int = 1,
        resize_to: int | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        random_crop: bool = True,
        hflip: bool = True,
        seed: int = 0,
        cache: bool = False,
        check: bool = True,
        name: str = "dataset",
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if crop_size < 1 or patches_per_image < 1:
            raise ValueError(f"crop_size and patches_per_image must be >= 1, got {crop_size}, {patches_per_image}")
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {tuple(scale_range)}")
        self.channels = channels
        self.crop_size = crop_size
        self.patches_per_image = patches_per_image
        self.resize_to = resize_to
        self.scale_range = (lo, hi)
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = seed
        self.name = name
        self.bad_files: list[str] = []
        self._cache: list[Tensor] | None = [] if cache else None
        self.files: list[str] = []
        for f in files:
            f = str(f)
            if not (check or cache):
                self.files.append(f)
                continue
            img = self._try_read(f)
            if img is None:
                continue
            self._check_size(f, img)
            self.files.append(f)
            if self._cache is not None:
                self._cache.append(img)
        if not self.files:
            raise ValueError(
                f"{name}: no readable images among {len(files)} file(s)"
                + (f" ({len(self.bad_files)} unreadable: {self.bad_files[:3]})" if self.bad_files else "")
            )
        if self.bad_files:
            log.warning("%s: skipped %d unreadable image(s): %s", name, len(self.bad_files), self.bad_files)

    # -- reading ----------------------------------------------------------------------------------------------
    def _try_read(self, path: str) -> Tensor | None:
        try:
            img = read_image(path, self.channels, dtype=torch.uint8)  # upright, 16-bit scaled to 8
        except Exception as err:  # torchvision raises RuntimeError/ValueError depending on the decoder
            log.warning("%s: cannot read image %s (%s); skipping it", self.name, path, err)
            self.bad_files.append(path)
            return None
        if self.resize_to is not None:
            img = _resize_short_side(img, self.resize_to)
        return img

    def _check_size(self, path: str, img: Tensor) -> None:
        h, w = img.shape[-2:]
        if min(h, w) < self.crop_size:
            hint = (
                "lower crop_size or set resize_to"
                if self.resize_to is None
                else f"raise resize_to (now {self.resize_to}) to at least crop_size"
            )
            raise ValueError(
                f"{self.name}: image {path} is {w}x{h}{' after resizing' if self.resize_to else ''}, smaller than"
                f" crop_size={self.crop_size}; {hint}, or remove the image"
            )

    def _image(self, i: int) -> Tensor:
        if self._cache is not None:
            return self._cache[i]
        img = self._try_read(self.files[i])
        if img is None:
            raise OSError(f"cannot read {self.files[i]}")
        try:
            self._check_size(self.files[i], img)
        except ValueError as err:  # not checked at construction (check=False): skipped like an unreadable file
            log.warning("%s; skipping it", err)
            if self.files[i] not in self.bad_files:
                self.bad_files.append(self.files[i])
            raise OSError(str(err)) from None
        return img

    # -- items --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files) * self.patches_per_image

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            try:
                img = self._image(j // self.patches_per_image)
            except OSError:
                continue
            return self._crop(img, torch.Generator().manual_seed(mix_seed(self.seed, epoch, j)))
        raise ValueError(
            f"{self.name}: no image could be used (each was unreadable or smaller than crop_size={self.crop_size}; "
            f"the warnings name them): fix or replace the files, or lower crop_size"
        )

    def _crop(self, img: Tensor, gen: torch.Generator) -> Tensor:
        """Steps 1-3 of the class docstring; ``img`` uint8 [C, H, W] -> float [C, crop, crop] in [0, 1]."""
        h, w = img.shape[-2:]
        size = self.crop_size
        # 1. Scale: the side of the square region that becomes the crop.
        lo, hi = self.scale_range
        if (lo, hi) != (1.0, 1.0):
            s = lo + (hi - lo) * torch.rand((), generator=gen).item()
            region = min(h, w, max(size, round(size / s)))
        else:
            region = size
        # 2. Position.
        if self.random_crop:
            top = int(torch.randint(0, h - region + 1, (), generator=gen))
            left = int(torch.randint(0, w - region + 1, (), generator=gen))
        else:
            top, left = (h - region) // 2, (w - region) // 2
        x = img[:, top : top + region, left : left + region].float().div_(255.0)
        if region != size:
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            x = x.clamp_(0.0, 1.0)
        # 3. Flip.
        if self.hflip and bool(torch.rand((), generator=gen) < 0.5):
            x = x.flip(-1)
        return x.contiguous()


def _resize_short_side(img: Tensor, short: int) -> Tensor:
    h, w = img.shape[-2:]
    if min(h, w) == short:
        return img
    scale = short / min(h, w)
    size = (max(short, round(h * scale)), max(short, round(w * scale)))
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` that yields ``(epoch, index)`` keys so the dataset can seed per epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (``DistributedSampler``'s rule), split
    across ``num_replicas`` ranks. Being a ``DistributedSampler``, Lightning neither replaces nor wraps it under
    DDP; :class:`ImageFolderDataModule` builds it with the trainer's world size and rank.

    Resuming mid-epoch: :meth:`state_dict` records the epoch and the batches the training loop has consumed
    (``progress()``, given by the data module); after :meth:`load_state_dict`, the next pass over that epoch
    skips those batches, so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, *args, batch_size: int = 1, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.progress = progress
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1] * self.batch_size
            self._resume = None
        for n, i in enumerate(super().__iter__()):
            if n >= skip:
                yield (epoch, int(i))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batches": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints and restores (its ``state_dict`` is its sampler's position)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


class ImageFolderDataModule(LightningDataModule):
    """Training and validation crops from a folder of images.

    The folder is searched recursively for the file types of :data:`diffpir.io.IMAGE_SUFFIXES` (:data:`IMAGE_KINDS`).

    Args:
        data_dir: folder of training images (searched recursively).
        val_dir: folder of validation images; if None, ``val_fraction`` of ``data_dir``'s images (whole images,
            chosen with a generator seeded by ``seed``) are held out instead.
        val_fraction: share of images held out when there is no ``val_dir`` (0: no validation).
        channels: 1 (grey) or 3 (RGB).
        crop_size: side of the square training images.
        patches_per_image: crops drawn from each training image per epoch (many for a few large photos).
        val_patches_per_image: crops per validation image (fixed across epochs; default ``patches_per_image``).
        resize_to: if set, resize every image so its shorter side is ``resize_to`` before cropping (set it equal
            to ``crop_size`` to train on whole, resized images).
        scale_range: random down-scaling of the training crops (see :class:`ImageCropDataset`); ``(1, 1)`` = off.
        hflip: random horizontal flips of the training crops.
        batch_size: training batch size per device. ``val_batch_size`` defaults to it.
        num_workers: DataLoader worker processes (0: load in the training process).
        seed: seed of the split, of the epoch orders and of every crop.
        cache_images: keep decoded images in memory (see :class:`ImageCropDataset`).
        check_images: decode every file in ``setup`` to skip unreadable ones and to fail on images smaller than
            the crop early. Off, failing files (unreadable or too small) are skipped during the run, with a warning.

    Attributes (after ``setup``): ``train_set``, ``val_set``, ``num_skipped`` (unreadable files skipped).
    """

    def __init__(
        self,
        data_dir: str,
        val_dir: str | None = None,
        val_fraction: float = 0.05,
        channels: Literal[1, 3] = 3,
        crop_size: int = 64,
        patches_per_image: int = 1,
        val_patches_per_image: int | None = None,
        resize_to: int | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        hflip: bool = True,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_images: bool = False,
        check_images: bool = True,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.val_dir = val_dir
        self.val_fraction = val_fraction
        self.channels = channels
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: ImageCropDataset | None = None
        self.val_set: ImageCropDataset | None = None

    @property
    def num_skipped(self) -> int:
        """Unreadable image files skipped (training and validation)."""
        return sum(len(ds.bad_files) for ds in (self.train_set, self.val_set) if ds is not None)

    def split_files(self) -> tuple[list[Path], list[Path]]:
        """The training and validation files (the held-out split is a seeded choice of whole images)."""
        files = list_images(self.data_dir)
        if not files:
            raise ValueError(
                f"no images ({IMAGE_KINDS}) found under {self.data_dir!r}; put training images there "
                f"(e.g. run scripts/prepare_data.py) or point data.data_dir at an image folder"
            )
        if self.val_dir is not None:
            val = list_images(self.val_dir)
            if not val:
                raise ValueError(f"no images ({IMAGE_KINDS}) found under val_dir {self.val_dir!r}")
            return files, val
        if self.val_fraction == 0:
            return files, []
        n_val = max(1, round(self.val_fraction * len(files)))
        if n_val >= len(files):
            raise ValueError(
                f"{self.data_dir!r} holds {len(files)} image(s): too few to hold out val_fraction="
                f"{self.val_fraction}; add images, give a val_dir, or set val_fraction: 0"
            )
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(mix_seed(self.seed, 7919)))
        val_idx = set(perm[:n_val].tolist())
        return [f for i, f in enumerate(files) if i not in val_idx], [f for i, f in enumerate(files) if i in val_idx]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train_files, val_files = self.split_files()
        common = dict(
            channels=hp.channels,
            crop_size=hp.crop_size,
            resize_to=hp.resize_to,
            cache=hp.cache_images,
            check=hp.check_images,
        )
        self.train_set = ImageCropDataset(
            train_files,
            patches_per_image=hp.patches_per_image,
            scale_range=tuple(hp.scale_range),
            random_crop=True,
            hflip=hp.hflip,
            seed=mix_seed(hp.seed, 1),
            name=f"training images in {self.data_dir}",
            **common,
        )
        if val_files:
            self.val_set = ImageCropDataset(
                val_files,
                patches_per_image=hp.val_patches_per_image or hp.patches_per_image,
                scale_range=tuple(hp.scale_range),
                random_crop=True,
                hflip=False,
                seed=mix_seed(hp.seed, 2),
                name=f"validation images in {self.val_dir or self.data_dir}",
                **common,
            )
        if self.num_skipped:
            log.warning("skipped %d unreadable image file(s) in total", self.num_skipped)
        rank_zero_info(
            f"data: {len(self.train_set.files)} training images x {self.train_set.patches_per_image} crops of "
            f"{self.crop_size} px, {len(self.val_set) if self.val_set is not None else 0} validation crops, "
            f"{self.num_skipped} unreadable file(s) skipped"
        )

    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.current_epoch

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        world, rank, epoch = self._world()
        if len(self.train_set) < self.batch_size * world:
            raise ValueError(
                f"{len(self.train_set)} training crops are fewer than one batch ({self.batch_size} x {world} "
                f"device(s)); raise patches_per_image or lower batch_size"
            )
        sampler = EpochSampler(
            self.train_set,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
            batch_size=self.batch_size,
            progress=self._batches_done,
        )
        # The epoch must be right before the loader's workers prefetch (resume starts mid-run).
        sampler.set_epoch(epoch)
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def _batches_done(self) -> int:
        """Training batches consumed in the current epoch (Lightning's progress counter), for checkpoints."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on one device (for planning)."""
        assert self.train_set is not None, "call setup() first"
        return math.floor(len(self.train_set) / self.batch_size)


__all__ = [
    "IMAGE_KINDS",
    "EpochSampler",
    "ImageCropDataset",
    "ImageFolderDataModule",
    "ResumableDataLoader",
    "list_images",
]
