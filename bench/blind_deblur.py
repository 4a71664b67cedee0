"""Blind deblurring (``blind_diffpir``) against oracle Wiener, the blurred input and non-blind DiffPIR.

Images: ``--split eval`` (default): the colour evaluation photos that are not bundled samples (``data/eval``:
china, flower, motorcycle; 256x256); ``--split val``: the natural prior's validation photos (``data/natural/val``,
resized to a short side of 256 px). Each photo gives ``--crops`` crops of ``--size`` px (its corners, then its
centre). Prepare them with ``python scripts/prepare_data.py eval natural --out data``.

Degradation: exactly the CLI's benchmark mode of ``configs/restore/deblur_blind.yaml``: a random camera-shake
kernel of at most 31x31 per crop (``deblur_motion``'s generator, seeded by ``(seed, key)``), circular blur, noise
``sigma_n = 0.01``. The blind method never sees the kernel.

Rows, all scored by PSNR / SSIM (uint8) after the best integer alignment within 4 px, a 4 px border left out
(``diffpir.methods.blind.align_images``; the non-blind rows are aligned the same way, their best shift is 0):

- ``blurred``: the measurement itself;
- ``wiener_oracle``: Wiener deconvolution with the true kernel and the NSR scale that the truth likes best
  (``Classical.oracle``: power-law NSR, 51 scales);
- ``blind_diffpir``: the method with the config's settings (``--method-args`` JSON overrides), with the kernel NCC
  at the best shift and the time per image;
- ``wiener_estimated``: Wiener (UPRE NSR) with the blind method's kernel (how good the kernel alone is);
- ``diffpir_true_kernel``: non-blind DiffPIR with the same sampler settings and ``samples``, and the true kernel (the
  upper bound).

::

    python bench/blind_deblur.py                                # evaluation crops: table, results JSON/MD
    python bench/blind_deblur.py --split val --method-args '{"lambda_": 3}'   # choosing settings
    python bench/blind_deblur.py --prior /tmp/tiny.safetensors --crops 1 --size 64 --steps 3 --out-dir /tmp/b

Writes ``<out-dir>/blind_deblur[_val].json`` and ``.md`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffpir.datasets import SAMPLE_NAMES  # noqa: E402
from diffpir.io import read_image  # noqa: E402
from diffpir.methods import BlindDiffPIR, Classical, DiffPIRMethod  # noqa: E402
from diffpir.methods.blind import align_images, kernel_ncc  # noqa: E402
from diffpir.metrics import psnr, ssim  # noqa: E402
from diffpir.operators import BlindBlur, Blur  # noqa: E402
from diffpir.prepare import EVAL_SOURCES, NATURAL_VAL  # noqa: E402
from diffpir.priorfile import load_prior  # noqa: E402
from diffpir.restoration.tasks import Degradation, degrade, image_generator, synthesize_params  # noqa: E402
from diffpir.sampler import DiffPIR  # noqa: E402

CONFIG = ROOT / "configs" / "restore" / "deblur_blind.yaml"
ROWS = ("blurred", "wiener_oracle", "blind_diffpir", "wiener_estimated", "diffpir_true_kernel")
ALIGN = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="natural", help="prior file or bundled name")
    p.add_argument("--split", choices=("eval", "val"), default="eval")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="the prepared data folder")
    p.add_argument("--size", type=int, default=128, help="crop size (px)")
    p.add_argument("--crops", type=int, default=4, help="crops per photo (corners first, then the centre)")
    p.add_argument("--steps", type=int, default=None, help="steps per pass (NFEs = steps x passes; default: config)")
    p.add_argument("--method-args", default="{}", help="JSON overriding BlindDiffPIR's settings")
    p.add_argument("--no-nonblind", action="store_true", help="skip non-blind DiffPIR (the slowest reference)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kernels and noise with each crop's key")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    return p


def _photos(split: str, data: Path) -> list[tuple[str, Path]]:
    if split == "val":
        names = list(NATURAL_VAL)
        folder = data / "natural" / "val"
    else:
        names = [n for n, s in EVAL_SOURCES.items() if not s.grey and n not in SAMPLE_NAMES]
        folder = data / "eval"
    out = [(n, folder / f"{n}.png") for n in names]
    missing = [str(f) for _, f in out if not f.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run `python scripts/prepare_data.py eval natural --out {data}` first")
    return out


def crops(split: str, data: Path, size: int, per_photo: int) -> list[tuple[str, torch.Tensor]]:
    """``(key, [3, size, size])`` crops: each photo at a short side of 256 px, its corners then its centre."""
    out = []
    for name, path in _photos(split, data):
        x = read_image(path, 3)
        h, w = x.shape[-2:]
        s = 256 / min(h, w)
        if s != 1:
            size_hw = (round(h * s), round(w * s))
            x = F.interpolate(x[None], size=size_hw, mode="bicubic", antialias=True).clamp(0, 1)[0]
        h, w = x.shape[-2:]
        spots = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
        for i, (t, left) in enumerate(spots[:per_photo]):
            out.append((f"{name}_{i}", x[:, t : t + size, left : left + size].contiguous()))
    return out


def scores(u: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    a, b, shifts = align_images(u.clamp(0, 1), x, ALIGN)
    return {"psnr": float(psnr(a, b)[0]), "ssim": float(ssim(a, b)[0]), "shift": list(shifts[0])}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    model, deg = cfg["model"], cfg["data"]["degradation"]
    # model.method.init_args (and --method-args): the sampler's settings apply to both DiffPIR rows
    method_args = {**model["method"]["init_args"], **json.loads(args.method_args)}
    sampler_args = {k: method_args.pop(k) for k in DiffPIR.PARAMS if k in method_args}
    if args.steps is not None:
        sampler_args["steps"] = args.steps
    spec = Degradation(**deg)
    prior = load_prior(args.prior)
    blind = BlindDiffPIR(**sampler_args, **method_args)
    nonblind = DiffPIRMethod(samples=method_args.get("samples", 1), **sampler_args)  # the same mean of samples
    images = crops(args.split, args.data, args.size, args.crops)
    per_image = []
    for key, x in images:
        params = synthesize_params(spec, key, x.shape[-2], x.shape[-1], args.seed)
        y = degrade(spec, x, params, image_generator(args.seed, key, "noise"))[None]
        x = x[None]
        k_true = params["kernel"]
        row: dict = {"key": key, "kernel_extent": _extent(k_true)}
        row["blurred"] = scores(y, x)
        row["wiener_oracle"] = scores(Classical().oracle(y, Blur(k_true), spec.sigma_n, x), x)
        gen = [image_generator(args.seed, key, "sample")]
        start = time.perf_counter()
        res = blind.solve(y, BlindBlur(spec.kernel_size), prior, spec.sigma_n, generator=gen)
        row["blind_diffpir"] = {**scores(res.image, x), "seconds": time.perf_counter() - start}
        row["blind_diffpir"]["kernel_ncc"] = float(kernel_ncc(res.kernel, k_true)[0])
        row["wiener_estimated"] = scores(Classical()(y, Blur(res.kernel, normalize=False), None, spec.sigma_n), x)
        if not args.no_nonblind:
            start = time.perf_counter()
            u = nonblind(y, Blur(k_true), prior, spec.sigma_n, generator=[image_generator(args.seed, key, "sample")])
            row["diffpir_true_kernel"] = {**scores(u, x), "seconds": time.perf_counter() - start}
        per_image.append(row)
        print(
            f"{key:16s} "
            + " ".join(f"{r}={row[r]['psnr']:.2f}" for r in ROWS if r in row)
            + f" ncc={row['blind_diffpir']['kernel_ncc']:.3f} t={row['blind_diffpir']['seconds']:.1f}s",
            flush=True,
        )
    result = _aggregate(args, per_image, sampler_args, method_args, spec, (blind.nfe, nonblind.nfe))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "blind_deblur" if args.split == "eval" else "blind_deblur_val"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = _markdown(result)
    (args.out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def _extent(k: torch.Tensor) -> int:
    """The side of the smallest square holding the kernel's entries above 1% of its largest."""
    nz = (k > 0.01 * k.max()).nonzero()
    return int(max(nz[:, 0].max() - nz[:, 0].min(), nz[:, 1].max() - nz[:, 1].min()) + 1)


