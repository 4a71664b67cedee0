"""Sampler overhead: DiffPIR at N NFEs against N bare calls of the same network on the same batch.

    python bench/sampler_overhead.py [--size 256] [--steps 100] [--preset small] [--repeats 3]

Prints, per task, the median CPU seconds of both and the overhead in percent; writes
bench/results/sampler_overhead.json.
Timings are interleaved (bare, sampler, stub, bare, ...) so that machine noise hits all alike, and use the process's
CPU time (run it with one thread: --threads 1), which a busy machine disturbs far less than wall time. ``stub`` runs
the sampler with the network replaced by a function returning a precomputed eps: the sampler's own cost, measured
directly; ``overhead_direct`` = stub / bare.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from diffpir import DiffPIR, NoiseSchedule
from diffpir.models import build_unet
from diffpir.operators import (
    Bicubic,
    Blur,
    Denoise,
    Downsample,
    Inpaint,
    box_mask,
    gaussian_kernel,
    motion_kernel,
    random_mask,
)
from diffpir.prior import Prior

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc keep freed large blocks for reuse instead of returning them to the kernel.

    PyTorch on the CPU allocates and frees activation-sized buffers on every network call; by default glibc serves
    blocks above its (adaptive) mmap threshold with fresh pages, which the kernel then has to fault in and zero.
    Raising the mmap threshold to its maximum (32 MB on 64-bit) and the trim threshold makes repeated calls reuse
    memory. On the 2-core development machine the bare network loop of bench/sampler_overhead.py ran in 15-16.5 s
    with it against 17-18 s without (noisy, shared machine; opt in with --tune-malloc). A no-op returning False on
    anything but glibc. Peak memory is unchanged; freed memory is only returned to the system later.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    except (OSError, AttributeError):
        return False
    return bool(ok)


def tasks(size: int, g: torch.Generator) -> dict[str, tuple[object, float]]:
    return {
        "denoise": (Denoise(), 0.1),
        "inpaint_box": (Inpaint(box_mask(size, size, box=size // 2, margin=size // 16, generator=g)), 0.0),
        "inpaint_random": (Inpaint(random_mask(size, size, missing=0.8, generator=g)), 0.0),
        "deblur_gaussian": (Blur(gaussian_kernel(61, 3.0)), 0.05),
        "deblur_motion": (Blur(motion_kernel(61, 0.5, generator=g)), 0.05),
        "sr_x4_kernel": (Downsample(4, gaussian_kernel(13, 1.6)), 0.05),
        "sr_x4_bicubic": (Bicubic(4), 0.05),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune-malloc", action="store_true", help="tune_malloc() first (glibc)")
    ap.add_argument("--out", default="bench/results/sampler_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune_malloc:
        print(f"tune_malloc: {tune_malloc()}")
    clock = time.process_time if args.threads == 1 else time.perf_counter

    g = torch.Generator().manual_seed(0)
    schedule = NoiseSchedule.linear()
    net = build_unet(args.preset).eval()
    prior = Prior(net, schedule)
    x = torch.rand(args.batch, net.config["in_channels"], args.size, args.size, generator=g)
    sampler = DiffPIR(schedule, steps=args.steps, lambda_=7.0, zeta=0.3)
    nfe = sampler.nfe
    t_batch = torch.full((args.batch,), 500, dtype=torch.long)

    def bare() -> float:
        start = clock()
        with torch.no_grad():
            for _ in range(nfe):
                prior(x * 2 - 1, t_batch)
        return clock() - start

    with torch.no_grad():
        eps_fixed = prior(x * 2 - 1, t_batch)

    def stub_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_fixed.clone()

    rows = []
    all_tasks = tasks(args.size, g)
    unknown = sorted(set(args.tasks or []) - set(all_tasks))
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(all_tasks)}")
    for name in args.tasks or list(all_tasks):
        op, sigma_n = all_tasks[name]
        y = op(x) + sigma_n * torch.randn(op(x).shape, generator=g)

        def run(op=op, y=y, sigma_n=sigma_n, model=prior) -> float:
            start = clock()
            sampler(y, op, model, sigma_n=sigma_n, generator=torch.Generator().manual_seed(1))
            return clock() - start

        bare()  # warm-up
        run()
        b, s, st = [], [], []
        for _ in range(args.repeats):
            b.append(bare())
            s.append(run())
            st.append(run(model=stub_model))
        bm, sm, stm = statistics.median(b), statistics.median(s), statistics.median(st)
        row = {
            "task": name,
            "nfe": nfe,
            "bare_s": bm,
            "sampler_s": sm,
            "stub_s": stm,
            "overhead_pct": 100 * (sm - bm) / bm,
            "overhead_direct_pct": 100 * stm / bm,
        }
        rows.append(row)
        print(
            f"{name:16s} nfe={nfe}  bare {bm:7.2f} s  sampler {sm:7.2f} s  overhead {row['overhead_pct']:+6.2f} %"
            f"  (sampler alone {stm:6.3f} s = {row['overhead_direct_pct']:5.2f} %)"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": args.preset,
        "params": sum(p.numel() for p in net.parameters()),
        "size": args.size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "clock": "process_time" if clock is time.process_time else "perf_counter",
        "tune_malloc": args.tune_malloc,
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
