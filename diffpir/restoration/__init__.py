"""Restoration with DiffPIR under Lightning: a predict-only module, data for benchmark and real images, a writer,
TensorBoard trajectories and the ``diffpir-restore`` CLI (see ``docs/restoration.md``)."""

from diffpir.restoration.data import RestorationBatch, RestorationDataModule, RestorationDataset, collate
from diffpir.restoration.module import RestorationModule
from diffpir.restoration.tasks import TASKS, Degradation, build_operator, degrade, image_generator, stable_seed
from diffpir.restoration.trajectory import TrajectoryLogger
from diffpir.restoration.writer import RestorationWriter, merge_metrics

__all__ = [
    "TASKS",
    "Degradation",
    "RestorationBatch",
    "RestorationDataModule",
    "RestorationDataset",
    "RestorationModule",
    "RestorationWriter",
    "TrajectoryLogger",
    "build_operator",
    "collate",
    "degrade",
    "image_generator",
    "merge_metrics",
    "stable_seed",
]