def _aggregate(args, per_image, sampler_args, method_args, spec, nfes: tuple[int, int]) -> dict:
    rows = {}
    for r in ROWS:
        have = [p for p in per_image if r in p]
        if not have:
            continue
        rows[r] = {"psnr": summary([p[r]["psnr"] for p in have]), "ssim": summary([p[r]["ssim"] for p in have])}
        if "seconds" in have[0][r]:
            rows[r]["seconds"] = summary([p[r]["seconds"] for p in have])
    ncc = [p["blind_diffpir"]["kernel_ncc"] for p in per_image]
    rows["blind_diffpir"]["kernel_ncc"] = summary(ncc)
    gain = [p["blind_diffpir"]["psnr"] - p["wiener_oracle"]["psnr"] for p in per_image]
    over_blurred = [p["blind_diffpir"]["psnr"] - p["blurred"]["psnr"] for p in per_image]
    goals = {
        "blind >= oracle Wiener (mean PSNR)": rows["blind_diffpir"]["psnr"]["mean"]
        >= rows["wiener_oracle"]["psnr"]["mean"],
        "blind >= blurred + 3 dB (mean PSNR)": statistics.fmean(over_blurred) >= 3.0,
        "kernel NCC >= 0.7 (mean)": statistics.fmean(ncc) >= 0.7,
    }
    return {
        "meta": {
            "split": args.split,
            "images": len(per_image),
            "size": args.size,
            "prior": args.prior,
            "degradation": spec.to_dict(),
            "sampler": sampler_args,
            "method_args": method_args,
            "nfe": nfes[0],  # the blind method's: every pass, the last one `samples` times
            "nfe_nonblind": nfes[1],
            "align_px": ALIGN,
            "seed": args.seed,
            "threads": args.threads,
            "device": "cpu",
            "machine": platform.machine(),
            "torch": torch.__version__,
        },
        "rows": rows,
        "blind_minus_oracle_wiener": summary(gain),
        "blind_minus_blurred": summary(over_blurred),
        "images_blind_below_oracle_wiener": sum(g < 0 for g in gain),
        "images_ncc_below_0.7": sum(v < 0.7 for v in ncc),
        "goals": goals,
        "per_image": per_image,
    }


