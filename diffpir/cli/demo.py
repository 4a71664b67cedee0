"""The main job: restore the bundled sample photos for every paper task with the bundled ``natural`` prior.

    python -m diffpir.cli.demo [--out outputs/demo] [--steps N] [--images 5] [--no-baseline]
    python -m diffpir.cli.demo --baselines classical dpir_ffdnet   # also DPIR with the pretrained FFDNet

For each task (configs/restore/<task>.yaml: Gaussian and motion deblurring, SR x4, box and random inpainting,
denoising) it runs ``diffpir-restore predict`` on the bundled 256x256 sample photos (``diffpir/assets/samples``),
then the task's classical baseline through the same CLI (``--model.method Classical``: Wiener deconvolution, bicubic
upsampling, harmonic fill, ...) when that method is available, and any other method named in ``--baselines``
(with its own default settings: ``dpir_ffdnet`` runs DPIR's 8 HQS iterations with lambda 0.23). It writes, under
``--out``:

    <task>/restored/*.png, <task>/degraded/*.png, <task>/grid/*.png   (degraded | restored | truth)
    <task>/metrics.csv, <task>/summary.json                           (PSNR, SSIM on uint8; LPIPS when available)
    overview.png                                                      one row per task for the first photo
    metrics.md, metrics.csv                                           the table of all tasks and methods

Each task runs its fast config, ``configs/restore/<task>_fast.yaml``: 10 NFEs per image (5 for box inpainting, 40
for random inpainting) instead of the paper's 100, starting from the classical baseline's restoration diffused to a
per-task t_start (paper Fig. 7) rather than from pure noise, so that the whole demo takes about eight minutes on two
CPU cores. The baselines run on the same configs, so on the same degraded images. Reruns skip images already
restored.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise")


def demo_steps(task: str, steps: int | None = None) -> int:
    """DiffPIR's NFEs for ``task``: ``steps`` when given, else those of the task's fast config."""
    if steps is not None:
        return int(steps)
    import yaml

    return int(yaml.safe_load(config_path(task).read_text())["model"]["method"]["init_args"]["steps"])


METRICS = ("psnr", "ssim", "lpips")


def config_path(task: str) -> Path:
    """The task's fast config, ``configs/restore/<task>_fast.yaml`` (the settings the demo runs; the packaged copy
    in a wheel install, :func:`diffpir.cli.common.config_dir`)."""
    from diffpir.cli.common import config_dir

    path = config_dir("restore") / f"{task}_fast.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no restoration config for task {task!r} at {path}")
    return path


def run_task(
    task: str, out: Path, images: Path, steps: int | None, method: str = "diffpir", prior: str = "natural"
) -> dict:
    """One ``diffpir-restore predict`` run on the task's fast config (``steps`` overriding its NFEs); returns its
    ``summary.json``."""
    from diffpir.cli.restore import build_cli

    args = [
        "predict",
        "--config",
        str(config_path(task)),
        "--model.prior",
        prior,
        "--data.images",
        str(images),
        "--writer.output_dir",
        str(out),
        "--trajectory.first_k",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if method == "diffpir":
        if steps is not None:
            args += ["--model.method.steps", str(steps)]
    else:
        from diffpir.methods import METHODS

        args += ["--model.method", METHODS[method].__name__]
    build_cli(args, run=True)
    return json.loads((out / "summary.json").read_text())


def run_nfe(out: Path, fallback: int) -> int:
    """The NFEs per image that a run into ``out`` recorded (its ``metrics.csv``; a baseline given a fast config
    keeps the config's ``steps``), else ``fallback``."""
    try:
        with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
            first = next(csv.DictReader(f), None)
        return int(float(first["nfe"])) if first and first.get("nfe") not in (None, "") else fallback
    except (OSError, ValueError, KeyError):
        return fallback


def baseline_nfe(method: str) -> int:
    """Network evaluations per image of a baseline with its default settings (0 for the classical one)."""
    from diffpir.methods import METHODS

    return int(getattr(METHODS[method](), "nfe", 0))


def sample_folder(n: int) -> Path:
    """A folder with the first ``n`` bundled sample photos (links where possible)."""
    from diffpir.datasets import sample_images

    files = sorted(sample_images())[:n]
    if not files:
        raise FileNotFoundError("no bundled sample photos found in diffpir/assets/samples")
    folder = Path(tempfile.mkdtemp(prefix="diffpir-demo-"))
    for f in files:
        try:
            os.symlink(f, folder / f.name)
        except OSError:
            shutil.copy(f, folder / f.name)
    return folder


def overview(out: Path, tasks: list[str]) -> Path | None:
    """One row per task (degraded | restored | truth) for the first photo, as ``overview.png``."""
    import torch
    from torchvision.io import decode_image
    from torchvision.utils import make_grid, save_image

    rows = []
    for task in tasks:
        grids = sorted((out / task / "grid").glob("*.png"))
        if grids:
            rows.append(decode_image(str(grids[0])).float() / 255)
    if not rows:
        return None
    width = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
    path = out / "overview.png"
    save_image(make_grid(rows, nrow=1, padding=4, pad_value=1.0), path)
    return path


def table(results: dict[tuple[str, str], dict]) -> tuple[str, str]:
    """The markdown and CSV tables of mean metrics per task and method."""
    lines = [
        "| task | method | NFE | PSNR (dB) | SSIM | LPIPS (VGG) | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "method", "nfe", *METRICS, "seconds_per_image"])
    for (task, method), s in results.items():
        mean = s.get("mean", {})
        nfe = s.get("nfe", "")
        cells = [f"{mean[m]:.4f}" if isinstance(mean.get(m), float) else "-" for m in METRICS]
        sec = s.get("seconds_per_image")
        lines.append(
            f"| {task} | {method} | {nfe if nfe != '' else '-'} | {' | '.join(cells)} | {sec:.1f} |"
            if isinstance(sec, float)
            else f"| {task} | {method} | - | {' | '.join(cells)} | - |"
        )
        w.writerow([task, method, nfe, *[mean.get(m, "") for m in METRICS], sec])
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    ap = ArgumentParser(prog="diffpir-demo", description="Restore the bundled sample photos for every paper task.")
    ap.add_argument("--out", default="outputs/demo", help="output folder")
    ap.add_argument("--prior", default="natural", help="a bundled prior name or a prior file")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="DiffPIR NFEs per image for every task (default: the fast configs': 10; 5 for inpaint_box, 40 for "
        "inpaint_random)",
    )
    ap.add_argument("--images", type=int, default=5, help="how many bundled photos (default: all 5)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    ap.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    ap.add_argument(
        "--baselines",
        nargs="*",
        default=["classical"],
        help="methods to run beside DiffPIR on the same degraded images, with their own defaults but the fast "
        "config's steps where they take steps (the NFE column says what ran; default: classical; e.g. classical "
        "dpir_ffdnet dpir)",
    )
    args = ap.parse_args(argv)
    if not 1 <= args.images <= 5:
        ap.error(f"--images takes 1 to 5 (the bundled photos), got {args.images}")

    from diffpir.cli.common import quiet_console
    from diffpir.priorfile import load_prior

    quiet_console()  # no litlogger tip, GPU/TPU banners or LeafSpec deprecation between the tasks

    try:
        load_prior(args.prior)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: cannot load the prior {args.prior!r}: {err}", file=sys.stderr)
        return 2

    from diffpir.methods import METHODS

    unknown = [m for m in args.baselines if m not in METHODS or m in ("diffpir", "blind_diffpir")]
    if unknown:
        print(
            f"error: unknown baseline(s) {unknown} (blind_diffpir: blind deblurring only, not a demo task); choose "
            f"from {sorted(set(METHODS) - {'diffpir', 'blind_diffpir'})}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = sample_folder(args.images)  # a temporary folder, removed below: made after the checks
    methods = ["diffpir"] + ([] if args.no_baseline else list(dict.fromkeys(args.baselines)))
    results: dict[tuple[str, str], dict] = {}
    start = time.perf_counter()
    try:
        for task in args.tasks:
            for method in methods:
                sub = out / task if method == "diffpir" else out / "baselines" / method / task
                t0 = time.perf_counter()
                print(f"[demo] {task}: {method} ...", flush=True)
                steps = demo_steps(task, args.steps)
                results[(task, method)] = run_task(task, sub, images, args.steps, method, args.prior)
                fallback = steps if method == "diffpir" else baseline_nfe(method)
                results[(task, method)]["nfe"] = run_nfe(sub, fallback)
                mean = results[(task, method)].get("mean", {})
                shown = ", ".join(f"{m} {mean[m]:.3f}" for m in METRICS if isinstance(mean.get(m), float))
                print(f"[demo] {task}: {method} done in {time.perf_counter() - t0:.0f} s ({shown})", flush=True)
    finally:
        shutil.rmtree(images, ignore_errors=True)
    md, csv_text = table(results)
    (out / "metrics.md").write_text(md)
    (out / "metrics.csv").write_text(csv_text)
    pic = overview(out, list(args.tasks))
    print(md)
    print(f"[demo] wrote {out}/<task>/ (restored, degraded, grid), {out}/metrics.md", end="")
    print(f", {pic}" if pic else "", end="")
    print(f" in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
