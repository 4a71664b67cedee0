"""Large images on the CPU: peak memory and time to restore a 2048 x 2048 photo, prior tiled vs untiled.

Each configuration runs the whole ``Trainer.predict`` pipeline of a real-mode restoration (read the blurred PNG,
restore it, write the PNG) in its own subprocess, so its peak memory (max RSS from ``resource.getrusage``) is its
own. The photo is a bundled 256 x 256 sample upscaled (bicubic) to ``--size``, blurred as in the paper's Gaussian
deblurring (61 x 61, std 3, circular) with noise sigma_n 0.05 and saved as an 8-bit PNG; the parent process computes
the PSNR of each restoration against the clean photo. (Real mode: benchmark mode also computes SSIM, in strips of rows
since 2026-12 (about 1 GB at 2048 x 2048, but slow there), which would blur the memory figures.)

The prior is ``--prior``, else the bundled ``natural`` prior when ``diffpir/assets/priors/natural.safetensors``
exists, else the ``--preset`` UNet with seeded random weights (memory and time do not depend on the weights; they are
drawn at a small scale, as in the tests, so that eps is not zero: the UNet's output convolution starts at zero).

- ``tiled``: ``RestorationModule(tile_size=--tile, tile_overlap=--overlap, tile_batch=--tile-batch)``;
- ``untiled``: ``tile_size=None``. It is skipped when its peak memory, extrapolated from an untiled run at
  ``--probe-size`` (the growth of the peak over the RSS before ``predict`` scales with the pixel count), would
  exceed ``--budget-gb``.

When both run, the two restorations are compared (PSNR of tiled against untiled, uint8 PNGs).

    python bench/large_image_memory.py                         # 2048 px, 2 steps, 1 thread, the bundled prior
    python bench/large_image_memory.py --prior none            # ... the small preset with random weights (the docs')
    python bench/large_image_memory.py --steps 2 --budget-gb 4

Results: ``bench/results/large_image_memory.json``.
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
from benchlib import machine, quiet_trainer, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "large_image_memory.json"
NATURAL = Path(__file__).resolve().parents[1] / "diffpir" / "assets" / "priors" / "natural.safetensors"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels")
    p.add_argument("--steps", type=int, default=2, help="sampler steps (NFEs)")
    p.add_argument("--preset", default="small", help="UNet preset when the natural prior is not bundled")
    p.add_argument(
        "--prior",
        default=None,
        help="prior file or name (default: natural if bundled; none: --preset with random weights)",
    )
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--budget-gb", type=float, default=8.0, help="skip the untiled run above this peak memory")
    p.add_argument("--probe-size", type=int, default=512, help="untiled size run to extrapolate its memory")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--sample", default="astronaut", help="bundled sample photograph to upscale")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=["tiled", "untiled"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _rss_mb() -> float:
    """Peak RSS of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _current_rss_mb() -> float:
    """Current RSS of this process, MB (Linux ``/proc``; the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return _rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _spec():
    from diffpir.restoration import Degradation

    return Degradation(task="deblur_gaussian", kernel_size=61, kernel_std=3.0, sigma_n=0.05)


def _write_photo(folder: Path, sample: str, size: int) -> Path:
    """The clean photo at ``size`` (``folder/clean.png``) and its blurred, noisy measurement (``folder/in/``)."""
    import torch
    import torch.nn.functional as F

    from diffpir.datasets import sample_images
    from diffpir.io import read_image, write_png_atomic
    from diffpir.restoration.tasks import degrade, synthesize_params

    src = next(p for p in sample_images() if p.stem == sample)
    x = F.interpolate(read_image(src)[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    write_png_atomic(x, folder / "clean.png")
    spec = _spec()
    y = degrade(spec, x, synthesize_params(spec, sample, size, size, 0), torch.Generator().manual_seed(0))
    return write_png_atomic(y.clamp(0, 1), folder / "in" / f"{sample}_{size}.png")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from diffpir.methods import DiffPIRMethod
    from diffpir.models import build_unet
    from diffpir.prior import Prior
    from diffpir.priorfile import load_prior
    from diffpir.restoration import RestorationDataModule, RestorationModule, RestorationWriter
    from diffpir.schedule import NoiseSchedule

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.prior != "none" and (args.prior or NATURAL.is_file()):
        prior, prior_name = load_prior(args.prior or NATURAL), str(args.prior or "natural (bundled)")
    else:
        net = build_unet(args.preset)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02))
        prior, prior_name = Prior(net, NoiseSchedule.linear()).eval(), f"{args.preset} (seeded random weights)"
    tiled = args.worker == "tiled"
    module = RestorationModule(
        prior,
        method=DiffPIRMethod(steps=args.steps),
        lpips=False,
        tile_size=args.tile if tiled else None,
        tile_overlap=args.overlap,
        tile_batch=args.tile_batch,
    )
    data = RestorationDataModule(str(args.folder / "in"), mode="real", degradation=_spec(), max_pixels=None)
    out = args.folder / args.worker
    trainer = quiet_trainer(callbacks=[RestorationWriter(str(out))])
    setup_mb = _current_rss_mb()
    start = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    if summary["count"] != 1:
        raise SystemExit(f"the image was not restored: {(out / 'failed.json').read_text()}")
    return {
        "mode": args.worker,
        "size": args.size,
        "prior": prior_name,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 2),
        "peak_rss_mb": round(_rss_mb(), 1),
        "rss_before_predict_mb": round(setup_mb, 1),
        "tiles": len(module.prior.layout(args.size, args.size)) if tiled else 1,
    }


def _run(args: argparse.Namespace, mode: str, size: int, folder: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--folder", str(folder)]
    for name in ("size", "steps", "preset", "tile", "overlap", "tile_batch", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.prior:
        cmd += ["--prior", args.prior]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{mode} at {size} px failed:\n{res.stderr[-4000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["psnr_vs_clean_db"] = _psnr(folder / mode / "restored" / f"{args.sample}_{size}.png", folder / "clean.png")
    print(
        f"{mode:8s} {size:5d} px: {row['seconds']:7.1f} s ({row['seconds_per_step']:.1f} s/step), "
        f"peak RSS {row['peak_rss_mb']:7.0f} MB (before predict {row['rss_before_predict_mb']:.0f} MB)",
        flush=True,
    )
    return row


def _psnr(a: Path, b: Path) -> float | None:
    """PSNR in dB of two PNGs (None when they are identical)."""
    import math

    from diffpir.io import read_image

    mse = float((read_image(a) - read_image(b)).pow(2).mean())
    return None if mse == 0 else round(-10 * math.log10(mse), 2)


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return {}

    runs, notes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probe_dir, big_dir = tmp / "probe", tmp / "big"
        _write_photo(big_dir, args.sample, args.size)
        runs.append(_run(args, "tiled", args.size, big_dir))
        # Untiled: extrapolate the network's memory from a smaller untiled run first.
        _write_photo(probe_dir, args.sample, args.probe_size)
        probe_args = argparse.Namespace(**{**vars(args), "size": args.probe_size})
        probe = _run(probe_args, "untiled", args.probe_size, probe_dir)
        probe["role"] = "probe for the untiled estimate"
        runs.append(probe)
        grow = (args.size / args.probe_size) ** 2
        estimate = probe["rss_before_predict_mb"] + (probe["peak_rss_mb"] - probe["rss_before_predict_mb"]) * grow
        notes["untiled_estimated_peak_rss_mb"] = round(estimate, 0)
        if estimate <= args.budget_gb * 1024:
            runs.append(_run(args, "untiled", args.size, big_dir))
            name = f"restored/{args.sample}_{args.size}.png"
            notes["psnr_tiled_vs_untiled_db"] = _psnr(big_dir / "tiled" / name, big_dir / "untiled" / name)
        else:
            notes["untiled_skipped"] = f"estimated peak {estimate:.0f} MB is above the budget of {args.budget_gb} GB"
            print(f"untiled {args.size} px skipped: {notes['untiled_skipped']}")
    if "random" in runs[0]["prior"]:
        notes["prior"] = "seeded random weights: memory and time are representative, the restorations (and PSNRs) not"
    report = {
        "benchmark": "large_image_memory",
        "config": {
            k: getattr(args, k)
            for k in ("size", "steps", "preset", "prior", "tile", "overlap", "tile_batch", "budget_gb", "probe_size")
        }
        | {"task": "deblur_gaussian 61x61 std 3, sigma_n 0.05, real mode", "photo": f"{args.sample} upscaled"},
        "machine": machine(args.threads),
        "runs": runs,
        "notes": notes,
    }
    return write_report(args.out, report)


if __name__ == "__main__":
    main()
