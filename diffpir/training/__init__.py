"""Training diffusion priors with PyTorch Lightning: the module, the image-folder data, EMA, callbacks, CLI."""

from __future__ import annotations

from diffpir.training.callbacks import ModelCheckpoint, ProgressLogCallback, SampleGridCallback, ddim_sample
from diffpir.training.data import EpochSampler, ImageCropDataset, ImageFolderDataModule, list_images
from diffpir.training.ema import EMA
from diffpir.training.module import DiffusionModule

__all__ = [
    "EMA",
    "DiffusionModule",
    "EpochSampler",
    "ImageCropDataset",
    "ImageFolderDataModule",
    "ModelCheckpoint",
    "ProgressLogCallback",
    "SampleGridCallback",
    "ddim_sample",
    "list_images",
]
