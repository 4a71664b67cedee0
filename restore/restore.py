"""Restore images with DiffPIR: the restoration half's entry point (walk-through: restore/README.md).

  python restore/restore.py predict --config configs/restore/deblur_gaussian_fast.yaml    # bundled photos and prior
  python restore/restore.py predict --config configs/restore/sr_x4.yaml --data.images my/photos
  python restore/restore.py predict --config configs/restore/deblur_gaussian.yaml --data.mode real \\
      --data.images my/blurred --data.degradation.task deblur --data.degradation.kernel my/kernel.npy
  python restore/restore.py predict --config configs/restore/denoise.yaml --model.prior my_prior.safetensors
  python restore/restore.py predict --help                                                 # every option

Outputs go to --writer.output_dir (outputs/restore/<task>/ in the configs): restored/, degraded/, grid/,
metrics.csv, summary.json, tensorboard/. Run the same command again to resume: finished images are skipped.
This is the program of the ``diffpir-restore`` console script; from a checkout it also runs without installing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    if not (sys.argv[1:] if argv is None else argv):  # no subcommand: say what there is to run
        shipped = sorted(p.name for p in (ROOT / "configs" / "restore").glob("*.yaml"))
        print(__doc__.strip() + "\n\nConfigs in configs/restore/: " + ", ".join(shipped))
        return
    if importlib.util.find_spec("diffpir") is None:  # a checkout that is not installed
        sys.path.insert(0, str(ROOT))
    from diffpir.cli.restore import main as restore_main

    restore_main(argv)  # None: the CLI reads sys.argv itself


if __name__ == "__main__":
    main()
