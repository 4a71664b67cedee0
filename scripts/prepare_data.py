"""Prepare the offline datasets: ``python scripts/prepare_data.py {digits,natural,eval,all} [--out data]``.

A thin command line over :mod:`diffpir.datasets`; each step is idempotent and can be rerun. ``all`` runs
digits, natural and eval in that order. ``samples`` (not part of ``all``) rewrites the committed demo
photographs in ``diffpir/assets/samples/`` (a maintainer's step; ``--out`` does not apply to it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffpir import datasets

STEPS = {
    "digits": datasets.prepare_digits,
    "natural": datasets.prepare_natural,
    "eval": datasets.prepare_eval,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        nargs="*",
        default=["all"],
        choices=[*STEPS, "all", "samples"],
        help="datasets to prepare (default: all = digits, natural, eval)",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data/)")
    args = parser.parse_args(argv)
    names = list(STEPS) if "all" in args.what else [n for n in STEPS if n in args.what]
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} -> {args.out / name}", flush=True)
        STEPS[name](args.out)
        print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    if "samples" in args.what:
        datasets.prepare_samples()
    return 0


if __name__ == "__main__":
    sys.exit(main())
