"""Training throughput: the Lightning training step of DiffusionModule vs a plain PyTorch loop, side by side.

    python bench/train_throughput.py [--preset small] [--batch 32] [--size 32] [--steps 8] [--repeats 7]
                                     [--threads 1]

Both sides train the same network (same initial weights) on the same in-memory batches ([0, 1] images through
a DataLoader) with the same work per step: the DDPM simple loss with seeded t and noise, AdamW with a linear
LR warm-up stepped per step, gradient clipping (norm 1.0) and an EMA update. The Lightning side is
``Trainer(...).fit(DiffusionModule(net), loader)`` with logging of ``train/loss`` on; the plain side is a
hand-written loop. Images per second are timed from the end of the warm-up steps to the end of the last step
(Trainer start-up, a one-off cost, is not counted). Runs alternate (plain, Lightning, plain, ...) so machine
noise hits both alike; the result is the ratio of the medians (goal: Lightning / plain >= 0.95), with the
median of the per-pair ratios beside it. ``--threads 1`` (default) keeps OpenMP threads from waiting on each
other on a shared, oversubscribed CPU, which otherwise swings a small net's speed several-fold between runs.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from diffpir.models import build_unet
from diffpir.schedule import NoiseSchedule
from diffpir.training import EMA, DiffusionModule
from diffpir.training.module import lr_factor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import quiet_trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
HP = dict(lr=2e-4, weight_decay=0.0, adam_betas=(0.9, 0.999), warmup_steps=100, ema_decay=0.999)


def make_data(n: int, channels: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=g)


def loader(data: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=False, drop_last=True, num_workers=0)


def plain_run(init: dict, preset: str, data: torch.Tensor, batch: int, warmup: int, steps: int) -> float:
    """The hand-written loop; returns images per second over the timed steps."""
    net = build_unet(preset)
    net.load_state_dict(init)
    net.train()
    sched = NoiseSchedule.linear()
    ema = EMA(net, HP["ema_decay"])
    opt = torch.optim.AdamW(net.parameters(), lr=HP["lr"], betas=HP["adam_betas"], weight_decay=HP["weight_decay"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, HP["warmup_steps"]))
    gen = torch.Generator()
    step, t0 = 0, None
    while step < warmup + steps:
        for x in loader(data, batch):
            if step == warmup:
                t0 = time.perf_counter()
            if step == warmup + steps:
                break
            gen.manual_seed(step)
            x0 = x * 2.0 - 1.0
            t = torch.randint(0, sched.T, (x0.shape[0],), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            eps = net(sched.q_sample(x0, t, noise), t)[:, : x0.shape[1]]
            loss = (eps - noise).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            ema.update(net)
            step += 1
    return steps * batch / (time.perf_counter() - t0)


class _Timer(Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.t0: float | None = None
        self.t1: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t1 = time.perf_counter()


def lightning_run(init: dict, preset: str, data: torch.Tensor, batch: int, warmup: int, steps: int) -> float:
    """``Trainer.fit`` of DiffusionModule; returns images per second over the timed steps."""
    net = build_unet(preset)
    net.load_state_dict(init)
    module = DiffusionModule(net, **HP)
    timer = _Timer(warmup)
    trainer = quiet_trainer(
        max_steps=warmup + steps,
        max_epochs=-1,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader(data, batch))
    return steps * batch / (timer.t1 - timer.t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    net = build_unet(args.preset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * (0.02 if prm.ndim > 1 else 0.0))
    init = net.state_dict()
    data = make_data(args.batch * (args.warmup + args.steps), net.in_channels, args.size)

    plain, light = [], []
    for r in range(args.repeats):
        plain.append(plain_run(init, args.preset, data, args.batch, args.warmup, args.steps))
        light.append(lightning_run(init, args.preset, data, args.batch, args.warmup, args.steps))
        print(f"repeat {r + 1}/{args.repeats}: plain {plain[-1]:7.1f} img/s   lightning {light[-1]:7.1f} img/s")
    mp, ml = statistics.median(plain), statistics.median(light)
    ratio = ml / mp
    pair = statistics.median(b / a for a, b in zip(plain, light))
    print(f"median: plain {mp:.1f} img/s, lightning {ml:.1f} img/s, ratio lightning/plain = {ratio:.3f}")
    print(f"median of the per-repeat ratios: {pair:.3f}")
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "batch": args.batch,
        "image_size": args.size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "plain_img_per_s": [round(v, 2) for v in plain],
        "lightning_img_per_s": [round(v, 2) for v in light],
        "median_plain_img_per_s": round(mp, 2),
        "median_lightning_img_per_s": round(ml, 2),
        "ratio_lightning_over_plain": round(ratio, 4),
        "per_repeat_ratio": [round(b / a, 4) for a, b in zip(plain, light)],
        "median_per_repeat_ratio": round(statistics.median(b / a for a, b in zip(plain, light)), 4),
        "goal": 0.95,
        "meets_goal": ratio >= 0.95,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
