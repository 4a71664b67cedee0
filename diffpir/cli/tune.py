"""Pick DiffPIR's ``lambda`` and ``zeta`` for a task and noise level on a few validation images.

The paper's weak point is that both are tuned by hand per task and noise level. This searches them on
validation images degraded like the task's benchmark (:class:`~diffpir.restoration.tasks.Degradation`), each
grid point restoring the same measurements with the same sampler noise (common random numbers, seeded per image
as in ``diffpir-restore``), and writes the task's restoration config with the chosen values::

    diffpir-tune --config configs/restore/deblur_gaussian.yaml --prior natural \\
        --images data/natural/val --limit 4 --crop 128 --steps 20 --out configs/restore/deblur_gaussian_tuned.yaml
    diffpir-restore predict --config configs/restore/deblur_gaussian_tuned.yaml

Search: ``grid`` (every ``lambda`` x ``zeta``) or ``coordinate`` (default: from the config's values snapped to the
grid, the best ``lambda`` for the current ``zeta``, then the best ``zeta`` for that ``lambda``, repeated until
nothing changes; about a third of the grid's cost). Objective: mean PSNR (uint8, maximised) or mean LPIPS
(minimised; images of at least 32 px and the offline LPIPS weights). ``lambda`` defaults to 8 values log-spaced
in [1, 50], ``zeta`` to 7 values in [0, 1].

Use validation images apart from those you report results on (the evaluation photos of ``data/eval`` are the
bundled sample photos' source).
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor

from diffpir.cli.evaluate import load_batches, method_init_args
from diffpir.methods import DiffPIRMethod
from diffpir.restoration.data import RestorationBatch
from diffpir.sampler import DiffPIR, EpsModel

__all__ = [
    "DEFAULT_LAMBDAS",
    "DEFAULT_ZETAS",
    "TuneResult",
    "evaluate",
    "load_batches",
    "check_config",
    "main",
    "run",
    "tune",
    "write_config",
]

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(f"{v:.3g}") for v in np.logspace(0, math.log10(50), 8))
DEFAULT_ZETAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SAMPLER_KEYS = tuple(k for k in DiffPIR.PARAMS if k not in ("lambda_", "zeta"))  # the rest is tuned
Objective = Literal["psnr", "lpips"]


@dataclass
class TuneResult:
    """The chosen ``lambda_`` and ``zeta``, their ``score`` and every evaluated point (``table``: dicts with
    ``lambda_``, ``zeta``, ``psnr`` and, when computed, ``lpips``)."""

    lambda_: float
    zeta: float
    score: float
    objective: str
    table: list[dict[str, float]] = field(default_factory=list)


def evaluate(
    prior: EpsModel,
    batches: Sequence[RestorationBatch],
    lambda_: float,
    zeta: float,
    sampler_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    lpips_metric: Any | None = None,
) -> dict[str, float]:
    """Mean PSNR (and LPIPS with ``lpips_metric``) of DiffPIR at ``(lambda_, zeta)`` over the batches; each image's
    sampler noise from ``image_generator(seed, key, "sample")`` as in ``diffpir-restore``."""
    from diffpir.metrics import psnr
    from diffpir.restoration.tasks import image_generator

    sampler = DiffPIRMethod(lambda_=lambda_, zeta=zeta, **(sampler_kwargs or {}))
    psnrs: list[Tensor] = []
    lpipss: list[Tensor] = []
    for batch in batches:
        if batch.x is None:
            raise ValueError("tuning needs the clean images (benchmark mode)")
        gens = [image_generator(seed, key, "sample") for key in batch.keys]
        x = sampler(batch.y.float(), batch.op, prior, sigma_n=batch.sigma_n, generator=gens).clamp(0, 1)
        psnrs.append(psnr(x, batch.x))
        if lpips_metric is not None:
            a, b = (x, batch.x) if x.shape[1] == 3 else (x.expand(-1, 3, -1, -1), batch.x.expand(-1, 3, -1, -1))
            lpipss.append(lpips_metric(a.float(), b.float()).double())
    out = {"lambda_": float(lambda_), "zeta": float(zeta), "psnr": float(torch.cat(psnrs).mean())}
    if lpipss:
        out["lpips"] = float(torch.cat(lpipss).mean())
    return out


def _nearest(values: Sequence[float], v: float) -> float:
    return min(values, key=lambda c: abs(math.log(c + 1e-3) - math.log(v + 1e-3)))


def tune(
    prior: EpsModel,
    batches: Sequence[RestorationBatch],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    zetas: Sequence[float] = DEFAULT_ZETAS,
    search: Literal["grid", "coordinate"] = "coordinate",
    objective: Objective = "psnr",
    sampler_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    start: tuple[float, float] = (7.0, 0.3),
    max_rounds: int = 4,
    lpips_metric: Any | None = None,
    log: Any = None,
) -> TuneResult:
    """Search ``lambda_`` x ``zeta`` (module docstring); returns the best point of all evaluated ones.

    Ties are broken towards the earlier-evaluated point. ``lpips_metric`` is required for ``objective="lpips"``.
    """
    if not lambdas or not zetas:
        raise ValueError("give at least one lambda and one zeta")
    if any(v <= 0 for v in lambdas) or any(not 0 <= v <= 1 for v in zetas):
        raise ValueError("lambdas must be positive and zetas lie in [0, 1]")
    if objective not in ("psnr", "lpips"):
        raise ValueError(f"objective must be 'psnr' or 'lpips', got {objective!r}")
    if objective == "lpips" and lpips_metric is None:
        raise ValueError("objective 'lpips' needs lpips_metric (diffpir.metrics.LPIPSMetric)")
    if search not in ("grid", "coordinate"):
        raise ValueError(f"search must be 'grid' or 'coordinate', got {search!r}")
    cache: dict[tuple[float, float], dict[str, float]] = {}

    def score(row: dict[str, float]) -> float:
        return row["psnr"] if objective == "psnr" else -row["lpips"]

    def run(lam: float, z: float) -> float:
        key = (float(lam), float(z))
        if key not in cache:
            cache[key] = evaluate(prior, batches, lam, z, sampler_kwargs, seed, lpips_metric)
            if log is not None:
                row = cache[key]
                extra = f", LPIPS {row['lpips']:.4f}" if "lpips" in row else ""
                log(f"lambda {lam:g}, zeta {z:g}: PSNR {row['psnr']:.3f} dB{extra}")
        return score(cache[key])

    if search == "grid":
        for lam in lambdas:
            for z in zetas:
                run(lam, z)
    else:
        lam, z = _nearest(lambdas, start[0]), min(zetas, key=lambda c: abs(c - start[1]))
        for _ in range(max_rounds):
            new_lam = max(lambdas, key=lambda v: run(v, z))
            new_z = max(zetas, key=lambda v: run(new_lam, v))
            if (new_lam, new_z) == (lam, z):
                break
            lam, z = new_lam, new_z
    best_key = max(cache, key=lambda k: score(cache[k]))
    return TuneResult(best_key[0], best_key[1], abs(score(cache[best_key])), objective, list(cache.values()))


def write_config(
    config: dict[str, Any],
    out: str | Path,
    result: TuneResult,
    *,
    source: str = "",
    prior: str | None = None,
    own_folder: bool = True,
) -> Path:
    """Write ``config`` with ``model.method.init_args.lambda_`` / ``zeta`` set to the result (and ``model.prior``
    when given) as YAML, with a header recording the search. With ``own_folder``, its ``writer.output_dir`` is the
    source's folder's sibling named after ``out`` (``outputs/restore/deblur_gaussian`` -> ``outputs/restore/<out's
    stem>``)."""
    cfg = yaml.safe_load(yaml.safe_dump(config))  # a deep copy of plain values
    model = cfg.setdefault("model", {})
    method = model.setdefault("method", {"class_path": "diffpir.methods.DiffPIRMethod"})
    settings = method.setdefault("init_args", {})
    settings["lambda_"], settings["zeta"] = float(result.lambda_), float(result.zeta)
    if prior is not None:
        model["prior"] = prior
    writer = cfg.get("writer")
    if own_folder and isinstance(writer, dict) and writer.get("output_dir"):
        # its own folder: the source config's holds outputs of other settings, which a run would refuse to mix
        writer["output_dir"] = str(Path(str(writer["output_dir"])).parent / Path(out).stem)
    rows = sorted(result.table, key=lambda r: (r["lambda_"], r["zeta"]))
    head = [
        f"# Tuned by diffpir.cli.tune from {source or 'a restoration config'}: {result.objective} "
        f"{'maximised' if result.objective == 'psnr' else 'minimised'}, best lambda_ = {result.lambda_:g}, "
        f"zeta = {result.zeta:g} ({result.objective} {result.score:.4f}).",
        "# Evaluated points (lambda_, zeta: mean PSNR dB[, LPIPS]):",
    ]
    for r in rows:
        lp = f", {r['lpips']:.4f}" if "lpips" in r else ""
        head.append(f"#   {r['lambda_']:g}, {r['zeta']:g}: {r['psnr']:.3f}{lp}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n" + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return out


def check_config(config: dict[str, Any], prior: str) -> None:
    """Parse and build ``config`` (with ``model.prior = prior``) through ``diffpir-restore``'s parser, so that a
    typo (an unknown key, a wrong type, a setting the method does not take) fails here as it would there: the
    message names the key, exit status 2."""
    from unittest import mock

    from diffpir.cli.restore import build_cli

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(sys, "argv", sys.argv[:1]):
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        checks = ["--model.prior", prior, "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
        build_cli(["--config", str(path), *checks, "--writer.output_dir", tmp], run=False)


def _set(config: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested config dict."""
    if "=" not in assignment:
        raise ValueError(f"--set takes KEY=VALUE (e.g. data.degradation.kernel_size=31), got {assignment!r}")
    key, value = assignment.split("=", 1)
    node = config
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="diffpir-tune", description=__doc__.splitlines()[0], default_env=False)
    p.add_argument("--config", required=True, help="the task's restoration config (configs/restore/<task>.yaml)")
    p.add_argument("--out", required=True, help="where to write the tuned config (YAML)")
    p.add_argument("--prior", default=None, help="prior file or bundled name (null: the config's model.prior)")
    p.add_argument("--images", default=None, help="validation images (null: the config's data.images or the samples)")
    p.add_argument("--limit", type=int, default=3, help="validation images to use")
    p.add_argument("--crop", type=int, default=None, help="centre-crop the images to at most CROP px")
    p.add_argument("--sigma-n", type=float, default=None, help="noise level to tune for (sets data.degradation)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (sets model.method.init_args.steps)")
    p.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), help="lambda_ values to try")
    p.add_argument("--zetas", type=float, nargs="+", default=list(DEFAULT_ZETAS), help="zeta values to try")
    p.add_argument(
        "--search",
        choices=["coordinate", "grid"],
        default="coordinate",
        help="coordinate: alternate the best lambda_ and the best zeta until neither moves; grid: every pair",
    )
    p.add_argument("--objective", choices=["psnr", "lpips"], default="psnr", help="maximise PSNR or minimise LPIPS")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (null: the config's model.seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--device", default="cpu", help="torch device of the prior and the runs (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffpir-tune`` (and ``python -m diffpir.cli.tune``): :func:`run`, then exit status 0."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> TuneResult:
    """Tune, print the table, write the config; returns the result (the command line of ``diffpir-tune``)."""
    args = _parser().parse_args(None if argv is None else list(argv))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from diffpir.priorfile import load_prior

    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
    for assignment in args.set:
        _set(config, assignment)
    if args.sigma_n is not None:
        _set(config, f"data.degradation.sigma_n={args.sigma_n}")
    if args.steps is not None:
        _set(config, f"model.method.init_args.steps={args.steps}")
    model = config.get("model") or {}
    method = model.get("method") or {}
    kind = str(method.get("class_path", "DiffPIRMethod") if isinstance(method, dict) else method).rsplit(".", 1)[-1]
    task = ((config.get("data") or {}).get("degradation") or {}).get("task")
    if kind != "DiffPIRMethod" or task == "deblur_blind":
        _parser().error(
            f"diffpir-tune tunes DiffPIR's lambda_ and zeta for a known operator; {args.config} runs "
            f"{'blind deblurring' if task == 'deblur_blind' else kind}: tune that by hand (docs/restoration.md)"
        )
    prior_ref = args.prior if args.prior is not None else model.get("prior", "natural")
    check_config(config, str(prior_ref))
    device = torch.device(args.device)
    prior = load_prior(prior_ref, preset=model.get("preset")).to(device)
    batches = [b.to(device) for b in load_batches(config, args.images, args.limit, args.crop, prior.in_channels)]
    metric = None
    if args.objective == "lpips":
        from diffpir.metrics import LPIPSMetric

        metric = LPIPSMetric(model.get("lpips_net", "vgg")).to(device)
    settings = method_init_args(config)
    sampler_kwargs = {k: settings[k] for k in SAMPLER_KEYS if settings.get(k) is not None}
    seed = args.seed if args.seed is not None else int(model.get("seed", 0))
    n = sum(len(b) for b in batches)
    print(f"tuning lambda_ x zeta ({args.search}, {args.objective}) on {n} image(s) of {args.config}", flush=True)
    result = tune(
        prior,
        batches,
        args.lambdas,
        args.zetas,
        args.search,
        args.objective,
        sampler_kwargs,
        seed,
        (float(settings.get("lambda_", 7.0)), float(settings.get("zeta", 0.3))),
        lpips_metric=metric,
        log=lambda msg: print(msg, flush=True),
    )
    own = not any(a.strip().startswith("writer.output_dir=") for a in args.set)  # unless --set names one
    out = write_config(config, args.out, result, source=args.config, prior=str(prior_ref), own_folder=own)
    print(
        f"best: lambda_ = {result.lambda_:g}, zeta = {result.zeta:g} ({result.objective} {result.score:.4f}) -> {out}"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
