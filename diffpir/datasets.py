"""The demo photographs committed with the package (``diffpir/assets/samples/``, see ``SAMPLES.md``).

They are 256x256 centre crops of public-domain or CC0 photographs that Python packages ship, made by
:func:`diffpir.prepare.prepare_samples`; the offline training and evaluation datasets are prepared by
:mod:`diffpir.prepare` (``python scripts/prepare_data.py``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLES_DIR", "SAMPLE_NAMES", "sample_images"]

SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"
# The committed demo photographs (public domain or CC0 only): see diffpir/assets/SAMPLES.md.
SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "grace_hopper")


def sample_images() -> list[Path]:
    """The committed 256x256 RGB demo photographs (PNGs in the package), in :data:`SAMPLE_NAMES` order."""
    paths = [SAMPLES_DIR / f"{name}.png" for name in SAMPLE_NAMES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing sample images {missing} in {SAMPLES_DIR}; the package is incomplete")
    return paths
