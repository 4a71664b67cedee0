"""Shared test helpers: a tiny prior built from a ``torch.Generator`` and a quiet CPU Trainer.

Tests never seed the global RNG: :func:`tiny_unet` draws the network's initial weights from its own generator.
Fixtures: ``tiny_prior`` (a frozen tiny prior, one per test module) and ``prior_file`` (that prior exported once per
session). Plain functions for helpers that are not fixtures: ``from conftest import quiet_trainer, tiny_unet``
(``quiet_trainer`` comes from bench/benchlib.py, which the benchmarks share).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from torch import nn

from diffpir.models import build_unet
from diffpir.prior import Prior
from diffpir.priorfile import export_prior
from diffpir.schedule import NoiseSchedule

# The quiet Trainer is the benchmarks' (one CPU device; no logger, checkpoints, progress bar or model summary).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import QUIET, default_init, quiet_trainer  # noqa: E402

__all__ = [
    "Malicious",
    "QUIET",
    "default_init",
    "export_live_tiny_prior",
    "export_tiny_prior",
    "live_tiny_unet",
    "make_tiny_prior",
    "quiet_trainer",
    "tiny_unet",
]


def tiny_unet(seed: int = 0, **overrides) -> nn.Module:
    """The ``tiny`` preset (a few thousand parameters) with PyTorch's default initialisation drawn from a generator
    seeded ``seed`` (:func:`benchlib.default_init`): bitwise the weights ``torch.manual_seed(seed);
    build_unet("tiny")`` gives, without seeding the global RNG (tests/test_conftest.py checks this)."""
    return default_init(build_unet("tiny", **overrides), seed)


def make_tiny_prior(seed: int = 0, **overrides) -> Prior:
    """A :class:`Prior` of :func:`tiny_unet` on the linear 1000-step schedule (train mode, as built)."""
    return Prior(tiny_unet(seed, **overrides), NoiseSchedule.linear())


def export_tiny_prior(folder: Path, seed: int = 0, **overrides) -> Path:
    """:func:`make_tiny_prior` exported to ``folder/tiny.safetensors``; returns the file's path."""
    return export_prior(make_tiny_prior(seed, **overrides), None, Path(folder) / "tiny.safetensors")


def live_tiny_unet(seed: int = 0, **overrides) -> nn.Module:
    """:func:`tiny_unet` with the layers the UNet zero-initialises (the output head, the residual blocks' last
    convolutions) drawn too, from a generator seeded ``seed + 1``: a network whose eps depends on its input (the
    plain tiny net outputs 0 for any input), for tests whose claim needs a non-trivial network (batch and process
    invariance)."""
    import torch

    net = tiny_unet(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.3 / m.weight[0].numel() ** 0.5))
    return net


def export_live_tiny_prior(folder: Path, seed: int = 0, **overrides) -> Path:
    """:func:`live_tiny_unet` exported to ``folder/live.safetensors``; returns the file's path."""
    prior = Prior(live_tiny_unet(seed, **overrides), NoiseSchedule.linear())
    return export_prior(prior, None, Path(folder) / "live.safetensors")


class Malicious:
    """A pickle payload: unpickling it runs ``os.makedirs(marker)``, the visible sign that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def tiny_prior() -> Prior:
    """The tiny prior of seed 0, in eval mode and frozen; a fresh one per test module."""
    return make_tiny_prior().eval().requires_grad_(False)


@pytest.fixture(scope="session")
def prior_file(tmp_path_factory) -> Path:
    """The tiny prior of seed 0 exported once per session (read it, do not write over it)."""
    return export_tiny_prior(tmp_path_factory.mktemp("prior"))


@pytest.fixture(scope="session")
def live_prior_file(tmp_path_factory) -> Path:
    """:func:`export_live_tiny_prior` of seed 0, once per session: eps depends on the input."""
    return export_live_tiny_prior(tmp_path_factory.mktemp("live_prior"))
