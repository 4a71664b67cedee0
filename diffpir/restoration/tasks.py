"""Degradation specs: from a task description to per-image operator parameters, operators and measurements.

A :class:`Degradation` names a task and its parameters. Two uses:

- benchmark mode: :func:`synthesize_params` draws the per-image parameters (blur kernel, inpainting mask) from a
  generator seeded by ``(seed, image key)`` and :func:`degrade` makes ``y = H(x) + sigma_n n`` deterministically;
- real mode: :func:`load_params` reads the known parameters (kernel file, mask image) for a measured ``y``.

Either way :func:`build_operator` turns parameters stacked over a batch (kernels ``[N, kh, kw]``, masks
``[N, 1, H, W]``) into one batched :class:`~diffpir.operators.Operator`.

Ranges: images in [0, 1]; ``sigma_n`` is the noise std on the [0, 1] scale (the paper's "std 2 sigma_n on
[-1, 1]").
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from diffpir.io import IMAGE_SUFFIXES
from diffpir.operators import (
    Bicubic,
    BlindBlur,
    Blur,
    Denoise,
    Downsample,
    Inpaint,
    Operator,
    box_mask,
    gaussian_kernel,
    load_kernel,
    load_mask,
    motion_kernel,
    random_mask,
)
from diffpir.seeding import mix_seed

__all__ = [
    "TASKS",
    "Degradation",
    "Task",
    "build_operator",
    "check_run",
    "degrade",
    "image_generator",
    "load_params",
    "stable_seed",
    "synthesize_params",
]

Task = Literal[
    "deblur_gaussian",
    "deblur_motion",
    "deblur",
    "deblur_blind",
    "sr_x4",
    "sr",
    "inpaint_box",
    "inpaint_random",
    "inpaint_mask",
    "denoise",
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]
SIGMA_N_MAX = 255.0
"""Largest accepted ``sigma_n``. It is on the [0, 1] scale: values above 1 are accepted with a warning (most likely a
0-255 value given by mistake; the warning gives the [0, 1] value), values above 255 are refused (no noise std on any
scale; 1e300 would only overflow)."""
_PARAM_SUFFIXES = (".npy", ".pt", ".pth", *IMAGE_SUFFIXES)


def stable_seed(*parts: object) -> int:
    """``mix_seed(*parts, text=True)``: a 63-bit seed from the string forms of ``parts`` (e.g. ``(seed, key,
    "noise")``), stable across runs, processes and machines (see :mod:`diffpir.seeding`)."""
    return mix_seed(*parts, text=True)


def image_generator(seed: int, key: str, purpose: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, key, purpose)``: one independent stream per image and use
    (``"operator"`` for kernels and masks, ``"noise"`` for the measurement noise, ``"sample"`` for the sampler)."""
    return torch.Generator().manual_seed(stable_seed(seed, key, purpose))


