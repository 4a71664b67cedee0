"""How far an image restored in a batch can drift from the same image restored alone, and where the tests'
tolerance comes from.

    python bench/batch_invariance.py [--seeds 5] [--natural]

The network's convolutions round differently for different batch sizes on some machines (oneDNN on AVX2:
``Conv2d(3, 8, 3)`` on a batch of 2 against 1 differs by 4.8e-7; cuDNN picks algorithms by batch size too). This
script injects a discrepancy of that size, ``out + 5e-7 * max(|out|, 1) * u`` with ``u ~ U(-1, 1)``, into the output
of every ``Conv2d`` and ``Linear`` of the network, and measures how much the final image moves (max abs difference
on the [0, 1] scale), for every method on every paper task on the tests' tiny network (32x32, the tests' step
counts), for DiffPIR at 20 steps, and (``--natural``) on the bundled natural prior (64x64 crops, 20 steps). It also
reports the plain batch-of-2 against alone difference of this machine, with and without ``batch_invariant``.

Writes bench/results/batch_invariance.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from diffpir import NoiseSchedule
from diffpir.methods import build_method, ffdnet_available
from diffpir.models import build_unet
from diffpir.prior import Prior
from diffpir.priorfile import load_prior
from diffpir.restoration.tasks import Degradation, build_operator, degrade, synthesize_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import default_init  # noqa: E402

TASKS = ("deblur_gaussian", "deblur_motion", "sr_x4", "inpaint_box", "inpaint_random", "denoise")
# The step counts of tests/test_methods.py::test_every_method_runs_on_every_paper_task.
TEST_ARGS = {
    "diffpir": {"steps": 3},
    "dps": {"steps": 3},
    "ddnm": {"steps": 3},
    "dpir": {"iterations": 3},
    "dpir_ffdnet": {"iterations": 2},
    "classical": {},
}
DELTA = 5e-7


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def task_batch(task: str, size: int, n: int = 2, images: torch.Tensor | None = None):
    spec = Degradation(task=task, kernel_size=9, kernel_std=1.5, box=size * 3 // 8, margin=2)
    xs = images if images is not None else torch.rand(n, 3, size, size, generator=gen(11))
    params = [synthesize_params(spec, f"img{i}", size, size, 0) for i in range(n)]
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    ys = torch.stack([degrade(spec, xs[i], params[i], gen(20 + i)) for i in range(n)])
    return spec, build_operator(spec, stacked), ys


class Perturb:
    """Forward hooks adding ``DELTA * max(|out|, 1) * U(-1, 1)`` to every Conv2d / Linear output."""

    def __init__(self, net: torch.nn.Module, seed: int):
        self.g = gen(seed)
        self.handles = [
            m.register_forward_hook(self.hook)
            for m in net.modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]

    def hook(self, module, inputs, out):
        u = torch.rand(out.shape, generator=self.g, dtype=out.dtype) * 2 - 1
        return out + DELTA * out.detach().abs().clamp_min(1.0) * u

    def remove(self):
        for h in self.handles:
            h.remove()


def drift(prior: Prior, method_name: str, kwargs: dict, task: str, size: int, seeds: int, images=None) -> float:
    """Max over seeds of max |perturbed - clean| of the restored batch."""
    spec, op, y = task_batch(task, size, images=images)
    method = build_method(method_name, **kwargs)
    clean = method(y, op, prior, spec.sigma_n, generator=[gen(0), gen(1)])
    worst = 0.0
    for s in range(seeds):
        p = Perturb(prior, 1000 + s)
        try:
            out = method(y, op, prior, spec.sigma_n, generator=[gen(0), gen(1)])
        finally:
            p.remove()
        worst = max(worst, float((out - clean).abs().max()))
    return worst


def batch_vs_alone(prior: Prior, task: str, size: int, steps: int, exact: bool) -> float:
    spec, op, y = task_batch(task, size)
    method = build_method("diffpir", steps=steps, batch_invariant=exact)
    out = method(y, op, prior, spec.sigma_n, generator=[gen(0), gen(1)])
    params = {"kernel": op.kernel} if hasattr(op, "kernel") else {"mask": op.mask} if hasattr(op, "mask") else {}
    op1 = build_operator(spec, {k: v[1:] for k, v in params.items()})
    one = method(y[1:], op1, prior, spec.sigma_n, generator=[gen(1)])
    return float((out[1:] - one).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--natural", action="store_true", help="also the bundled natural prior at 64x64, 20 steps")
    ap.add_argument("--out", default="bench/results/batch_invariance")
    args = ap.parse_args(argv)
    tiny = Prior(default_init(build_unet("tiny"), 0), NoiseSchedule.linear())  # the tests' tiny network
    tiny = tiny.eval().requires_grad_(False)
    rows = []
    for task in TASKS:
        for name in TEST_ARGS:  # the non-blind methods (blind deblurring is no method of these tasks)
            if name == "dpir_ffdnet" and not ffdnet_available():
                continue
            d = drift(tiny, name, TEST_ARGS[name], task, 32, args.seeds)
            rows.append({"prior": "tiny", "size": 32, "method": name, "task": task, **TEST_ARGS[name], "drift": d})
            print(f"tiny 32px {name:12s} {task:16s} {TEST_ARGS[name]}: drift {d:.2e}", flush=True)
        d = drift(tiny, "diffpir", {"steps": 20}, task, 32, args.seeds)
        rows.append({"prior": "tiny", "size": 32, "method": "diffpir", "task": task, "steps": 20, "drift": d})
        print(f"tiny 32px diffpir      {task:16s} 20 steps: drift {d:.2e}", flush=True)
    if args.natural:
        natural = load_prior("natural").eval().requires_grad_(False)
        from diffpir.datasets import sample_images
        from diffpir.io import read_image

        images = torch.stack([read_image(p)[:, 96:160, 96:160] for p in sorted(sample_images())[:2]])
        for task in TASKS:
            d = drift(natural, "diffpir", {"steps": 20}, task, 64, args.seeds, images=images)
            rows.append({"prior": "natural", "size": 64, "method": "diffpir", "task": task, "steps": 20, "drift": d})
            print(f"natural 64px diffpir   {task:16s} 20 steps: drift {d:.2e}", flush=True)
    machine = [
        {"task": t, "batched": batch_vs_alone(tiny, t, 32, 20, False), "exact": batch_vs_alone(tiny, t, 32, 20, True)}
        for t in TASKS
    ]
    worst_test = max(r["drift"] for r in rows if r["prior"] == "tiny" and r.get("steps") != 20)
    result = {
        "delta": DELTA,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "rows": rows,
        "batch_vs_alone_this_machine": machine,
        "worst_drift_test_settings": worst_test,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Drift of the restored image (max abs, [0, 1] scale) when every Conv2d/Linear output of the network is "
        f"perturbed by {DELTA:g} x max(|out|, 1) x U(-1, 1), max over {args.seeds} perturbations "
        f"(torch {torch.__version__}, {result['capability']}, {result['threads']} threads).",
        "",
        "| prior | size | method | task | steps | drift |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = r.get("steps", r.get("iterations", "-"))
        lines.append(f"| {r['prior']} | {r['size']} | {r['method']} | {r['task']} | {steps} | {r['drift']:.2e} |")
    lines += ["", "Batch of 2 against alone on this machine (tiny prior, DiffPIR 20 steps):", ""]
    lines += ["| task | batched | batch_invariant |", "|---|---|---|"]
    lines += [f"| {m['task']} | {m['batched']:.2e} | {m['exact']:.2e} |" for m in machine]
    lines += ["", f"Worst drift at the tests' settings: {worst_test:.2e}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
