"""diffpir: diffusion-based plug-and-play image restoration (DiffPIR) with PyTorch Lightning.

Pixel ranges: public functions take and return images in [0, 1]; ``sigma_n`` is on the [0, 1] scale; networks
see [-1, 1] internally.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffpir.schedule import NoiseSchedule

__version__ = "0.1.0"

# Heavier parts load on first use, so `import diffpir` stays quick.
_LAZY = {
    "DiffPIR": ("diffpir.sampler", "DiffPIR"),
    "operators": ("diffpir.operators", None),
    "models": ("diffpir.models", None),
    "Prior": ("diffpir.prior", "Prior"),
    "load_prior": ("diffpir.priorfile", "load_prior"),
    "export_prior": ("diffpir.priorfile", "export_prior"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffpir' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["NoiseSchedule", "__version__", *_LAZY]
