"""One import direction: no module under diffpir/ imports a module of a higher layer, not even inside a function.

Layers (docs/CONTRACTS.md, "Layers"): L0 core -> L1 prior/sampler -> L2 methods -> L3 restoration, training ->
L4 entry points. A module may import its own layer and the layers below. ``diffpir.restoration`` and
``diffpir.training`` are one layer and never import each other. A new module under diffpir/ must be classified in
:data:`LAYERS` before this test passes.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import diffpir

PACKAGE = Path(diffpir.__file__).resolve().parent

# Module-name prefix -> layer. A name matches a prefix when it is the prefix or starts with "prefix."; the longest
# matching prefix wins. The package root "diffpir" matches only itself (it imports L0 and re-exports lazily).
LAYERS: dict[str, int] = {
    # L0 core: no diffpir imports beyond L0
    "diffpir": 0,
    "diffpir.schedule": 0,
    "diffpir.io": 0,
    "diffpir.checkpoints": 0,
    "diffpir.metrics": 0,
    "diffpir.weights": 0,  # offline-weight provisioning of the metrics (LPIPS, Inception)
    "diffpir.models": 0,
    "diffpir.operators": 0,
    "diffpir.datasets": 0,
    "diffpir.prepare": 0,  # data preparation (Debian-package extraction) moved out of datasets.py
    "diffpir.seeding": 0,
    # L1: the prior and the sampler
    "diffpir.prior": 1,
    "diffpir.priorfile": 1,  # the prior file format (reader and writer)
    "diffpir.sampler": 1,
    "diffpir.tiling": 1,
    "diffpir.analytic": 1,
    # L2: the restoration methods
    "diffpir.methods": 2,
    # L3: the two halves
    "diffpir.restoration": 3,
    "diffpir.training": 3,
    # L4: entry points
    "diffpir.cli": 4,
}

# Packages of one layer that must not import each other either.
SEPARATE = [("diffpir.restoration", "diffpir.training")]

# Tolerated upward imports (importer, imported): none since issue 15 (the last one, sampler -> methods.classical for
# init="classical", became the caller's x_init). Keep it empty; an entry that no longer occurs fails a test below.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer_of(name: str) -> tuple[str, int] | None:
    """``(prefix, layer)`` of a module name under diffpir, or None when no prefix of :data:`LAYERS` matches."""
    if name == "diffpir":
        return "diffpir", LAYERS["diffpir"]
    best = max((p for p in LAYERS if p != "diffpir" and (name == p or name.startswith(p + "."))), key=len, default=None)
    return None if best is None else (best, LAYERS[best])


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _root_target(alias: str) -> str:
    """What ``from diffpir import alias`` reaches: a submodule, a lazily re-exported module, or the root itself."""
    if (PACKAGE / f"{alias}.py").is_file() or (PACKAGE / alias / "__init__.py").is_file():
        return f"diffpir.{alias}"
    lazy = getattr(diffpir, "_LAZY", {})
    return lazy[alias][0] if alias in lazy else "diffpir"


def imports_of(source: str, name: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every ``diffpir`` module that ``source`` (module ``name``) imports anywhere, with its line number."""
    found = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "diffpir"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "diffpir":
                continue
            if target == "diffpir":
                found += [(_root_target(a.name), node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return found


def violations(source: str, name: str, is_package: bool = False) -> list[str]:
    """The import-direction errors of one module, one line each (unclassified modules included)."""
    own = layer_of(name)
    if own is None:
        return [f"{name}: not in the layer map; classify it in LAYERS of tests/test_architecture.py"]
    errors = []
    for target, line in imports_of(source, name, is_package):
        theirs = layer_of(target)
        if theirs is None:
            errors.append(f"{name}:{line} imports {target}, which is not in the layer map; classify it in LAYERS")
        elif theirs[1] > own[1] and (name, target) not in KNOWN_UPWARD:
            errors.append(f"{name}:{line} (L{own[1]}) imports {target} (L{theirs[1]}): an upward import")
        elif any({own[0], theirs[0]} == set(pair) for pair in SEPARATE) and (name, target) not in KNOWN_UPWARD:
            errors.append(f"{name}:{line} imports {target}: {own[0]} and {theirs[0]} never import each other")
    return errors


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_layer_or_below():
    errors = []
    for path in _modules():
        errors += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not errors, "\n".join(errors)


def test_known_upward_imports_still_exist():
    """A fixed violation leaves KNOWN_UPWARD at once, so the allowance cannot hide a new one of the same pair."""
    seen = set()
    for path in _modules():
        name = module_name(path)
        seen |= {(name, t) for t, _ in imports_of(path.read_text(), name, path.name == "__init__.py")}
    assert not KNOWN_UPWARD - seen, f"fixed: remove {sorted(KNOWN_UPWARD - seen)} from KNOWN_UPWARD"


# -- the test catches what it should -----------------------------------------------------------------------
FAKE_OPERATOR = textwrap.dedent(
    """
    import torch
    from diffpir.schedule import NoiseSchedule
    from . import kernels

    def helper():
        from diffpir.restoration.tasks import Degradation  # inside a function: still counted
        return Degradation
    """
)


def test_an_upward_import_inside_a_function_is_caught():
    errors = violations(FAKE_OPERATOR, "diffpir.operators.fake")
    assert errors == ["diffpir.operators.fake:7 (L0) imports diffpir.restoration.tasks (L3): an upward import"]


@pytest.mark.parametrize(
    "source, name, message",
    [
        ("from .methods import DiffPIR\n", "diffpir.sampler", "imports diffpir.methods (L2): an upward import"),
        ("from ..cli import common\n", "diffpir.methods.base", "imports diffpir.cli (L4)"),
        ("from diffpir import DiffPIR\n", "diffpir.operators.blur", "imports diffpir.sampler (L1)"),
        ("import diffpir.training.module\n", "diffpir.restoration.module", "never import each other"),
        ("from diffpir.restoration import tasks\n", "diffpir.training.data", "never import each other"),
        ("import os\n", "diffpir.newthing", "not in the layer map; classify it in LAYERS"),
        ("from diffpir.newthing import x\n", "diffpir.io", "diffpir.newthing, which is not in the layer map"),
    ],
)
def test_violations_are_named(source, name, message):
    errors = violations(source, name)
    assert len(errors) == 1 and message in errors[0], errors


def test_allowed_imports_pass():
    ok = "from diffpir import NoiseSchedule\nfrom diffpir.operators import Blur\nfrom . import tasks\n"
    assert violations(ok, "diffpir.restoration.module") == []
    assert violations("from .base import Method\n", "diffpir.methods", is_package=True) == []
    assert imports_of("from .base import Method\n", "diffpir.methods", is_package=True) == [("diffpir.methods.base", 1)]
    assert layer_of("diffpir.methods.classical") == ("diffpir.methods", 2)
    assert layer_of("diffpir.prior") == ("diffpir.prior", 1) and layer_of("diffpir.priorfile") == (
        "diffpir.priorfile",
        1,
    )
