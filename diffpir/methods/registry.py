"""``METHODS``: every restoration method by name, and :func:`build_method`."""

from __future__ import annotations

import inspect
from typing import Any

from diffpir.methods.base import Method
from diffpir.methods.blind import BlindDiffPIR
from diffpir.methods.classical import Classical
from diffpir.methods.ddnm import DDNM
from diffpir.methods.diffpir_method import DiffPIRMethod
from diffpir.methods.dpir import DPIR, DPIRFFDNet
from diffpir.methods.dps import DPS

__all__ = ["METHODS", "build_method", "method_parameters"]

METHODS: dict[str, type[Method]] = {
    "diffpir": DiffPIRMethod,
    "dps": DPS,
    "ddnm": DDNM,
    "dpir": DPIR,
    "dpir_ffdnet": DPIRFFDNet,
    "classical": Classical,
    "blind_diffpir": BlindDiffPIR,
}


def method_parameters(name: str) -> set[str]:
    """The keyword arguments the method ``name`` takes."""
    _check(name)
    return set(inspect.signature(METHODS[name]).parameters)


def _check(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")


def build_method(name: str, **kwargs: Any) -> Method:
    """``METHODS[name](**kwargs)``, with a ``ValueError`` naming the arguments the method does not take."""
    _check(name)
    unknown = set(kwargs) - method_parameters(name)
    if unknown:
        raise ValueError(
            f"method {name!r} takes no argument(s) {sorted(unknown)}; it takes {sorted(method_parameters(name))}"
        )
    return METHODS[name](**kwargs)
