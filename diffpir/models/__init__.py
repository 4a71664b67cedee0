"""Denoising networks: the ADM / guided-diffusion UNet and its named presets."""

from __future__ import annotations

from diffpir.models.presets import OFFICIAL_PRESETS, PRESETS, build_unet, preset_config
from diffpir.models.unet import UNet, timestep_embedding

__all__ = ["OFFICIAL_PRESETS", "PRESETS", "UNet", "build_unet", "preset_config", "timestep_embedding"]
