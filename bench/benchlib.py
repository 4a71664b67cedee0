"""What several bench scripts (and tests/conftest.py) share: a quiet CPU Trainer, seeded default weights, the
machine description and the report file.

A script imports it after putting its own folder on ``sys.path`` (``python bench/x.py`` does; a script loaded by
path from a test does it itself). Lightning and torch are imported on first use, so a worker that measures memory
imports them when it did before.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""One CPU device; no logger, checkpoints, progress bar or model summary (any of them overridable)."""


def quiet_trainer(**overrides: Any):
    """A ``lightning.Trainer`` with the :data:`QUIET` options, any of which ``overrides`` replaces."""
    import lightning as L

    return L.Trainer(**{**QUIET, **overrides})


def default_init(net, seed: int = 0):
    """Re-draw ``net``'s ``Conv2d``/``Linear`` parameters as their ``reset_parameters`` does, from a generator seeded
    ``seed``; returns ``net``.

    Modules are visited in registration order, which for the UNet presets is their construction order, so the
    weights are bitwise those of ``torch.manual_seed(seed)`` before building the net, without touching the global
    RNG. Layers the net zero-initialises (output heads) stay zero; GroupNorm draws nothing.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            zero = not m.weight.any() and (m.bias is None or not m.bias.any())
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            if m.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=g)
            if zero:
                for p in m.parameters():
                    p.zero_()
    return net


def machine(threads: int = 0) -> dict[str, Any]:
    """The machine a figure was measured on: CPU count, torch threads (``threads`` when set), versions."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write ``report`` as indented JSON to ``out`` (folders created) and print it; returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report
