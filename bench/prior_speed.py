"""Prior forward speed and peak memory per UNet preset, at each preset's native size, batch 1 and 8.

    python bench/prior_speed.py [--quick] [--full] [--device cpu|cuda] [--amp] [--presets tiny natural ...]

Each (preset, batch) runs in its own subprocess, so memory figures do not mix: on the CPU the peak is the
growth of the process's max RSS (``resource.getrusage``) during the forwards, over what building the net took;
on CUDA it is ``torch.cuda.max_memory_allocated`` during the forwards minus the weights. Times are the median
and the minimum of the timed forwards (``Prior.eps`` under ``torch.inference_mode``) after one warm-up, at
least ``--repeats`` of them and more until ``--min-time`` seconds have passed (machine noise on shared CPUs
makes the minimum the steadier figure; on an oversubscribed CPU ``--threads 1`` avoids OpenMP threads
waiting on each other, which can slow small nets a hundredfold).

Default on the CPU (about 2-3 minutes on 2 cores): every preset at batch 1 and 8, except the official
guided-diffusion nets (``ffhq_10m`` 388 GFLOPs, ``imagenet_256_uncond`` 2240 GFLOPs per 256 x 256 forward),
which run at batch 1 with no warm-up and one timed forward. ``--quick`` leaves the official nets out;
``--full`` also runs them at batch 8. Writes bench/results/prior_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OFFICIAL = ("ffhq_10m", "imagenet_256_uncond")


def worker(preset: str, batch: int, device: str, repeats: int, warmup: int, min_time: float, amp: bool) -> dict:
    """Build ``preset`` (seeded weights, no init cost: meta then ``to_empty``), time its forwards."""
    from diffpir import NoiseSchedule
    from diffpir.models import build_unet
    from diffpir.prior import Prior

    dev = torch.device(device)
    with torch.device("meta"):
        net = build_unet(preset)
    net = net.to_empty(device=dev).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(0)
    for p in net.parameters():  # small seeded weights: finite, no denormals
        p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.02)
    prior = Prior(net, NoiseSchedule.linear(), autocast_dtype=torch.bfloat16 if amp else None)
    size, c = net.image_size, net.in_channels
    x = torch.randn(batch, c, size, size, generator=g, device=dev).clamp(-1, 1)
    t = torch.full((batch,), 500, dtype=torch.long, device=dev)
    weights_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + 1000):
            sync()
            start = time.perf_counter()
            prior.eps(x, t)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if len(times) >= repeats and (sum(times) >= min_time or len(times) >= 100):
                break
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    sec = statistics.median(times)
    return {
        "preset": preset,
        "batch": batch,
        "size": size,
        "channels": c,
        "params": sum(p.numel() for p in net.parameters()),
        "weights_mb": round(weights_mb, 1),
        "forward_ms": round(1000 * sec, 2),
        "forward_min_ms": round(1000 * min(times), 2),
        "images_per_s": round(batch / sec, 2),
        "peak_forward_mb": round(peak_mb, 1),
        "repeats": len(times),
        "device": device,
        "amp_bf16": amp and dev.type == "cuda",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="*", default=None, help="default: all presets")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3, help="at least this many timed forwards")
    ap.add_argument("--min-time", type=float, default=1.0, help="time forwards for at least this many s")
    ap.add_argument("--quick", action="store_true", help="leave out the official 256 px nets")
    ap.add_argument("--full", action="store_true", help="also run the official nets at batch 8 on the CPU")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/prior_speed.json")
    ap.add_argument("--worker", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        preset, batch = args.worker[0], int(args.worker[1])
        row = worker(preset, batch, args.device, args.repeats, args.warmup, args.min_time, args.amp)
        print("RESULT " + json.dumps(row))
        return

    from diffpir.models import PRESETS

    on_cpu = args.device == "cpu"
    presets = args.presets or [p for p in PRESETS if not (args.quick and p in OFFICIAL)]
    rows, skipped = [], []
    for preset in presets:
        for batch in args.batches:
            official_cpu = on_cpu and preset in OFFICIAL
            if official_cpu and batch > 1 and not args.full:
                skipped.append(f"{preset} batch {batch} (CPU; pass --full)")
                print(f"skipped {preset} batch {batch} on the CPU (too slow; pass --full to run it)")
                continue
            repeats, warmup, min_time = (1, 0, 0.0) if official_cpu else (args.repeats, 1, args.min_time)
            cmd = [sys.executable, __file__, "--worker", preset, str(batch), "--device", args.device]
            cmd += ["--repeats", str(repeats), "--warmup", str(warmup), "--min-time", str(min_time)]
            cmd += ["--amp"] if args.amp else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                skipped.append(f"{preset} batch {batch} (failed: {err})")
                print(f"FAILED {preset} batch {batch}: {err}")
                continue
            row = json.loads(lines[-1][len("RESULT ") :])
            rows.append(row)
            print(
                f"{preset:20s} b={batch:<2d} {row['size']:>4d}px {row['params'] / 1e6:8.3f}M  "
                f"{row['forward_ms']:10.1f} ms (min {row['forward_min_ms']:9.1f})  "
                f"{row['images_per_s']:8.2f} img/s  "
                f"peak +{row['peak_forward_mb']:8.1f} MB",
                flush=True,
            )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "amp_bf16": args.amp,
        "memory": "CPU: max-RSS growth during the forwards; CUDA: max_memory_allocated minus weights",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
