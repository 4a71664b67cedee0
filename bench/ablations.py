"""The paper's ablations of DiffPIR on one task: quality against NFEs (Fig. 6), against t_start (Fig. 7), and against
lambda and zeta (Fig. 8).

- ``nfe``: PSNR / SSIM / LPIPS against the number of steps, for DiffPIR and (``--nfe-methods``) DPS and DDNM.
- ``tstart``: DiffPIR starting at ``t_start`` from the measurement's initial estimate (``init: measurement``, the
  paper's Fig. 7) or the classical restoration (``init: classical``) diffused there (``--steps`` NFEs spread over
  ``[0, t_start]`` with the quad schedule), from ``t_start = T - 1`` (all but pure noise) down.
- ``lambda_zeta``: a ``lambda`` x ``zeta`` grid at ``--steps`` NFEs: heat maps of PSNR and LPIPS, and one curve per
  ``zeta`` against ``lambda``.

Everything else comes from the task's ``configs/restore/<task>.yaml``; the images and their degradations are those
of ``bench/compare_methods.py`` (``data/eval``, seeded by image key)::

    python bench/ablations.py --prior natural --task deblur_gaussian                     # the full run
    python bench/ablations.py --prior natural --task sr_x4 --size 128 --images 2 --steps 20
    python bench/ablations.py --prior /tmp/tiny.safetensors --size 64 --images 1 --steps 5 \\
        --nfes 3 5 --tstarts 200 999 --lambdas 1 7 --zetas 0 1 --out-dir /tmp/figs           # smoke test

Writes ``ablation_<which>_<task>.csv`` and ``.png`` into ``--out-dir`` (default ``docs/figures``). Needs matplotlib
(``pip install matplotlib``) for the plots; without it only the CSVs are written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffpir.cli.evaluate import (  # noqa: E402
    Metrics,
    load_batches,
    mean_rows,
    method_defaults,
    run_method,
    task_config,
    write_csv,
)
from diffpir.methods import build_method  # noqa: E402

ALL = ("nfe", "tstart", "lambda_zeta")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="natural", help="prior file or bundled name")
    p.add_argument("--task", default="deblur_gaussian")
    p.add_argument("--which", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--images-dir", type=Path, default=ROOT / "data" / "eval")
    p.add_argument("--images", type=int, default=None, help="use the first K images (default all)")
    p.add_argument("--size", type=int, default=None, help="centre-crop the images to SIZE px")
    p.add_argument("--steps", type=int, default=20, help="NFEs of the t_start and lambda/zeta ablations")
    p.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--nfe-methods", nargs="+", default=["diffpir", "dps", "ddnm"], choices=["diffpir", "dps", "ddnm"])
    p.add_argument("--tstarts", type=int, nargs="+", default=[100, 200, 300, 400, 600, 800, 999])
    p.add_argument(
        "--inits",
        nargs="+",
        default=["measurement", "classical"],
        choices=["measurement", "classical"],
        help="what the t_start ablation diffuses: the measurement's initial estimate, the classical restoration",
    )
    p.add_argument("--lambdas", type=float, nargs="+", default=[1, 2, 4, 7, 12, 20, 35, 50])
    p.add_argument("--zetas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "figures")
    return p


def _write_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, rows)
    print(f"wrote {path}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: CSVs only (pip install matplotlib)")
        return None
    return plt


def _quality_axes(plt, n: int):
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    return fig, axes[0]


def _lines(path: Path, rows: list[dict], x: str, group: str, metrics: list[str], title: str, logx: bool) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = _quality_axes(plt, len(metrics))
    for ax, m in zip(axes, metrics):
        for g in dict.fromkeys(r[group] for r in rows):
            pts = sorted((r[x], r[m]) for r in rows if r[group] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{group} {g}")
        ax.set_xlabel(x)
        ax.set_ylabel(m.upper().replace("_", "-") + (" (lower is better)" if m.startswith("lpips") else ""))
        if logx:
            ax.set_xscale("log")
            ax.minorticks_off()
        xs = sorted({r[x] for r in rows})
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _heatmaps(path: Path, rows: list[dict], lambdas: list[float], zetas: list[float], metrics: list[str], title: str):
    plt = _pyplot()
    if plt is None:
        return
    import numpy as np

    fig, axes = _quality_axes(plt, len(metrics))
    for ax, m in zip(axes, metrics):
        grid = np.full((len(zetas), len(lambdas)), np.nan)
        for r in rows:
            grid[zetas.index(r["zeta"]), lambdas.index(r["lambda_"])] = r[m]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis" if m != "lpips_vgg" else "viridis_r")
        ax.set_xticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
        ax.set_yticks(range(len(zetas)), [f"{v:g}" for v in zetas])
        ax.set_xlabel("lambda")
        ax.set_ylabel("zeta")
        ax.set_title(m.upper().replace("_", "-"))
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}" if m == "psnr" else f"{v:.3f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from diffpir.priorfile import load_prior

    device = torch.device(args.device)
    prior = load_prior(args.prior).to(device)
    config = task_config(args.task)
    deg = config["data"]["degradation"]
    if args.size is not None and deg.get("kernel_size", 0) >= args.size:
        deg["kernel_size"] = args.size - 1 if args.size % 2 == 0 else args.size - 2
    files = sorted(args.images_dir.glob("*.png"))[: args.images]
    if not files:
        raise SystemExit(f"no PNG images in {args.images_dir}: run `python scripts/prepare_data.py eval` first")
    batches = load_batches(config, files, None, args.size, prior.in_channels)
    metrics = Metrics(("vgg",), device)
    names = metrics.names
    plot_metrics = [m for m in ("psnr", "lpips_vgg") if m in names]
    where = f"{args.task}, {len(files)} image(s)" + (f" at {args.size} px" if args.size else "")
    where += f", prior {Path(args.prior).stem}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[dict]] = {}

    def measure(name: str, **kwargs) -> dict:
        t0 = time.perf_counter()
        method = build_method(name, **kwargs)
        rows, _ = run_method(method, batches, prior, metrics, args.seed, device)
        row = {"method": name, "nfe": method.nfe, **mean_rows(rows, [*names, "seconds"])}
        shown = ", ".join(f"{k} {v:g}" for k, v in kwargs.items() if k in ("steps", "t_start", "lambda_", "zeta"))
        print(f"{name} ({shown}): PSNR {row['psnr']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    if "nfe" in args.which:  # Fig. 6
        rows = []
        for name in args.nfe_methods:
            for nfe in args.nfes:
                rows.append(measure(name, **method_defaults(name, config, nfe)))
        _write_csv(args.out_dir / f"ablation_nfe_{args.task}.csv", rows)
        _lines(
            args.out_dir / f"ablation_nfe_{args.task}.png",
            rows,
            "nfe",
            "method",
            plot_metrics,
            f"Quality against NFEs ({where})",
            logx=True,
        )
        out["nfe"] = rows
    base = method_defaults("diffpir", config, args.steps)
    if "tstart" in args.which:  # Fig. 7
        rows = []
        for init in args.inits:
            for t in sorted(args.tstarts, reverse=True):
                row = measure("diffpir", **{**base, "t_start": t, "init": init})
                rows.append({"t_start": t, "init": init, **row})
        _write_csv(args.out_dir / f"ablation_tstart_{args.task}.csv", rows)
        _lines(
            args.out_dir / f"ablation_tstart_{args.task}.png",
            rows,
            "t_start",
            "init",
            plot_metrics,
            f"Quality against t_start, {args.steps} NFEs ({where})",
            logx=False,
        )
        out["tstart"] = rows
    if "lambda_zeta" in args.which:  # Fig. 8
        rows = []
        for z in args.zetas:
            for lam in args.lambdas:
                rows.append({"lambda_": lam, "zeta": z, **measure("diffpir", **{**base, "lambda_": lam, "zeta": z})})
        _write_csv(args.out_dir / f"ablation_lambda_zeta_{args.task}.csv", rows)
        title = f"lambda x zeta, {args.steps} NFEs ({where})"
        _heatmaps(
            args.out_dir / f"ablation_lambda_zeta_{args.task}.png", rows, args.lambdas, args.zetas, plot_metrics, title
        )
        _lines(
            args.out_dir / f"ablation_lambda_{args.task}.png", rows, "lambda_", "zeta", plot_metrics, title, logx=True
        )
        out["lambda_zeta"] = rows
    return out


if __name__ == "__main__":
    main()
