"""Restore images with DiffPIR: a thin entry point for ``diffpir-restore`` (see restore/README.md).

python restore/restore.py predict --config configs/restore/deblur_gaussian.yaml
"""

from diffpir.cli.restore import main

if __name__ == "__main__":
    main()
