"""Train a diffusion prior for DiffPIR: the training half's entry point (walk-through: train/README.md).

  python train/train.py fit --config configs/train/smoke.yaml --data.data_dir my/images   # 4 steps on a CPU
  python train/train.py fit --config configs/train/natural.yaml                           # the bundled prior's run
  python train/train.py fit --config configs/train/natural.yaml --ckpt_path last          # resume it
  python train/train.py validate --config configs/train/natural.yaml --ckpt_path runs/natural/checkpoints/last.ckpt
  python train/train.py export --ckpt runs/natural/checkpoints/last.ckpt --out my_prior.safetensors [--fp16]
  python train/train.py fit --help                                                        # every option

Runs go to runs/<name>/: TensorBoard logs in version_*/, checkpoints in checkpoints/ (last.ckpt for resuming).
The exported file is what restore/restore.py takes as --model.prior. This is the program of the ``diffpir-train``
console script; from a checkout it also runs without installing the package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    if not (sys.argv[1:] if argv is None else argv):  # no subcommand: say what there is to run
        shipped = sorted(p.name for p in (ROOT / "configs" / "train").glob("*.yaml"))
        print(__doc__.strip() + "\n\nConfigs in configs/train/: " + ", ".join(shipped))
        return
    if importlib.util.find_spec("diffpir") is None:  # a checkout that is not installed
        sys.path.insert(0, str(ROOT))
    from diffpir.cli.train import main as train_main

    train_main(argv)  # None: the CLI reads sys.argv itself


if __name__ == "__main__":
    main()
