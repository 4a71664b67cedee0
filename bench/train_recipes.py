"""Training recipes side by side at equal compute: which recipe gives the best prior per training step?

    python bench/train_recipes.py [--recipes ddpm min_snr v v_min_snr quad] [--steps 400] [--batch 32]
                                  [--threads 2] [--data data/digits] [--out bench/results/train_recipes]
    python bench/train_recipes.py --throughput [--threads 2]         # CPU img/s: threads, channels_last, bf16, compile
    python bench/train_recipes.py --priors digits runs/x/last.ckpt [--box-steps 100]  # score trained priors alike

Every recipe trains the same network (the ``digits`` UNet preset, the same initial weights), on the same data in the
same order (``data/digits/train``, ``python scripts/prepare_data.py digits``), for the same steps x batch, with the
same optimiser, warm-up and EMA as ``configs/train/digits.yaml``, through ``DiffusionModule`` and a Lightning
``Trainer`` (what ``diffpir-train fit`` runs). Only the recipe differs:

- ``ddpm``: eps-prediction, t ~ U{0..T-1}, plain MSE (today's recipe);
- ``min_snr``: Min-SNR-gamma loss weights, gamma 5 (Hang et al. 2023);
- ``v``: v-prediction (Salimans & Ho 2022; the exported prior is still an eps-model through ``Prior.eps``);
- ``v_min_snr``: both;
- ``quad``: eps, half the timesteps drawn with density ~ 1/sqrt(t), where DiffPIR's quad step sequence spends its
  steps (``timestep_sampling="quad"``);
- ``v_min_snr_quad``: all three;
- ``min_snr_wsd``: Min-SNR with the LR decayed linearly to 0 over the last 20 % of the steps (``cooldown_steps``;
  warm-up, stable, decay: Hägele et al. 2024).
- ``edm``: EDM's training (Karras et al. 2022) mapped onto this DDPM schedule: its preconditioning with
  ``sigma_data = 1``, which on the variance-preserving process is exactly v-prediction with an unweighted loss on
  the net's output (docs/training.md), and its log-normal noise levels, ``ln sigma ~ N(-1.2, 1.2^2)``
  (``timestep_sampling="lognormal"``, ``timestep_mix=1``);
- ``edm_mix``: the same with half the timesteps uniform (``timestep_mix=0.5``), for the high-noise steps that
  sampling from pure noise needs.

The held-out digits (``data/digits/val``, never trained on, 50 per class) are split in two halves with every class
in each (:func:`held_out_halves`): "validation" is kept for choosing settings, "evaluation" gives every number in
the table (its order is shuffled once, seeded, so the first ``--restore-count`` digits mix all classes too).
``--split val`` scores on the validation half instead, with another draw of samples (seed 1 instead of 0): that is
the run to choose a prior or a setting by, so that the evaluation figures stay unseen:

1. one-step denoising PSNR at sigma 15/25/50 (0-255 scale) with the EMA weights (``Prior.denoise``);
2. sample quality: 256 DDIM samples (50 steps, eta 0) judged by a small CNN classifier that this script trains on the
   training split's labels, plus an eleventh class of generated non-digits (:func:`junk_images`: levels, noise,
   smoothed noise; its held-out accuracy is printed): the share recognised as a digit with confidence >= 0.9 (also
   over the first 64 samples, the issue's count); the share recognised and *typical*, i.e. also within the radius,
   in the judge's features, around its class's training digits that holds 99 % of the validation digits
   (:func:`fit_typicality`: a confident label on a blank or noisy field, which the judge gives freely to samples
   unlike any digit, does not count); the classes among those, and the Frechet distance between the
   classifier's 64-d penultimate features of the samples and of the evaluation digits (a digit-domain FID: lower is
   closer to real digits);
3. DiffPIR at equal NFEs on the evaluation digits: box inpainting (12x14 box in the middle, lambda 1, zeta 1,
   20 NFEs by default, ``--box-steps``) against the harmonic fill, and Gaussian deblurring (9x9, std 2, sigma_n 0.05,
   lambda 7, zeta 0.3, 20 NFEs) against Wiener deconvolution.

``--priors`` skips the training and scores finished priors (bundled names, exports or Lightning checkpoints) the
same way, e.g. the bundled ``digits`` prior before and after a retraining.

Spread: each PSNR is reported as mean +- standard error over the evaluation digits. Writes
``<out>.json`` and ``<out>.md`` (and ``docs/figures/train_recipes.png`` with ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import quiet_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# DiffusionModule arguments per recipe, except ``cooldown_fraction``: train_recipe turns it into cooldown_steps.
RECIPES: dict[str, dict] = {
    "ddpm": {},
    "min_snr": {"loss_weighting": "min_snr"},
    "v": {"prediction": "v"},
    "v_min_snr": {"prediction": "v", "loss_weighting": "min_snr"},
    "quad": {"timestep_sampling": "quad"},
    "v_min_snr_quad": {"prediction": "v", "loss_weighting": "min_snr", "timestep_sampling": "quad"},
    # Min-SNR with a warm-up-stable-decay LR: linear decay to 0 over the last 20 % of the steps (cooldown_steps).
    "min_snr_wsd": {"loss_weighting": "min_snr", "cooldown_fraction": 0.2},
    "edm": {"prediction": "v", "timestep_sampling": "lognormal", "timestep_mix": 1.0},
    "edm_mix": {"prediction": "v", "timestep_sampling": "lognormal", "timestep_mix": 0.5},
}
SIGMAS = (15, 25, 50)


# -- data -----------------------------------------------------------------------------------------------------------
def load_split(folder: Path) -> tuple[Tensor, Tensor]:
    """Images [N, 1, 32, 32] in [0, 1] and labels [N] (file names end in ``_<label>.png``)."""
    from diffpir.io import list_image_files, read_image

    files = list_image_files(folder, recursive=False)
    if not files:
        raise SystemExit(f"no digits in {folder}: run `python scripts/prepare_data.py digits` first")
    images = torch.stack([read_image(f, 1, decoder="pillow") for f in files])
    labels = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    return images, labels


# The held-out half scored, and the seed of the judged samples for it: the validation run draws other samples, so
# choosing a prior on it does not pick the evaluation draw.
SAMPLE_SEEDS = {"eval": 0, "val": 1}
SPLIT_NAMES = {"eval": "evaluation", "val": "validation"}


def held_out_halves(images: Tensor, labels: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(validation, evaluation): alternate digits of each class (the files are sorted by class, so a split by file
    order would give one half the classes 0-4 and the other 5-9); the evaluation half in a seeded random order."""
    val_idx, eval_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        val_idx.append(idx[0::2])
        eval_idx.append(idx[1::2])
    v, e = torch.cat(val_idx), torch.cat(eval_idx)
    if not len(e):
        raise SystemExit("the held-out split needs at least two digits of a class (one for each half)")
    e = e[torch.randperm(len(e), generator=torch.Generator().manual_seed(0))]
    return (images[v], labels[v]), (images[e], labels[e])


