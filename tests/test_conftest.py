"""The shared helpers of tests/conftest.py do what they promise."""

from __future__ import annotations

import pytest
import torch
from conftest import QUIET, default_init, quiet_trainer, tiny_unet

from diffpir.models import build_unet


@pytest.mark.parametrize("overrides", [{}, {"in_channels": 1, "out_channels": 1}])
def test_tiny_unet_from_a_generator_equals_the_global_seed_build(overrides):
    """The tests' tiny prior keeps the weights it had when the tests seeded the global RNG with 0."""
    with torch.random.fork_rng():  # the one place a test seeds the global RNG: to show the helper replaces it
        torch.manual_seed(0)
        legacy = build_unet("tiny", **overrides).state_dict()
    ours = tiny_unet(0, **overrides).state_dict()
    assert list(ours) == list(legacy) and all(torch.equal(ours[k], legacy[k]) for k in legacy)
    assert sum(v.numel() for v in ours.values()) < 20_000  # tiny
    zeros = [k for k, v in ours.items() if v.is_floating_point() and not v.any()]
    assert zeros and all(not legacy[k].any() for k in zeros)  # the zero-initialised heads stay zero
    other = tiny_unet(1, **overrides).state_dict()
    assert not torch.equal(other["input_blocks.0.0.weight"], ours["input_blocks.0.0.weight"])


def test_tiny_unet_is_the_same_whatever_the_global_rng_state():
    a = tiny_unet(3).state_dict()
    torch.rand(1000)  # move the global RNG on
    b = tiny_unet(3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quiet_trainer_options_and_overrides():
    trainer = quiet_trainer(max_steps=3)
    assert trainer.max_steps == 3 and trainer.logger is None and trainer.checkpoint_callback is None
    assert trainer.progress_bar_callback is None and QUIET["accelerator"] == "cpu"
    assert not any(type(c).__name__ == "ModelSummary" for c in trainer.callbacks)
    assert quiet_trainer(enable_checkpointing=True).checkpoint_callback is not None


def test_default_init_of_the_benchmarks_preset_equals_the_global_seed_build():
    """bench/restore_throughput.py's default prior ("small", with attention) keeps its weights too."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        legacy = build_unet("small").state_dict()
    ours = default_init(build_unet("small"), 0).state_dict()
    assert all(torch.equal(ours[k], legacy[k]) for k in legacy)
