"""What several bench scripts share: a quiet CPU Trainer, the machine description and the report file.

A script imports it after putting its own folder on ``sys.path`` (``python bench/x.py`` does; a script loaded by
path from a test does it itself). Lightning and torch are imported on first use, so a worker that measures memory
imports them when it did before.
"""

from __future__ import annotations

import json
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