@dataclass
class Degradation:
    """A degradation task and its parameters (the paper's protocol by default).

    Attributes:
        task: ``deblur_gaussian`` (Gaussian kernel ``kernel_size``, std ``kernel_std``), ``deblur_motion`` (random
            camera-shake kernel, ``motion_intensity``), ``deblur`` (the kernel file(s) in ``kernel``),
            ``deblur_blind`` (a camera-shake kernel of at most ``kernel_size`` as ``deblur_motion``, unknown to the
            method: its operator is a :class:`~diffpir.operators.BlindBlur`; in real mode ``kernel``, when given,
            is the true kernel, for metrics only), ``sr_x4`` /
            ``sr`` (downsampling by ``scale``, 4 for ``sr_x4``; ``sr_kernel`` says how), ``inpaint_box`` (one
            missing ``box``), ``inpaint_random`` (pixels missing with probability ``missing``), ``inpaint_mask``
            (the mask file(s) in ``mask``) or ``denoise``.
        sigma_n: measurement noise std on the [0, 1] scale (added in benchmark mode, assumed in both modes), in
            [0, 1].
        kernel_size: odd size of generated kernels (the paper: 61).
        kernel_std: Gaussian std in pixels (the paper: 3.0).
        kernel_std_max: when set, each image's std is drawn uniformly from ``[kernel_std, kernel_std_max)`` (the
            official code draws ``3 * U[1, 3)``, i.e. 3.0 .. 9.0).
        motion_intensity: camera-shake intensity in [0, 1] (the paper: 0.5).
        kernel: a kernel file (``.npy``, ``.pt``, image) shared by all images, or a folder of per-image kernels
            named ``<key>.<suffix>``. Replaces the generated kernel of the blur and ``sr_kernel="kernel"`` tasks.
        scale: integer downsampling factor of ``sr`` (at least 1).
        sr_kernel: ``"bicubic"`` (MATLAB-style bicubic downsampling, the paper's protocol) or ``"kernel"``
            (blur by the Gaussian ``kernel_size``/``kernel_std``, or ``kernel``, then keep every ``scale``-th pixel).
        sr_data_step: the data step of bicubic SR: ``"exact"`` (the exact solution for the bicubic downsampling)
            or ``"kernel"`` (the official code's closed form with a bicubic blur kernel, exact away from the borders
            only; see :class:`~diffpir.operators.Bicubic`).
        box: side of the missing box (None: half the image's short side, 128 on 256x256 as in the paper).
        margin: least distance of the box to the border (None: 1/16 of the short side, 16 on 256x256).
        missing: fraction of pixels missing in ``inpaint_random`` (shared by the channels).
        mask: a mask image (white = known, black = missing) shared by all images, or a folder of per-image masks
            named ``<key>.<suffix>``; required by ``inpaint_mask`` and by inpainting in real mode.
    """

    task: Task = "deblur_gaussian"
    sigma_n: float = 0.05
    kernel_size: int = 61
    kernel_std: float = 3.0
    kernel_std_max: float | None = None
    motion_intensity: float = 0.5
    kernel: str | None = None
    scale: int = 4
    sr_kernel: Literal["bicubic", "kernel"] = "bicubic"
    sr_data_step: Literal["exact", "kernel"] = "exact"
    box: int | None = None
    margin: int | None = None
    missing: float = 0.5
    mask: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if not self.sigma_n >= 0:  # also refuses NaN
            raise ValueError(f"sigma_n must be a number >= 0, got {self.sigma_n}")
        if not self.sigma_n <= SIGMA_N_MAX:
            raise ValueError(
                f"sigma_n must lie in [0, 1] (the noise std on the [0, 1] scale, e.g. 0.05 for "
                f"12.75/255), got {self.sigma_n}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be an integer >= 1 (the SR factor), got {self.scale!r}")
        if self.task == "sr_x4" and self.scale != 4:
            raise ValueError(f"task 'sr_x4' has scale 4, got scale={self.scale}: use task 'sr' for other scales")
        if self.task == "deblur" and self.kernel is None:
            raise ValueError("task 'deblur' needs a kernel file or folder: set kernel")
        if self.task == "inpaint_mask" and self.mask is None:
            raise ValueError("task 'inpaint_mask' needs a mask image or folder: set mask")
        if self.sr_kernel not in ("bicubic", "kernel"):
            raise ValueError(f"sr_kernel must be 'bicubic' or 'kernel', got {self.sr_kernel!r}")
        if self.sr_data_step not in ("exact", "kernel"):
            raise ValueError(f"sr_data_step must be 'exact' or 'kernel', got {self.sr_data_step!r}")
        if self.kernel_std_max is not None and self.kernel_std_max < self.kernel_std:
            raise ValueError(f"kernel_std_max={self.kernel_std_max} is below kernel_std={self.kernel_std}")
        # What concerns every image is checked here, once, before any model or image is loaded.
        if not 0.0 <= self.missing <= 1.0:
            raise ValueError(f"missing must be a fraction in [0, 1], got {self.missing}")
        if not 0.0 <= self.motion_intensity <= 1.0:
            raise ValueError(f"motion_intensity must lie in [0, 1], got {self.motion_intensity}")
        generated = self.uses_kernel and self.kernel is None
        if generated and (isinstance(self.kernel_size, bool) or self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd number of pixels (e.g. 61), got {self.kernel_size}")
        if generated and self.task == "deblur_motion" and self.kernel_size < 9:
            raise ValueError(f"kernel_size of a motion kernel must be at least 9, got {self.kernel_size}")
        if self.uses_kernel and self.kernel is not None:
            _check_param_path(self.kernel, "kernel")
        if self.family == "inpaint" and self.mask is not None:
            _check_param_path(self.mask, "mask")
        if self.sigma_n > 1.0:
            warnings.warn(
                f"sigma_n={self.sigma_n:g} is far above 1: sigma_n is on the [0, 1] scale; for a 0-255 noise level "
                f"give it divided by 255 (e.g. {self.sigma_n:g}/255 = {self.sigma_n / 255:.4g})",
                UserWarning,
                stacklevel=3,
            )

    # -- what the task is made of -----------------------------------------------------------------------------
    @property
    def family(self) -> Literal["blur", "sr", "inpaint", "denoise"]:
        """The operator family: ``blur``, ``sr``, ``inpaint`` or ``denoise``."""
        if self.task.startswith("deblur"):
            return "blur"
        if self.task.startswith("sr"):
            return "sr"
        if self.task.startswith("inpaint"):
            return "inpaint"
        return "denoise"

    @property
    def uses_kernel(self) -> bool:
        return self.family == "blur" or (self.family == "sr" and self.sr_kernel == "kernel")

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (the SR scale; 1 otherwise)."""
        return self.scale if self.family == "sr" else 1

    def to_dict(self) -> dict:
        """The spec as a dict of primitive values."""
        return asdict(self)


def _check_param_path(path: str, what: str) -> None:
    """A kernel/mask setting must name an existing file of a readable type, or a folder."""
    p = Path(path)
    if p.is_dir():
        return
    if not p.exists():
        raise ValueError(f"{what} {path!r} does not exist: give a file or a folder of per-image {what}s")
    if p.suffix.lower() not in _PARAM_SUFFIXES:
        raise ValueError(
            f"{what} {path!r} has an unreadable type {p.suffix or '(none)'!r}: use .npy, .pt/.pth or an image "
            f"({', '.join(s for s in _PARAM_SUFFIXES if s not in ('.npy', '.pt', '.pth'))})"
        )


def check_run(spec: Degradation, mode: str) -> None:
    """What a whole run needs from ``spec`` in ``mode`` (real mode: the mask of inpainting, the kernel of a random
    blur); raises ``ValueError`` naming the setting."""
    if mode != "real":
        return
    if spec.family == "inpaint" and spec.mask is None:
        raise ValueError(
            f"real mode with task {spec.task!r} needs the mask of the missing pixels: "
            "--data.degradation.mask IMAGE_OR_FOLDER"
        )
    if spec.uses_kernel and spec.kernel is None and (spec.task == "deblur_motion" or spec.kernel_std_max is not None):
        fixed = " (or --data.degradation.kernel_std_max null for the fixed Gaussian of kernel_std)"
        raise ValueError(
            f"real mode with task {spec.task!r} needs the blur kernel: --data.degradation.kernel FILE_OR_FOLDER"
            + (fixed if spec.task != "deblur_motion" else "")
        )


def _per_key_file(path: str, key: str, what: str) -> Path:
    """``path`` itself when it is a file, else ``<path>/<key>.<suffix>`` (the first suffix that exists)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"{what} {path!r} is neither a file nor a folder")
    for suffix in _PARAM_SUFFIXES:
        cand = p / f"{key}{suffix}"
        if cand.is_file():
            return cand
    raise ValueError(f"no {what} for image {key!r} in folder {path!r} (looked for {key}.<npy|pt|png|...>)")


