"""Prior files: the format, its writer and its reader.

:func:`load_prior` reads, without ever executing code from the file:

(a) our exported priors: safetensors whose metadata key ``"diffpir_prior"`` holds the JSON
    ``{"format": 1, "unet": <UNet config>, "schedule": {...}[, "prediction": "v"]}`` (written by
    :func:`export_prior`);
(b) our Lightning training checkpoints (``.ckpt``) carrying ``checkpoint["diffpir_prior"]``: the same description
    plus ``"state_dict"`` (the EMA weights), written by the training module through :func:`prior_payload`;
(c) guided-diffusion state dicts (``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``) with ``preset=``
    (detected from the keys and shapes when ``preset`` is left out);
(d) bundled priors by name (``load_prior("digits")``): ``diffpir/assets/priors/<name>.safetensors``. A bare name
    (no folder part, no suffix) that is a bundled prior always means the bundled one, whatever the current folder
    holds: write ``./natural`` for a local file of that name.

:func:`prior_payload` is the one writer of the description (used by :func:`export_prior` and by the training
checkpoints), :func:`schedule_to_dict` / :func:`schedule_from_dict` the schedule part of it.

Untrusted files: only local regular files are read (URLs, FIFOs, folders refused first); the UNet config and schedule
a file describes are bounded (:data:`LIMITS`) and checked against the tensors present before anything is built;
corrupt, truncated or malformed files give a ``ValueError`` naming the file.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffpir.checkpoints import MapLocation, atomic_output, file_kind, local_file, safe_torch_load
from diffpir.models import PRESETS, UNet, build_unet
from diffpir.prior import PREDICTIONS, Prediction, Prior
from diffpir.schedule import NoiseSchedule

__all__ = [
    "BUNDLED_DIR",
    "FORMAT",
    "LIMITS",
    "METADATA_KEY",
    "available_priors",
    "check_unet_config",
    "export_prior",
    "load_prior",
    "matching_presets",
    "preset_hint",
    "prior_payload",
    "schedule_from_dict",
    "schedule_to_dict",
]

FORMAT = 1
METADATA_KEY = "diffpir_prior"
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "priors"

LIMITS: dict[str, int] = {
    "T": 100_000,  # schedule steps (the official priors: 1000)
    "num_res_blocks": 64,
    "channel_mult": 16,  # levels
    "mult": 64,  # each channel_mult entry
    "model_channels": 8192,
    "channels": 64,  # in_channels, out_channels
    "image_size": 1 << 16,
    "attention_resolutions": 64,
    "heads": 4096,  # num_heads, num_head_channels, num_heads_upsample, norm_groups
}
"""Bounds on what a prior file may describe, checked before anything is built (a 56 KB file must not be able to ask
for 22 GiB of schedule or a network with a million blocks)."""


# ---------------------------------------------------------------------------------------------------------
# Schedules in files
# ---------------------------------------------------------------------------------------------------------
def schedule_to_dict(schedule: NoiseSchedule) -> dict[str, Any]:
    """``{"kind": "linear", "T", "beta_start", "beta_end"}`` for linear schedules, else
    ``{"kind": "betas", "betas": [...]}`` (primitive types only)."""
    betas = schedule.host("betas")
    T, b0, b1 = len(betas), float(betas[0]), float(betas[-1])
    if np.allclose(betas, np.linspace(b0, b1, T, dtype=np.float64), rtol=0, atol=1e-15):
        return {"kind": "linear", "T": T, "beta_start": b0, "beta_end": b1}
    return {"kind": "betas", "betas": [float(b) for b in betas]}


def schedule_from_dict(d: Mapping[str, Any]) -> NoiseSchedule:
    """Inverse of :func:`schedule_to_dict`. The number of steps is bounded by ``LIMITS["T"]`` (checked before any
    table is built) and every beta must lie in (0, 1) (ValueError otherwise)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a schedule must be a mapping, got {type(d).__name__}")
    kind = d.get("kind", "linear")
    if kind == "linear":
        T = _bounded_int(d["T"], "schedule T", 2, LIMITS["T"])
        b0, b1 = float(d["beta_start"]), float(d["beta_end"])
        for name, b in (("beta_start", b0), ("beta_end", b1)):
            if not 0 < b < 1:
                raise ValueError(f"schedule {name} must lie in (0, 1), got {b}")
        return NoiseSchedule.linear(T, b0, b1)
    if kind == "betas":
        betas = d["betas"]
        if not isinstance(betas, (list, tuple)) or not 2 <= len(betas) <= LIMITS["T"]:
            n = len(betas) if isinstance(betas, (list, tuple)) else type(betas).__name__
            raise ValueError(f"schedule betas must be a list of 2 to {LIMITS['T']} numbers, got {n}")
        arr = np.asarray(betas, dtype=np.float64)
        bad = np.flatnonzero(~((arr > 0) & (arr < 1)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"schedule betas must lie in (0, 1) (a beta of 1 leaves no signal), got betas[{i}] = {arr[i]}"
            )
        return NoiseSchedule(arr)
    raise ValueError(f"unknown schedule kind {kind!r} (known: 'linear', 'betas')")


def _bounded_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]`` (integral floats accepted); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_unet_config(config: Any, n_tensors: int | None = None) -> dict[str, Any]:
    """Check a UNet config read from a file before it is built: known keys, sizes within :data:`LIMITS`, and (when
    ``n_tensors`` is given) no more blocks than the file has tensors for. Returns it as a dict.

    :raises ValueError: naming the entry that is out of bounds.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"the UNet config must be a mapping, got {type(config).__name__}")
    known = set(inspect.signature(UNet.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown UNet config entries {unknown}")
    for key in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks"):
        if key not in config:
            raise ValueError(f"the UNet config lacks {key!r}")
    _bounded_int(config["num_res_blocks"], "num_res_blocks", 1, LIMITS["num_res_blocks"])
    _bounded_int(config["model_channels"], "model_channels", 1, LIMITS["model_channels"])
    _bounded_int(config["image_size"], "image_size", 1, LIMITS["image_size"])
    for key in ("in_channels", "out_channels"):
        _bounded_int(config[key], key, 1, LIMITS["channels"])
    for key in ("num_heads", "num_head_channels", "num_heads_upsample", "norm_groups"):
        if key in config:
            _bounded_int(config[key], key, -1, LIMITS["heads"])
    mult = config.get("channel_mult", (1, 2, 4, 8))
    if not isinstance(mult, (list, tuple)) or not 1 <= len(mult) <= LIMITS["channel_mult"]:
        n = len(mult) if isinstance(mult, (list, tuple)) else type(mult).__name__
        raise ValueError(f"channel_mult must be a list of 1 to {LIMITS['channel_mult']} numbers, got {n}")
    for m in mult:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= LIMITS["mult"]:
            raise ValueError(f"channel_mult entries must lie in (0, {LIMITS['mult']}], got {m!r}")
    att = config.get("attention_resolutions", ())
    if not isinstance(att, (list, tuple)) or len(att) > LIMITS["attention_resolutions"]:
        raise ValueError(f"attention_resolutions must be a list of at most {LIMITS['attention_resolutions']} numbers")
    for r in att:
        _bounded_int(r, "attention_resolutions entry", 1, LIMITS["image_size"])
    if n_tensors is not None:
        # Every level has num_res_blocks input and num_res_blocks + 1 output ResBlocks of several tensors each.
        blocks = len(mult) * (2 * int(config["num_res_blocks"]) + 1)
        if blocks > n_tensors:
            raise ValueError(
                f"the UNet config describes {blocks} blocks but the file holds only {n_tensors} tensors: the config "
                f"does not match the weights"
            )
    return dict(config)


def prior_payload(
    net: nn.Module,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    state_dict: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """The ``{"format", "unet", "schedule"[, "prediction"][, "state_dict"]}`` description of a prior, the one
    writer of the format: primitive types only, plus, when ``state_dict`` is given (training checkpoints, format
    (b)), CPU copies of those weights. ``"prediction"`` is written only for non-eps nets (eps files stay as they
    were).

    :param net: a diffpir :class:`~diffpir.models.UNet` (its ``config`` is recorded).
    :raises TypeError: ``net`` has no ``config`` (it could not be rebuilt from the file).
    """
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"a prior file needs a diffpir UNet (with .config), got {type(net).__name__}")
    payload: dict[str, Any] = {"format": FORMAT, "unet": dict(config), "schedule": schedule_to_dict(schedule)}
    if prediction != "eps":
        payload["prediction"] = prediction
    if state_dict is not None:
        payload["state_dict"] = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    return payload


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------
def export_prior(
    net: UNet | Prior,
    schedule: NoiseSchedule | None,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a prior as safetensors (format (a) of :func:`load_prior`), atomically.

    :param net: the UNet (or a :class:`Prior`, whose schedule is used when ``schedule`` is None).
    :param schedule: the schedule it was trained with (None: the prior's, or the linear default).
    :param dtype: store floating weights in this dtype (e.g. ``torch.float16`` halves the file);
        :func:`load_prior` casts them back to float32.
    :return: the path written.
    """
    prediction: Prediction = "eps"
    if isinstance(net, Prior):
        schedule = schedule if schedule is not None else net.schedule
        prediction = net.prediction
        net = net.net
    schedule = schedule if schedule is not None else NoiseSchedule.linear()
    metadata = {METADATA_KEY: json.dumps(prior_payload(net, schedule, prediction))}
    from safetensors.torch import save_file

    tensors = {}
    for k, v in net.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def available_priors() -> list[str]:
    """Names of the bundled priors (``diffpir/assets/priors/<name>.safetensors``)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.safetensors"))


def _resolve(path_or_name: str | os.PathLike[str]) -> Path:
    """The file a path or bundled name stands for: a bare name of a bundled prior is always the bundled file (a file
    or folder of that name in the current folder cannot shadow it); anything else must be a local regular file."""
    s = os.fspath(path_or_name)
    p = Path(s)
    is_name = isinstance(path_or_name, str) and "/" not in s and os.sep not in s and not p.suffix
    if is_name:
        bundled = BUNDLED_DIR / f"{s}.safetensors"
        if s in available_priors() and bundled.is_file():
            return bundled
    if os.path.lexists(p) or not is_name:
        return local_file(s, "prior file")
    if is_name:
        hint = ""
        if s in PRESETS:
            hint = f" {s!r} is a UNet preset: pass the checkpoint path and preset={s!r}."
        raise FileNotFoundError(
            f"no prior file or bundled prior named {s!r}; bundled priors: {available_priors() or 'none'}.{hint}"
        )
    raise FileNotFoundError(f"prior file not found: {p}")  # pragma: no cover (local_file raised)


@functools.cache
def _preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of preset ``name``'s state_dict (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        net = build_unet(name)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def matching_presets(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The presets whose state_dict keys and shapes equal those of ``state_dict``."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [name for name in PRESETS if _preset_shapes(name) == shapes]


def _mismatch_report(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor]) -> str:
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: file {list(got[k])} vs model {list(expected[k])}" for k in expected if k in got and got[k] != expected[k]
    ]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({few(shapes)})")
    return "; ".join(parts)


def _suggestion(state_dict: Mapping[str, Tensor]) -> str:
    matches = matching_presets(state_dict)
    if matches:
        return (
            "Its keys and shapes match preset "
            + " or ".join(f"{m!r}" for m in matches)
            + (f": try preset={matches[0]!r}.")
        )
    return "No UNet preset matches its keys and shapes (another architecture?)."


def _strip_prefix(sd: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _build_loaded(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], source: str, what: str) -> UNet:
    """Build ``config``'s UNet on the meta device and assign ``state_dict`` (strict), floats as float32."""
    with torch.device("meta"):
        net = build_unet(dict(config))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state_dict = _strip_prefix(state_dict)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        raise ValueError(
            f"{source} does not fit {what}: {_mismatch_report(expected, state_dict)}. {_suggestion(state_dict)}"
        )
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    return net


