"""Restoration throughput: images/s against batch size, and peak memory, through the whole predict pipeline.

Each batch size runs in its own subprocess (so peak memory, the max RSS from ``resource``, belongs to that
configuration alone; on CUDA also ``torch.cuda.max_memory_allocated``). A worker builds a prior from a UNet preset
(random weights: speed does not depend on them), writes ``--images`` crops of the bundled sample photographs,
warms up on one image, then times ``Trainer.predict`` (data loading, degradation, sampling, metrics, PNG writing)
over all the images. ``sampler_images_per_s`` counts the sampler's time only.

    python bench/restore_throughput.py                       # CPU, small preset, 64x64, 5 steps, batch 1/4/16
    python bench/restore_throughput.py --threads 1           # on a CPU shared with other jobs (see below)
    python bench/restore_throughput.py --device cuda --preset natural --size 256 --steps 20

Results go to ``bench/results/restore_throughput.json`` and are printed. On a CPU that other processes also use,
OpenMP threads waiting for each other can make small batches 30x slower (measured: 1.0 s vs 0.03 s per 64 px
forward of the small preset at batch 1, 2 threads vs 1, under load): pass ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import default_init, machine, quiet_trainer, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "restore_throughput.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="UNet preset of the prior (tiny, small, natural, ...)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=5, help="sampler steps (NFEs)")
    p.add_argument("--images", type=int, default=16, help="images per configuration")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--task", default="deblur_gaussian")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=["32", "bf16", "16"], help="prior precision on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # batch size, in a subprocess
    return p


def _write_images(folder: Path, n: int, size: int) -> None:
    """``n`` crops of ``size x size`` from the bundled 256x256 sample photographs (a grid of crops per photo)."""
    from diffpir.datasets import sample_images
    from diffpir.io import read_image, write_png_atomic

    photos = [read_image(p) for p in sample_images()]
    per_side = max(1, 256 // size)
    i = 0
    while i < n:
        photo = photos[i % len(photos)]
        j = i // len(photos)
        r, c = (j // per_side) % per_side, j % per_side
        crop = photo[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
        write_png_atomic(crop, folder / f"img{i:03d}.png")
        i += 1


def worker(args: argparse.Namespace) -> dict:
    import torch

    from diffpir.methods import DiffPIRMethod
    from diffpir.models import build_unet
    from diffpir.prior import Prior
    from diffpir.restoration import Degradation, RestorationDataModule, RestorationModule, RestorationWriter
    from diffpir.restoration.writer import read_metric_rows
    from diffpir.schedule import NoiseSchedule

    batch_size = args.worker
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    prior = Prior(default_init(build_unet(args.preset), 0), NoiseSchedule.linear()).eval()  # random weights
    kernel = min(61, args.size if args.size % 2 else args.size - 1)  # the paper's 61x61 when it fits
    spec = Degradation(task=args.task, kernel_size=kernel, sigma_n=0.05)

    def run(images: Path, out: Path, bs: int) -> float:
        module = RestorationModule(
            prior, method=DiffPIRMethod(steps=args.steps), lpips=False, prior_precision=args.precision
        )
        data = RestorationDataModule(str(images), degradation=spec, batch_size=bs)
        trainer = quiet_trainer(accelerator=args.device, callbacks=[RestorationWriter(str(out))])
        start = time.perf_counter()
        trainer.predict(module, datamodule=data, return_predictions=False)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "warm").mkdir()
        _write_images(tmp / "warm", 1, args.size)
        _write_images(tmp / "images", args.images, args.size)
        run(tmp / "warm", tmp / "warm_out", 1)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = run(tmp / "images", tmp / "out", batch_size)
        rows = read_metric_rows(tmp / "out" / "metrics")
        sampler_seconds = sum(float(r["seconds"]) for r in rows.values())
        count = len(rows)
    result = {
        "batch_size": batch_size,
        "images": count,
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 3),
        "sampler_images_per_s": round(count / sampler_seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return {}
    import torch

    results = []
    for bs in args.batch_sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(bs)]
        for name in ("preset", "size", "steps", "images", "task", "device", "precision", "threads"):
            cmd += [f"--{name}", str(getattr(args, name))]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            raise SystemExit(f"batch size {bs} failed:\n{res.stderr[-4000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        results.append(row)
        print(
            f"batch {bs:3d}: {row['images_per_s']:8.2f} images/s (sampler {row['sampler_images_per_s']:.2f}), "
            f"{row['seconds']:.1f} s for {row['images']} images, peak RSS {row['peak_rss_mb']:.0f} MB"
            + (f", peak CUDA {row['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in row else ""),
            flush=True,
        )
    report = {
        "benchmark": "restore_throughput",
        "config": {
            k: getattr(args, k) for k in ("preset", "size", "steps", "images", "task", "device", "precision", "threads")
        },
        "machine": {**machine(args.threads), "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "results": results,
    }
    return write_report(args.out, report)


if __name__ == "__main__":
    main()