def _kernel(spec: Degradation, key: str, g: torch.Generator) -> Tensor:
    if spec.kernel is not None:
        return load_kernel(_per_key_file(spec.kernel, key, "kernel"))
    if spec.task in ("deblur_motion", "deblur_blind"):
        return motion_kernel(spec.kernel_size, spec.motion_intensity, generator=g)
    std = spec.kernel_std
    if spec.kernel_std_max is not None:
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        std = spec.kernel_std + (spec.kernel_std_max - spec.kernel_std) * u
    return gaussian_kernel(spec.kernel_size, std)


def _box_geometry(spec: Degradation, h: int, w: int) -> tuple[int, int]:
    short = min(h, w)
    box = spec.box if spec.box is not None else short // 2
    margin = spec.margin if spec.margin is not None else short // 16
    return box, margin


def synthesize_params(
    spec: Degradation, key: str, h: int, w: int, seed: int, full: tuple[int, int] | None = None
) -> dict[str, Tensor]:
    """Benchmark mode: the operator parameters of one image of size ``h x w``, drawn from a generator seeded by
    ``(seed, key, "operator")``: ``{"kernel": [kh, kw]}``, ``{"mask": [1, h, w]}`` or ``{}``. ``full``: the size
    ``(H, W)`` of the image file when ``h x w`` is its centre crop (``data.crop``); a user mask of that size is
    centre-cropped with it."""
    g = image_generator(seed, key, "operator")
    if spec.uses_kernel:
        return {"kernel": _kernel(spec, key, g)}
    if spec.task == "inpaint_box":
        box, margin = _box_geometry(spec, h, w)
        return {"mask": box_mask(h, w, box, margin, generator=g)}
    if spec.task == "inpaint_random":
        return {"mask": random_mask(h, w, spec.missing, generator=g)}
    if spec.task == "inpaint_mask":
        return {"mask": _load_mask(spec, key, h, w, full)}
    return {}


