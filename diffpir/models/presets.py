"""Named UNet configurations and :func:`build_unet`.

Official guided-diffusion priors (state_dict keys equal ``UNetModel``'s for these flags):

- ``ffhq_10m``: the FFHQ model of DPS / DiffPIR (``ffhq_10m.pt``), 93.6M params, attention at 16 px.
- ``imagenet_256_uncond``: ``256x256_diffusion_uncond.pt``, 552.8M params, attention at 32, 16, 8 px.

Both are "learn_sigma" nets (6 output channels: eps then the variance interpolation) tied to 256 x 256
inputs (attention). Our own presets predict eps only; all but ``small_attn`` are fully convolutional (no
attention, no middle attention), so they take any H, W divisible by ``2 ** (len(channel_mult) - 1)``:

========================  ========  ======  ========  ============================================
preset                    channels  native  params    role
========================  ========  ======  ========  ============================================
``tiny``                  RGB       32      11k       unit tests
``small``                 RGB       32      283k      quick experiments, integration tests
``small_attn``            RGB       32      ~0.3M     exercises attention (8 px) on a small net
``natural``               RGB       64      3.7M      natural-image prior trained on 64 x 64 patches
``digits``                grey      32      1.1M      handwritten-digit prior (32 x 32)
========================  ========  ======  ========  ============================================
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from diffpir.models.unet import UNet

__all__ = ["OFFICIAL_PRESETS", "PRESETS", "build_unet", "preset_config"]

_GUIDED_DIFFUSION_256 = {
    "image_size": 256,
    "in_channels": 3,
    "out_channels": 6,  # learn_sigma=True
    "channel_mult": [1, 1, 2, 2, 4, 4],  # guided-diffusion's default for 256 px (channel_mult="")
    "dropout": 0.1,
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "use_new_attention_order": False,
    "norm_groups": 32,
    "middle_attention": True,
}

# Fully convolutional eps-nets of our own.
_OURS = {
    "dropout": 0.0,
    "attention_resolutions": [],
    "middle_attention": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
}

_SMALL = {
    **_OURS,
    "image_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 16,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "norm_groups": 8,
}

PRESETS: dict[str, dict[str, Any]] = {
    "ffhq_10m": {
        **_GUIDED_DIFFUSION_256,
        "model_channels": 128,
        "num_res_blocks": 1,
        "attention_resolutions": [16],
    },
    "imagenet_256_uncond": {
        **_GUIDED_DIFFUSION_256,
        "model_channels": 256,
        "num_res_blocks": 2,
        "attention_resolutions": [32, 16, 8],
    },
    "tiny": {
        **_OURS,
        "image_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 4,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "norm_groups": 2,
    },
    "small": _SMALL,
    "small_attn": {
        **copy.deepcopy(_SMALL),
        "attention_resolutions": [8],
        "middle_attention": True,
        "num_head_channels": 16,
    },
    "natural": {
        **_OURS,
        "image_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 64,
        "channel_mult": [1, 1, 1, 2],
        "num_res_blocks": 1,
        "norm_groups": 32,
    },
    "digits": {
        **_OURS,
        "image_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "norm_groups": 32,
    },
}

OFFICIAL_PRESETS = ("ffhq_10m", "imagenet_256_uncond")
"""Presets whose weights come from guided-diffusion checkpoints (``.pt`` state dicts)."""


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``'s constructor kwargs; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def build_unet(preset_or_config: str | Mapping[str, Any], **overrides: Any) -> UNet:
    """Build a :class:`UNet` from a preset name or a config dict (e.g. ``net.config``) plus overrides.

    >>> build_unet("small", dropout=0.1).config["dropout"]
    0.1

    Build on the meta device (no memory, no init time) with ``with torch.device("meta"): build_unet(...)``.
    """
    if isinstance(preset_or_config, str):
        config = preset_config(preset_or_config)
    elif isinstance(preset_or_config, Mapping):
        config = copy.deepcopy(dict(preset_or_config))
    else:
        kind = type(preset_or_config).__name__
        raise TypeError(f"build_unet takes a preset name or a config dict, got {kind}")
    config.update(overrides)
    return UNet(**config)