def mean_se(values: Tensor) -> tuple[float, float]:
    v = values.double()
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


# -- the judge ------------------------------------------------------------------------------------------------------
JUNK = 10  # the judge's eleventh class: "not a digit"


def junk_images(n: int, generator: torch.Generator) -> Tensor:
    """``n`` fields ``[n, 1, 32, 32]`` in [0, 1] that are not digits, the failures of an undertrained prior: a
    uniform level plus noise of a random strength (none to heavy), smoothed over a random window (1-9 px)."""
    out = torch.empty(n, 1, 32, 32)
    for i in range(n):
        level, strength = torch.rand(2, generator=generator).tolist()
        w = 1 + 2 * int(torch.randint(0, 5, (1,), generator=generator))
        noise = F.avg_pool2d(torch.randn(1, 1, 32 + w - 1, 32 + w - 1, generator=generator), w, 1)
        noise = noise / noise.std().clamp_min(1e-6)
        out[i] = (level + 0.5 * strength * noise).clamp(0, 1)[0]
    return out


class DigitNet(nn.Module):
    """A small CNN digit classifier (three conv + batch-norm blocks); ``features`` is the 64-d penultimate layer.
    Eleven classes: the digits and :data:`JUNK`."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        chans = (1, width, 2 * width, 4 * width)
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            pool = nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(2)
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), pool]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * width, 64), nn.ReLU())
        self.head = nn.Linear(64, JUNK + 1)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x * 2 - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 30, seed: int = 0) -> DigitNet:
    """Adam (lr 2e-3 decaying linearly to 0), batch 64, random shifts of up to 2 px (so slightly off-centre samples
    are still judged fairly), plus 8 :func:`junk_images` per batch labelled :data:`JUNK` (without them the judge
    gives blank or noisy fields a confident digit label)."""
    g = torch.Generator().manual_seed(seed)
    net = DigitNet()
    with torch.no_grad():  # seeded initialisation without touching the global RNG
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # batch-norm layers keep their ones and zeros
                bound = 1 / math.sqrt(m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n = len(images)
    total = epochs * -(-n // 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = order[i : i + 64]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.cat([torch.roll(images[idx], (dy, dx), dims=(2, 3)), junk_images(8, g)])
            y = torch.cat([labels[idx], torch.full((8,), JUNK, dtype=labels.dtype)])
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


class Typicality(NamedTuple):
    """Per-class centroids ``[K, D]`` and scales ``[K]`` of the judge's features, and the radius ``tau``."""

    centroids: Tensor
    scales: Tensor
    tau: float


