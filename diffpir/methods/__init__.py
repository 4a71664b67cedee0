"""Restoration methods to compare DiffPIR with, behind one interface (:class:`Method`).

``method(y, op, prior, sigma_n, generator) -> x`` with ``method.nfe``; ``METHODS`` maps names to classes:

- ``diffpir``: DiffPIR itself (:class:`DiffPIRMethod`, a wrapper of :class:`~diffpir.sampler.DiffPIR`);
- ``dps``: diffusion posterior sampling (Chung et al. 2023), gradients through the network (:class:`DPS`);
- ``ddnm``: DDNM/DDNM+ range-null-space sampling (Wang et al. 2023), pseudo-inverse by the operator's prox
  (:class:`DDNM`);
- ``dpir``: DPIR-style plug-and-play HQS with the diffusion prior's denoiser (:class:`DPIR`);
- ``dpir_ffdnet``: the same HQS with the pretrained FFDNet (:class:`DPIRFFDNet`, :func:`load_ffdnet`);
- ``classical``: Wiener deconvolution, bicubic upsampling, harmonic fill, SURE-tuned smoothing (:class:`Classical`);
- ``blind_diffpir``: blind deblurring, DiffPIR with the kernel estimated alongside the image (:class:`BlindDiffPIR`,
  ``solve`` returns the image and the kernel).
"""

from diffpir.methods.base import Method, eps_denoiser, prior_denoiser
from diffpir.methods.blind import BlindDiffPIR, BlindResult, estimate_kernel, kernel_ncc
from diffpir.methods.classical import Classical, gaussian_smooth, harmonic_fill, wiener_deconvolve
from diffpir.methods.ddnm import DDNM
from diffpir.methods.diffpir_method import DiffPIRMethod, classical_start
from diffpir.methods.dpir import DPIR, DPIRFFDNet, hqs_schedule
from diffpir.methods.dps import DPS, respaced_timesteps
from diffpir.methods.ffdnet import FFDNet, ffdnet_available, ffdnet_weights_path, load_ffdnet
from diffpir.methods.registry import METHODS, build_method, method_parameters

__all__ = [
    "DDNM",
    "BlindDiffPIR",
    "BlindResult",
    "DPIR",
    "DPIRFFDNet",
    "DPS",
    "METHODS",
    "Classical",
    "DiffPIRMethod",
    "FFDNet",
    "Method",
    "build_method",
    "classical_start",
    "eps_denoiser",
    "estimate_kernel",
    "ffdnet_available",
    "ffdnet_weights_path",
    "gaussian_smooth",
    "harmonic_fill",
    "hqs_schedule",
    "kernel_ncc",
    "load_ffdnet",
    "method_parameters",
    "prior_denoiser",
    "respaced_timesteps",
    "wiener_deconvolve",
]