def _fmt(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f} .. {s['max']:.{digits}f})"


def _markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Blind deblurring, {m['images']} {m['split']} crops of {m['size']} px, camera-shake kernels up to "
        f"{m['degradation']['kernel_size']}x{m['degradation']['kernel_size']}, sigma_n {m['degradation']['sigma_n']}, "
        f"{m['nfe']} NFEs (non-blind DiffPIR: {m.get('nfe_nonblind', m['nfe'])}), prior `{m['prior']}`, "
        f"CPU ({m['threads']} thread). PSNR/SSIM after the best integer "
        f"alignment within {m['align_px']} px (border of {m['align_px']} px left out); mean ± std (min .. max).",
        "",
        "| method | PSNR (dB) | SSIM | kernel NCC | s / image |",
        "|---|---|---|---|---|",
    ]
    for r, v in res["rows"].items():
        lines.append(
            f"| {r} | {_fmt(v['psnr'])} | {_fmt(v['ssim'], 3)} | {_fmt(v.get('kernel_ncc'), 3)} | "
            f"{_fmt(v.get('seconds'), 1)} |"
        )
    lines += [
        "",
        f"blind - oracle Wiener: {_fmt(res['blind_minus_oracle_wiener'])} dB "
        f"({res['images_blind_below_oracle_wiener']} of {m['images']} images below); "
        f"blind - blurred: {_fmt(res['blind_minus_blurred'])} dB; "
        f"{res['images_ncc_below_0.7']} of {m['images']} kernels with NCC below 0.7.",
        "",
        "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in res["goals"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