def _read_safetensors(path: Path, map_location: MapLocation) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a safetensors file; a corrupt or truncated file (an interrupted download) raises a
    ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return dict(meta), load_file(str(path), device=str(map_location or "cpu"))
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise ValueError(
            f"cannot read prior file {path}: {lines[0] if lines else type(err).__name__} (the file is truncated or "
            f"corrupt, e.g. an interrupted download: download or export it again)"
        ) from None


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def preset_hint(message: str, option: str) -> str:
    """A :func:`load_prior` message with its Python hint ``preset='x'`` (or a bare ``preset=``) put the way a command
    line user passes it: ``<option> x`` (``--model.preset`` for ``diffpir-restore``, ``--model.init_preset`` for
    ``diffpir-train``)."""
    return re.sub(r"\bpreset=(?:'([^']*)')?", lambda m: f"{option} {m.group(1) or 'NAME'}", message)


def load_prior(
    path_or_name: str | os.PathLike[str],
    preset: str | None = None,
    map_location: MapLocation = "cpu",
    schedule: NoiseSchedule | None = None,
    **prior_kwargs: Any,
) -> Prior:
    """Load a prior (an eval-mode :class:`Prior` with frozen weights) from a file or a bundled name.

    :param path_or_name: a safetensors export, a Lightning ``.ckpt`` with ``"diffpir_prior"``, a
        guided-diffusion ``.pt`` state dict, or the name of a bundled prior (see :func:`available_priors`).
    :param preset: UNet preset for plain state dicts (``"ffhq_10m"``, ``"imagenet_256_uncond"``); detected
        from the keys and shapes when None. Ignored for files that describe their own UNet.
    :param map_location: device for the weights.
    :param schedule: override the schedule (default: the file's, or the linear T = 1000 schedule).
    :param prior_kwargs: passed to :class:`Prior` (``clip_x0``, ``autocast_dtype``, ``size_mode``, ...).
    :raises ValueError: the file carries code/objects (refused, nothing run), or its weights do not fit the
        architecture (the message lists missing/unexpected keys and the presets that would fit).
    """
    path = _resolve(path_or_name)
    kind = file_kind(path)
    payload: Mapping[str, Any] | None = None
    if kind == "safetensors":
        meta, state_dict = _read_safetensors(path, map_location)
        if METADATA_KEY in meta:
            try:
                payload = json.loads(meta[METADATA_KEY])
            except ValueError as err:
                raise ValueError(f"{path}: malformed '{METADATA_KEY}' metadata (not JSON: {err})") from None
            if not isinstance(payload, Mapping):
                raise ValueError(f"{path}: malformed '{METADATA_KEY}' metadata (not a JSON object)")
    else:
        obj = safe_torch_load(path, map_location=map_location)
        if isinstance(obj, Mapping) and METADATA_KEY in obj:  # (b) our Lightning checkpoint
            payload = obj[METADATA_KEY]
            if not isinstance(payload, Mapping) or not _tensor_dict(payload.get("state_dict")):
                raise ValueError(f"{path}: malformed '{METADATA_KEY}' entry (no state_dict of tensors)")
            state_dict = payload["state_dict"]
        elif isinstance(obj, Mapping) and {"format", "unet", "state_dict"} <= set(obj):
            payload = obj  # the payload saved on its own
            state_dict = obj["state_dict"]
        elif _tensor_dict(obj):  # (c) a plain state dict (guided-diffusion)
            state_dict = obj
        elif isinstance(obj, Mapping) and _tensor_dict(obj.get("state_dict")):
            state_dict = obj["state_dict"]
        else:
            raise ValueError(f"{path} holds neither a diffpir prior ('{METADATA_KEY}') nor a state dict of tensors")

    if payload is not None:
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
            fmt = payload.get("format") if isinstance(payload, Mapping) else payload
            raise ValueError(f"{path}: unsupported diffpir prior format {fmt!r}")
        if not _tensor_dict(state_dict):
            raise ValueError(f"{path}: the prior's state_dict is not a mapping of tensors")
        try:
            # Bound what the file describes before anything is built or allocated.
            config = check_unet_config(payload.get("unet"), n_tensors=len(state_dict))
            file_schedule = schedule_from_dict(payload["schedule"]) if payload.get("schedule") else None
        except (KeyError, TypeError, ValueError) as err:
            what = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{path}: malformed diffpir prior metadata: {what}") from None
        net = _build_loaded(config, state_dict, str(path), "the UNet described in the file")
        if schedule is None and file_schedule is not None:
            schedule = file_schedule
        prediction = payload.get("prediction", "eps")
        if prediction not in PREDICTIONS:
            raise ValueError(f"{path}: unknown prediction {prediction!r} (known: {', '.join(PREDICTIONS)})")
        prior_kwargs.setdefault("prediction", prediction)
    else:
        state_dict = _strip_prefix(state_dict)
        if preset is None:
            matches = matching_presets(state_dict)
            if not matches:
                raise ValueError(
                    f"{path} is a plain state dict that matches no UNet preset; pass preset= "
                    f"(known: {', '.join(PRESETS)}) or use a file exported by diffpir"
                )
            preset = matches[0]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        net = _build_loaded(PRESETS[preset], state_dict, str(path), f"preset {preset!r}")
    net.requires_grad_(False).eval()
    return Prior(net, schedule, **prior_kwargs).eval()