def fit_typicality(
    train_f: Tensor, train_y: Tensor, calib_f: Tensor, calib_pred: Tensor, quantile: float = 0.99
) -> Typicality:
    """A rejection rule for the judge: the distance ``d = ||f - mu_c|| / s_c`` of a feature vector to the centroid of
    its predicted class ``c`` (``mu_c``, ``s_c``: mean feature and mean distance to it of the training digits of
    class c), and the radius ``tau``: the ``quantile`` of ``d`` over real digits the judge never trained on
    (``calib_f`` with its predictions). A confident label on a blank field or noise is then rejected when the
    sample lies outside where real digits of that class lie."""
    k = int(train_y.max()) + 1
    centroids = torch.stack([train_f[train_y == c].mean(0) for c in range(k)])
    scales = torch.stack([(train_f[train_y == c] - centroids[c]).norm(dim=1).mean() for c in range(k)])
    d = (calib_f - centroids[calib_pred]).norm(dim=1) / scales[calib_pred].clamp_min(1e-12)
    return Typicality(centroids, scales, float(torch.quantile(d, quantile)))


def typical(f: Tensor, pred: Tensor, model: Typicality) -> Tensor:
    """Bool ``[N]``: features ``f`` within the radius of their predicted class (:func:`fit_typicality`)."""
    d = (f - model.centroids[pred]).norm(dim=1) / model.scales[pred].clamp_min(1e-12)
    return d <= model.tau


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# -- training -------------------------------------------------------------------------------------------------------
def grey_net(preset: str) -> nn.Module:
    """The recipe network: ``preset`` with one input/output channel (``digits`` already has one)."""
    from diffpir.models import build_unet

    return build_unet(preset, in_channels=1, out_channels=1)


def initial_weights(preset: str = "digits", seed: int = 0) -> dict[str, Tensor]:
    """The ``digits`` preset's weights, re-drawn from a seeded generator (the global RNG is never seeded): every
    non-constant weight matrix/kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's default, non-constant
    vectors (biases) zero; constant tensors (zero-initialised output layers, norm scales) stay as built."""
    g = torch.Generator().manual_seed(seed)
    state = grey_net(preset).state_dict()
    for p in state.values():
        if not p.is_floating_point() or bool((p == p.flatten()[0]).all()):
            continue
        if p.ndim > 1:
            bound = 1 / math.sqrt(p[0].numel())
            p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        else:
            p.zero_()
    return {k: v.clone() for k, v in state.items()}


