"""Pretrained baselines for comparison with DiffPIR (no diffusion prior): the FFDNet Gaussian denoiser."""

from diffpir.baselines.ffdnet import FFDNet, ffdnet_available, ffdnet_weights_path, load_ffdnet

__all__ = ["FFDNet", "ffdnet_available", "ffdnet_weights_path", "load_ffdnet"]
