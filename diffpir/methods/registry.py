"""``METHODS``: every restoration method by name, and :func:`build_method`."""

from __future__ import annotations

import inspect
from typing import Any

from diffpir.methods import blind, classical, ddnm, diffpir_method, dpir, dps
from diffpir.methods.base import Method

__all__ = ["METHODS", "build_method", "method_parameters"]


def _named_subclasses(cls: type[Method]) -> list[type[Method]]:
    out = []
    for sub in cls.__subclasses__():
        out += ([sub] if sub.name and sub.__module__.startswith("diffpir.") else []) + _named_subclasses(sub)
    return out


# The modules whose Method subclasses make up METHODS, in the order tables and CLIs list them (within a module:
# the order of definition).
_MODULES = [m.__name__ for m in (diffpir_method, dps, ddnm, dpir, classical, blind)]


def _listing_order(cls: type[Method]) -> int:
    return _MODULES.index(cls.__module__) if cls.__module__ in _MODULES else len(_MODULES)


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in sorted(_named_subclasses(Method), key=_listing_order)  # sorted() is stable
}
"""Every restoration method of :mod:`diffpir.methods` by its ``name`` (derived from the classes, not kept by hand)."""


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
