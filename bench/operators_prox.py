"""Time one ``prox`` call of each operator at the paper's size (``[1, 3, 256, 256]``, float32).

The sampler calls ``prox`` once per step (100 steps per image); its budget is < 5% of 100 UNet calls.
Usage: ``python bench/operators_prox.py [--device cuda] [--batch 1] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffpir.operators import (
    Bicubic,
    Blur,
    Denoise,
    Downsample,
    Inpaint,
    box_mask,
    gaussian_kernel,
    motion_kernel,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    ops = {
        "denoise": Denoise(),
        "inpaint_box": Inpaint(box_mask(256, 256, generator=0)),
        "blur_gaussian61": Blur(gaussian_kernel(61, 3.0)),
        "blur_motion61": Blur(motion_kernel(61, 0.5, generator=0)),
        "sr4_kernel": Downsample(4, gaussian_kernel(13, 1.6)),
        "sr4_bicubic": Bicubic(4),
    }
    x = torch.rand(args.batch, 3, 256, 256, generator=g).to(device)
    for name, op in ops.items():
        op = op.to(device)
        y = op(x)
        op.prox(x, y, 0.5)  # warm-up: caches the transfer function / eigendecomposition
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            op.prox(x, y, 0.5)
        _sync(device)
        ms = (time.perf_counter() - t0) / args.repeats * 1e3
        print(f"{name:16s} {ms:8.3f} ms / prox call  (batch {args.batch}, {device})")


if __name__ == "__main__":
    main()