def train_recipe(name: str, init: dict[str, Tensor], args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Fit the recipe; returns the module (EMA weights in ``eval_prior``) and timing."""

    from diffpir.training import DiffusionModule, ImageFolderDataModule

    net = grey_net(args.preset)
    net.load_state_dict(init)
    recipe = dict(RECIPES[name])
    fraction = recipe.pop("cooldown_fraction", 0.0)
    if fraction:
        recipe["cooldown_steps"] = max(1, round(fraction * args.steps))
    module = DiffusionModule(net, lr=5e-4, warmup_steps=100, ema_decay=0.999, seed=0, **recipe)
    dm = ImageFolderDataModule(
        str(args.data / "train"),
        channels=1,
        crop_size=32,
        patches_per_image=1,
        hflip=False,
        batch_size=args.batch,
        num_workers=0,
        cache_images=True,
        val_fraction=0,
        seed=0,
    )
    trainer = quiet_trainer(
        max_steps=args.steps, max_epochs=-1, gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0
    )
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    return module, {"train_seconds": seconds, "img_per_s": args.steps * args.batch / seconds}


# -- evaluation -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(prior, judge: DigitNet, typ: Typicality, real: Tensor, args: argparse.Namespace) -> dict:
    from diffpir import DiffPIR
    from diffpir.methods import build_method
    from diffpir.metrics import psnr
    from diffpir.operators import Blur, Inpaint, gaussian_kernel
    from diffpir.training import ddim_sample

    out: dict = {}
    # 1. One-step denoising.
    for sigma in SIGMAS:
        g = torch.Generator().manual_seed(1000 + sigma)
        noisy = real + sigma / 255 * torch.randn(real.shape, generator=g)
        den = (prior.denoise(noisy * 2 - 1, 2 * sigma / 255) + 1) / 2
        out[f"denoise_sigma{sigma}"] = mean_se(psnr(den, real))
    # 2. Samples judged by the classifier.
    sample_seed = SAMPLE_SEEDS[args.split]
    samples = ddim_sample(
        prior, prior.schedule, (args.samples, 1, 32, 32), 50, 0.0, torch.Generator().manual_seed(sample_seed)
    )
    prob = judge(samples).softmax(1)
    conf, cls = prob.max(1)
    ok = (conf >= 0.9) & (cls != JUNK)
    feats = judge.features(samples)
    ok_typical = ok & typical(feats, cls.clamp(max=JUNK - 1), typ)
    out["junk"] = float((cls == JUNK).float().mean())
    out["recognised"] = float(ok.float().mean())
    out["recognised_first64"] = float(ok[:64].float().mean())
    out["recognised_typical"] = float(ok_typical.float().mean())
    out["recognised_typical_first64"] = float(ok_typical[:64].float().mean())
    out["classes"] = sorted({int(c) for c in cls[ok]})
    out["classes_typical"] = sorted({int(c) for c in cls[ok_typical]})
    out["frechet"] = frechet_distance(feats.numpy(), judge.features(real).numpy())
    out["_samples"] = samples[:64]
    # 3. DiffPIR at equal NFEs.
    real = real[: args.restore_count]
    gens = [torch.Generator().manual_seed(i) for i in range(len(real))]
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:20, 8:22] = 0
    op = Inpaint(mask)
    y = op(real)
    x = DiffPIR(prior.schedule, steps=args.box_steps, lambda_=1.0, zeta=1.0)(y, op, prior, sigma_n=0.0, generator=gens)
    harmonic = build_method("classical")(y, op, prior, sigma_n=0.0)
    out["inpaint_box"] = mean_se(psnr(x, real))
    out["inpaint_box_gain"] = mean_se(psnr(x, real) - psnr(harmonic, real))
    op = Blur(gaussian_kernel(9, 2.0))
    y = op(real) + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(7))
    gens = [torch.Generator().manual_seed(i) for i in range(len(real))]
    x = DiffPIR(prior.schedule, steps=20, lambda_=7.0, zeta=0.3)(y, op, prior, sigma_n=0.05, generator=gens)
    wiener = build_method("classical")(y, op, prior, sigma_n=0.05)
    out["deblur"] = mean_se(psnr(x, real))
    out["deblur_gain"] = mean_se(psnr(x, real) - psnr(wiener, real))
    return out


@torch.no_grad()
def baselines(real: Tensor) -> dict:
    """The recipe-independent rows: the inputs and the classical restorations."""
    from diffpir.methods import build_method
    from diffpir.metrics import psnr
    from diffpir.operators import Blur, Inpaint, gaussian_kernel

    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:20, 8:22] = 0
    op = Inpaint(mask)
    y = op(real)
    res = {"inpaint_box_input": mean_se(psnr(y, real))}
    res["inpaint_box_harmonic"] = mean_se(psnr(build_method("classical")(y, op, None, sigma_n=0.0), real))
    op = Blur(gaussian_kernel(9, 2.0))
    y = op(real) + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(7))
    res["deblur_input"] = mean_se(psnr(y, real))
    res["deblur_wiener"] = mean_se(psnr(build_method("classical")(y, op, None, sigma_n=0.05), real))
    return res


def fmt(v: tuple[float, float]) -> str:
    return f"{v[0]:.2f} +- {v[1]:.2f}"


def table(results: dict, base: dict, info: dict) -> str:
    what = (
        "Trained priors scored alike"
        if info.get("priors")
        else f"Recipes at equal compute: {info['steps']} steps x batch {info['batch']}, `{info['preset']}` UNet, on "
        "`digits` (same net, init, data order)"
    )
    split = SPLIT_NAMES[info.get("split", "eval")]
    lines = [
        f"{what}; evaluated on {info['eval_count']} held-out digits of the {split} half, samples drawn with seed "
        f"{info.get('sample_seed', 0)} ({info['restore_count']} restored; box inpainting "
        f"at {info.get('box_steps', 20)} NFEs). Classifier, on the evaluation half whatever the split: held-out "
        f"accuracy {100 * info['judge_accuracy']:.1f} %, "
        f"{100 * info['judge_confident_real']:.1f} % of real held-out digits recognised with confidence >= 0.9, "
        f"{100 * info.get('judge_typical_real', float('nan')):.1f} % recognised and typical (within the feature "
        "radius of their class that holds 99 % of the validation digits); "
        f"{100 * info.get('judge_junk_caught', float('nan')):.1f} % of fresh generated non-digits called non-digits. "
        f"`python bench/train_recipes.py {info['argv']}`",
        "",
        ("| prior |" if info.get("priors") else "| recipe |")
        + " denoise s15 | s25 | s50 | recognised, all samples (first 64) | recognised and typical (first 64) "
        "| classes (typical) | Frechet | box inpaint (gain vs harmonic) | deblur (gain vs Wiener) | train img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {fmt(r['denoise_sigma15'])} | {fmt(r['denoise_sigma25'])} | {fmt(r['denoise_sigma50'])} | "
            f"{100 * r['recognised']:.0f} % ({100 * r['recognised_first64']:.0f} %) | "
            f"{100 * r['recognised_typical']:.0f} % ({100 * r['recognised_typical_first64']:.0f} %) | "
            f"{len(r['classes_typical'])} | "
            f"{r['frechet']:.2f} | {fmt(r['inpaint_box'])} ({r['inpaint_box_gain'][0]:+.2f}) | "
            f"{fmt(r['deblur'])} ({r['deblur_gain'][0]:+.2f}) | {r['img_per_s']:.1f} |"
        )
    lines += [
        "",
        f"Inputs: box {fmt(base['inpaint_box_input'])} dB (harmonic fill {fmt(base['inpaint_box_harmonic'])}); "
        f"deblurring {fmt(base['deblur_input'])} dB (Wiener {fmt(base['deblur_wiener'])}). PSNR in dB, mean +- "
        f"standard error over the {split} digits; gains are paired per image.",
    ]
    return "\n".join(lines)


# -- throughput -----------------------------------------------------------------------------------------------------
def throughput(args: argparse.Namespace) -> dict:
    """Training img/s of the digits net at batch 32, one variant after another, repeated and interleaved."""
    from diffpir.training import DiffusionModule

    variants = {
        "1 thread": dict(threads=1),
        f"{args.threads} threads": dict(threads=args.threads),
        "channels_last": dict(threads=args.threads, channels_last=True),
        "bf16 autocast": dict(threads=args.threads, bf16=True),
        "torch.compile": dict(threads=args.threads, compile=True),
    }
    init = initial_weights(args.preset)
    data = torch.rand(args.batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    modules = {}
    for name, v in variants.items():
        net = grey_net(args.preset)
        net.load_state_dict(init)
        if v.get("channels_last"):
            net = net.to(memory_format=torch.channels_last)
        m = DiffusionModule(net, ema_decay=None)
        if v.get("compile"):
            m.enable_compile()
        modules[name] = (m, torch.optim.AdamW(net.parameters(), lr=1e-4))
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    gen = torch.Generator()

    def run(name: str, steps: int) -> float:
        m, opt = modules[name]
        v = variants[name]
        torch.set_num_threads(v["threads"])
        x = data.contiguous(memory_format=torch.channels_last) if v.get("channels_last") else data
        start = time.perf_counter()
        for s in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(v.get("bf16"))):
                loss = m.model_step(x, gen.manual_seed(s))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return steps * args.batch / (time.perf_counter() - start)

    for name in variants:  # warm-up (compilation happens here)
        run(name, 2)
    for _ in range(args.repeats):
        for name in variants:
            speeds[name].append(run(name, args.throughput_steps))
    base = statistics.median(speeds["1 thread"])
    res = {
        k: {"img_per_s": statistics.median(v), "runs": v, "vs_1_thread": statistics.median(v) / base}
        for k, v in speeds.items()
    }
    print(f"training img/s, digits net, batch {args.batch}, 32x32 ({platform.processor() or platform.machine()})")
    for k, r in res.items():
        print(f"  {k:15s} {r['img_per_s']:7.1f} img/s  x{r['vs_1_thread']:.2f}")
    return res


# -- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["ddpm", "min_snr", "v", "quad"], choices=RECIPES)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per recipe")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--preset", default="digits", help="UNet preset of every recipe (made grey)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256, help="DDIM samples judged per recipe")
    ap.add_argument("--restore-count", type=int, default=128, help="evaluation digits restored per task")
    ap.add_argument("--data", type=Path, default=Path("data/digits"))
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (default bench/results/train_recipes[_val]); --throughput writes "
        "train_throughput_cpu.json in its folder",
    )
    ap.add_argument("--plot", action="store_true", help="also docs/figures/train_recipes.png (samples per recipe)")
    ap.add_argument("--priors", nargs="+", help="score these trained priors (names or files) instead of training")
    ap.add_argument("--box-steps", type=int, default=20, help="DiffPIR NFEs for box inpainting")
    ap.add_argument(
        "--split",
        choices=("eval", "val"),
        default="eval",
        help="held-out half to score on: eval (the table's figures) or val (for choosing: the other half of the "
        "held-out digits and another draw of samples)",
    )
    ap.add_argument("--throughput", action="store_true", help="measure CPU training throughput variants instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--throughput-steps", type=int, default=6)
    args = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.out is None:  # a validation run never overwrites the evaluation results
        args.out = ROOT / "bench" / "results" / ("train_recipes_val" if args.split == "val" else "train_recipes")

    if args.throughput:
        res = throughput(args)
        out = args.out.with_name("train_throughput_cpu.json")  # beside --out (its folder), under this fixed name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": platform.machine(), "threads": args.threads, "variants": res}, indent=1))
        print(f"wrote {out}")
        return

    train_x, train_y = load_split(args.data / "train")
    held_x, held_y = load_split(args.data / "val")
    # the validation half stays for choosing settings, and calibrates the judge's rejection rule
    (val_x, _), (eval_x, eval_y) = held_out_halves(held_x, held_y)
    judge = train_classifier(train_x, train_y)
    with torch.no_grad():
        val_f = judge.features(val_x)
        typ = fit_typicality(judge.features(train_x), train_y, val_f, judge.head(val_f)[:, :JUNK].argmax(1))
        prob = judge(eval_x).softmax(1)
        accuracy = float((prob.argmax(1) == eval_y).float().mean())
        confident = (prob.max(1).values >= 0.9) & (prob.argmax(1) != JUNK)
        confident_real = float(confident.float().mean())
        digit = prob[:, :JUNK].argmax(1)
        typical_real = float((confident & typical(judge.features(eval_x), digit, typ)).float().mean())
        junk_check = junk_images(256, torch.Generator().manual_seed(99))  # fresh fields, not trained on
        junk_caught = float((judge(junk_check).argmax(1) == JUNK).float().mean())
    print(
        f"classifier: {100 * accuracy:.1f} % held-out accuracy, {100 * confident_real:.1f} % of real digits >= 0.9, "
        f"{100 * typical_real:.1f} % also typical; {100 * junk_caught:.1f} % of fresh junk fields called junk"
    )
    # the half scored: eval for the figures, val for choosing among priors or settings
    scored = (
        val_x[torch.randperm(len(val_x), generator=torch.Generator().manual_seed(0))] if args.split == "val" else eval_x
    )
    base = baselines(scored[: args.restore_count])
    results: dict[str, dict] = {}
    grids = {}
    for name in args.priors or args.recipes:
        if args.priors:
            from diffpir import load_prior

            prior, timing = load_prior(name), {"train_seconds": 0.0, "img_per_s": float("nan")}
        else:
            module, timing = train_recipe(name, initial_weights(args.preset), args)
            prior = module.eval_prior.eval()
        res = evaluate(prior, judge, typ, scored, args)
        grids[name] = res.pop("_samples")
        res.update(timing)
        results[name] = res
        print(
            f"{name:15s} denoise s25 {fmt(res['denoise_sigma25'])}  recognised {100 * res['recognised']:.0f} % "
            f"(typical {100 * res['recognised_typical']:.0f} %)  "
            f"Frechet {res['frechet']:.2f}  box {fmt(res['inpaint_box'])} ({res['inpaint_box_gain'][0]:+.2f})  "
            f"deblur {fmt(res['deblur'])} ({res['deblur_gain'][0]:+.2f})  {timing['train_seconds']:.0f} s",
            flush=True,
        )
    info = {
        "steps": args.steps,
        "batch": args.batch,
        "preset": args.preset,
        "threads": args.threads,
        "split": args.split,
        "sample_seed": SAMPLE_SEEDS[args.split],
        "eval_count": len(scored),
        "restore_count": min(args.restore_count, len(scored)),
        "judge_accuracy": accuracy,
        "judge_confident_real": confident_real,
        "judge_typical_real": typical_real,
        "judge_junk_caught": junk_caught,
        "priors": bool(args.priors),
        "box_steps": args.box_steps,
        "argv": " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    text = table(results, base, info)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"info": info, "baselines": base, "recipes": results}, indent=1)
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    if args.plot:
        from torchvision.utils import make_grid, save_image

        rows = [make_grid(g, nrow=16, padding=1, pad_value=1.0) for g in grids.values()]
        figure = ROOT / "docs" / "figures" / f"train_recipes{'_val' if args.split == 'val' else ''}.png"
        save_image(torch.cat([r[:, :, :] for r in rows], 1), figure)
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
