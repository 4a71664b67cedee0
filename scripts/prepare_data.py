"""Prepare the offline datasets: ``python scripts/prepare_data.py {digits,natural,eval,kernels,all} [--out data]``.

A thin command line over :mod:`diffpir.prepare`; each step is idempotent and can be rerun. ``all`` runs
digits, natural and eval in that order; ``kernels`` (20k synthetic camera-shake kernels for a kernel prior, a few
minutes) only when named. ``samples`` (not part of ``all``) writes the committed demo
photographs in ``diffpir/assets/samples/`` that are missing or invalid (a maintainer's step; delete one to regenerate
it; ``--out`` does not apply to it). No argument means ``all``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffpir import prepare

STEPS = {
    "digits": prepare.prepare_digits,
    "natural": prepare.prepare_natural,
    "eval": prepare.prepare_eval,
    "kernels": prepare.prepare_kernels,
}
ALL = ("digits", "natural", "eval")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*STEPS, "all", "samples"]
    # no argparse ``choices`` here: with nargs="*" it checks the default list as one value and rejects it
    parser.add_argument(
        "what",
        nargs="*",
        metavar="{" + ",".join(choices) + "}",
        help="datasets to prepare (default: all = digits, natural, eval)",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data/)")
    args = parser.parse_args(argv)
    what = args.what or ["all"]
    unknown = [w for w in what if w not in choices]
    if unknown:
        parser.error(f"unknown dataset {unknown[0]!r}: choose from {', '.join(choices)}")
    names = [n for n in STEPS if n in what or ("all" in what and n in ALL)]
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} -> {args.out / name}", flush=True)
        STEPS[name](args.out)
        print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    if "samples" in what:
        prepare.prepare_samples()
    return 0


if __name__ == "__main__":
    sys.exit(main())
