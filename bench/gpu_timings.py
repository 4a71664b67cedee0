"""GPU timings in one short run (the timing half of scripts/gpu_train_natural.sh):

    python bench/gpu_timings.py [--out DIR]                                  # on a CUDA machine
    python bench/gpu_timings.py --device cpu --nfe 2 --size 64 --batches 1 2 --train-batch 2 --train-size 32 \
        --forward-size 32 --forward-batches 1 --repeats 1 --out /tmp/t      # a dry run on the CPU

1. DiffPIR restoration with the bundled ``natural`` prior at ``--size`` px (256) and ``--nfe`` NFEs (100): seconds per
   image at batch 1 and 16 (Gaussian deblurring, fp32 and bf16 autocast), sampler only, after one warm-up batch;
2. one forward of the ``ffhq_10m``-size UNet (93.6M parameters, random weights) at 256 px, batch 1 and 8, fp32 and
   bf16, with ``torch.compile`` when ``--compile`` (reported separately; compilation time excluded and printed);
3. training img/s of the ``natural`` net on ``--train-size`` px patches (256, as ``configs/train/natural_gpu.yaml``;
   the training step of ``DiffusionModule``: the loss, backward, AdamW), batch ``--train-batch`` (16, as the
   config), fp32 vs bf16 autocast vs bf16 + channels_last.

Each figure is the median of ``--repeats`` timed runs, with ``torch.cuda.synchronize`` around them. Writes
``<out>/gpu_timings.json`` (with the GPU's name, torch version and date) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def restore_once(sampler, y, op, prior, device: torch.device) -> None:
    with torch.no_grad():
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(y.shape[0])]
        sampler(y, op, prior, sigma_n=0.05, generator=gens)


def forward_once(model, x, t, device: torch.device, bf16: bool) -> None:
    with torch.no_grad(), autocast(device, bf16):
        model(x, t)


def train_step(module, opt, x, gen, device: torch.device, bf16: bool) -> None:
    with autocast(device, bf16):
        loss = module.model_step(x, gen.manual_seed(0))["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def restoration(args: argparse.Namespace, device: torch.device) -> dict:
    from diffpir import DiffPIR, load_prior
    from diffpir.operators import Blur, gaussian_kernel

    res = {}
    for precision in ("fp32", "bf16"):
        prior = load_prior(args.prior, map_location=device)
        if precision == "bf16":
            prior.autocast_dtype = torch.bfloat16
        op = Blur(gaussian_kernel(min(61, args.size // 2 * 2 - 1), 3.0)).to(device)  # 61x61 at 256 px
        sampler = DiffPIR(prior.schedule, steps=args.nfe, lambda_=7.0, zeta=0.3)
        for batch in args.batches:
            x = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
            run = functools.partial(restore_once, sampler, op(x), op, prior, device)
            seconds = timed(run, device, args.repeats)
            res[f"{precision}_batch{batch}"] = {"s_per_image": seconds / batch, "s_per_batch": seconds}
            print(f"restore {precision} batch {batch:3d}: {seconds / batch:.3f} s/image ({args.nfe} NFEs)", flush=True)
    return res


def big_forward(args: argparse.Namespace, device: torch.device) -> dict:
    from diffpir.models import build_unet

    net = build_unet("ffhq_10m").to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    res: dict = {"params": params}
    variants = [("fp32", False, net), ("bf16", True, net)]
    if args.compile and device.type == "cuda":
        start = time.perf_counter()
        compiled = torch.compile(net)
        with torch.no_grad(), autocast(device, True):
            compiled(
                torch.randn(1, 3, args.forward_size, args.forward_size, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
            )
        _sync(device)
        res["compile_seconds"] = time.perf_counter() - start
        variants.append(("bf16_compile", True, compiled))
    for name, bf16, model in variants:
        for batch in args.forward_batches:
            x = torch.randn(batch, 3, args.forward_size, args.forward_size, device=device)
            t = torch.full((batch,), 500, dtype=torch.long, device=device)
            seconds = timed(functools.partial(forward_once, model, x, t, device, bf16), device, args.repeats)
            res[f"{name}_batch{batch}"] = {"s_per_forward": seconds, "img_per_s": batch / seconds}
            print(
                f"ffhq_10m forward {name:13s} {args.forward_size} px batch {batch}: {seconds * 1000:.1f} ms", flush=True
            )
    return res


def training(args: argparse.Namespace, device: torch.device) -> dict:
    from diffpir.models import build_unet
    from diffpir.training import DiffusionModule

    res = {}
    data = torch.rand(
        args.train_batch, 3, args.train_size, args.train_size, generator=torch.Generator().manual_seed(0)
    ).to(device)
    for name, bf16, channels_last in (("fp32", False, False), ("bf16", True, False), ("bf16_cl", True, True)):
        net = build_unet(args.train_preset).to(device)
        x = data
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = data.contiguous(memory_format=torch.channels_last)
        module = DiffusionModule(net, ema_decay=None).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        gen = torch.Generator(device=device)
        seconds = timed(functools.partial(train_step, module, opt, x, gen, device, bf16), device, args.repeats)
        res[name] = {
            "img_per_s": args.train_batch / seconds,
            "s_per_step": seconds,
            "size": args.train_size,
            "batch": args.train_batch,
        }
        print(
            f"train natural {args.train_size} px {name:8s} batch {args.train_batch}: "
            f"{args.train_batch / seconds:.1f} img/s",
            flush=True,
        )
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prior", default="natural", help="prior of the restoration timings (name or file)")
    ap.add_argument("--train-preset", default="natural", help="UNet preset of the training timings")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=100)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--train-batch", type=int, default=16, help="training timings' batch (natural_gpu.yaml's)")
    ap.add_argument("--train-size", type=int, default=256, help="training timings' patch side (natural_gpu.yaml's)")
    ap.add_argument("--forward-size", type=int, default=256, help="input side of the ffhq_10m-size forward")
    ap.add_argument("--forward-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the big forward (CUDA)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["restore", "forward", "train"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "args": vars(args) | {"out": str(args.out)},
    }
    result: dict = {"info": info}
    for key, fn in (("restore", restoration), ("forward", big_forward), ("train", training)):
        if key not in args.skip:
            result[key] = fn(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_timings.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