def load_params(spec: Degradation, key: str, h: int, w: int) -> dict[str, Tensor]:
    """Real mode: the known operator parameters of one measured image whose restoration is ``h x w``.

    Blur with a random kernel (``deblur_motion``, or a Gaussian with ``kernel_std_max``) needs ``kernel``;
    inpainting needs ``mask``. Raises ``ValueError`` saying what is missing.
    """
    if spec.task == "deblur_blind":  # the kernel is unknown; a given one is the truth for metrics
        return {} if spec.kernel is None else {"kernel": load_kernel(_per_key_file(spec.kernel, key, "kernel"))}
    if spec.uses_kernel:
        if spec.kernel is None and (spec.task == "deblur_motion" or spec.kernel_std_max is not None):
            raise ValueError(f"real mode with task {spec.task!r} needs the blur kernel: set kernel to a file or folder")
        return {"kernel": _kernel(spec, key, torch.Generator().manual_seed(0))}
    if spec.family == "inpaint":
        if spec.mask is None:
            raise ValueError(f"real mode with task {spec.task!r} needs the mask: set mask to an image or folder")
        return {"mask": _load_mask(spec, key, h, w)}
    return {}


def _load_mask(spec: Degradation, key: str, h: int, w: int, full: tuple[int, int] | None = None) -> Tensor:
    """The mask of image ``key``, which must be ``w x h`` (width x height, like image viewers), or the image file's
    size ``full`` when ``h x w`` is its centre crop (then the mask is cropped alike)."""
    path = _per_key_file(spec.mask, key, "mask")
    mask = load_mask(path)
    mh, mw = mask.shape[-2:]
    if full is not None and (mh, mw) == tuple(full) and (mh, mw) != (h, w):
        top, left = (mh - h) // 2, (mw - w) // 2  # the image's centre crop (data.crop)
        mask = mask[..., top : top + h, left : left + w].contiguous()
    if tuple(mask.shape[-2:]) != (h, w):
        cropped = f" (its centre crop: data.crop; the file is {full[1]}x{full[0]})" if full and full != (h, w) else ""
        raise ValueError(
            f"mask {str(path)!r} is {mw}x{mh} (width x height) but the image is {w}x{h}{cropped}: "
            f"resize the mask (or the image) to match"
        )
    return mask


def build_operator(spec: Degradation, params: dict[str, Tensor]) -> Operator:
    """The batched operator for parameters stacked over a batch (``kernel`` ``[N, kh, kw]``, ``mask``
    ``[N, 1, H, W]``; absent for bicubic SR and denoising).
    """
    fam = spec.family
    if spec.task == "deblur_blind":  # the method sees only the support size, never the true kernel
        return BlindBlur(spec.kernel_size)
    if fam == "blur":
        return Blur(params["kernel"])
    if fam == "sr":
        if spec.sr_kernel == "bicubic":
            return Bicubic(spec.scale, data_step=spec.sr_data_step)
        return Downsample(spec.scale, params["kernel"])
    if fam == "inpaint":
        return Inpaint(params["mask"])
    return Denoise()


@torch.no_grad()
def degrade(spec: Degradation, x: Tensor, params: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """Benchmark mode: ``y = H(x) + sigma_n n`` for one image ``x`` ``[C, H, W]`` in [0, 1], with ``n`` drawn
    from ``generator``. ``y`` is not clipped (a measurement, not a picture)."""
    if spec.task == "deblur_blind":
        op = Blur(params["kernel"][None])  # the hidden true kernel
    else:
        op = build_operator(spec, {k: v[None] for k, v in params.items()})
    y = op(x[None].float())[0]
    if spec.sigma_n > 0:
        y = y + spec.sigma_n * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    return y
