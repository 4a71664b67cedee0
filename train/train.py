"""Train a diffusion prior: a thin entry point for ``diffpir-train`` (see train/README.md).

Example: ``python train/train.py fit --config configs/train/digits.yaml``.
"""

from diffpir.cli.train import main

if __name__ == "__main__":
    main()
