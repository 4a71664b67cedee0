"""Running the prior on overlapping tiles, so that large images restore with bounded memory.

:class:`TiledPrior` is a :class:`~diffpir.prior.Prior` (an eps-model, ``prior(x_t, t) -> eps``) whose network runs on
overlapping ``tile x tile`` crops of ``x_t``, a few crops at a time (``tile_batch``), and whose per-tile outputs are
blended with a smooth window. Only the network is tiled: the sampler's data step still runs on the whole image
(FFT proxes cost little next to a UNet), so the restoration stays one DiffPIR run with global data consistency.

Layout (per axis of length ``L``, tile ``T``, overlap ``O``): ``L <= T`` is one tile of length ``L``; otherwise
``n = ceil((L - T) / (T - O)) + 1`` tiles of length ``T`` whose starts are spread evenly over ``[0, L - T]``, so
neighbours overlap by at least ``O`` pixels. All tiles have one shape, so they batch.

Blending: tile ``i`` weighs its output by ``w_i(y, x) = r_i(y) c_i(x)``, where each 1-D window is 1 inside and
ramps as ``sin^2(pi/2 (k + 1/2) / o)`` over the ``o`` pixels it shares with a neighbour (``cos^2`` on the other
side), never reaching 0; the image borders are not ramped. The result is ``sum_i w_i out_i / sum_i w_i``. For a
pointwise eps-model (every output pixel depends on its input pixel only) this is exact; for a UNet, whose
receptive field is cut at the tile edges, the ramps push the seams' errors to where the neighbour is trusted.

Peak memory: the network's activations scale with ``tile_batch * tile^2`` instead of ``N * H * W``; the sampler's
own arrays (``x_t``, eps, the data step's FFTs) still scale with the image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffpir.prior import Prior
from diffpir.schedule import NoiseSchedule

__all__ = ["TiledPrior", "axis_starts", "tile_layout"]


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles along one axis (see the module docstring); ``[0]`` when ``length <= tile``."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_layout(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The tiles ``(top, left, height, width)`` covering an ``h x w`` image, row by row."""
    th, tw = min(h, tile), min(w, tile)
    return [(top, left, th, tw) for top in axis_starts(h, tile, overlap) for left in axis_starts(w, tile, overlap)]


def _ramp(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``sin^2(pi/2 (k + 1/2) / n)``, ``k = 0 .. n-1``: rises from near 0 to near 1; ``ramp + ramp.flip = 1``."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    return torch.sin(0.5 * math.pi * (k + 0.5) / n).square().to(dtype)


def _axis_windows(length: int, tile: int, overlap: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """The 1-D blending window of each tile along one axis (ramps over the pixels shared with a neighbour)."""
    starts = axis_starts(length, tile, overlap)
    size = min(length, tile)
    windows = []
    for i, s in enumerate(starts):
        win = torch.ones(size, dtype=dtype, device=device)
        if i > 0:  # shared with the previous tile: rise
            o = starts[i - 1] + size - s
            win[:o] *= _ramp(o, dtype, device)
        if i < len(starts) - 1:  # shared with the next tile: fall
            o = s + size - starts[i + 1]
            win[size - o :] *= _ramp(o, dtype, device).flip(0)
        windows.append(win)
    return windows


class TiledPrior(Prior):
    """A :class:`~diffpir.prior.Prior` whose network runs on overlapping tiles of inputs larger than ``tile``.

    Inputs that fit in one tile (both sides ``<= tile``) run untiled, exactly as :class:`Prior` runs them.

    Args:
        net, schedule, prior_kwargs: as for :class:`Prior` (``clip_x0``, ``autocast_dtype``, ``channels_last``,
            ``size_mode``). :meth:`wrap` builds one around an existing prior, sharing its network.
        tile: tile side in pixels. For networks with attention (tied to their training size, ``size_mode="pad"``)
            the tiles are at most ``net.image_size``.
        overlap: least overlap of neighbouring tiles in pixels (``0 <= overlap < tile``); the blending ramps span
            the actual overlaps. A few times the network's downsampling factor is a good choice (32 for 64 px
            training crops).
        tile_batch: tiles run through the network at once (memory ~ ``tile_batch * tile^2``).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | None = None,
        *,
        tile: int = 256,
        overlap: int = 32,
        tile_batch: int = 4,
        **prior_kwargs: Any,
    ):
        super().__init__(net, schedule, **prior_kwargs)
        if int(tile) < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        if not 0 <= int(overlap) < int(tile):
            raise ValueError(f"overlap must satisfy 0 <= overlap < tile = {tile}, got {overlap}")
        if int(tile_batch) < 1:
            raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
        self.tile, self.overlap, self.tile_batch = int(tile), int(overlap), int(tile_batch)

    @classmethod
    def wrap(cls, prior: Prior, tile: int = 256, overlap: int = 32, tile_batch: int = 4) -> TiledPrior:
        """A tiled prior sharing ``prior``'s network and schedule and copying its options."""
        tiled = cls(
            prior.net,
            prior.schedule,
            tile=tile,
            overlap=overlap,
            tile_batch=tile_batch,
            clip_x0=prior.clip_x0,
            autocast_dtype=prior.autocast_dtype,
            channels_last=prior.channels_last,
            size_mode=prior.size_mode,
            prediction=prior.prediction,
        )
        return tiled.train(prior.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile={self.tile}, overlap={self.overlap}, tile_batch={self.tile_batch}"

    @property
    def tile_size(self) -> int:
        """The tile side actually used (at most ``net.image_size`` for attention nets in ``"pad"`` mode)."""
        if getattr(self.net, "has_attention", False) and self.size_mode == "pad":
            return min(self.tile, self.image_size)
        return self.tile

    def layout(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """The tiles ``(top, left, height, width)`` an ``h x w`` input is split into."""
        tile = self.tile_size
        return tile_layout(h, w, tile, min(self.overlap, tile - 1))

    def _net_out(self, x: Tensor, t: Tensor) -> Tensor:
        """The net's output on ``x`` [N, C, H, W], tile by tile and blended (untiled when ``x`` fits a tile)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        n, _, h, w = x.shape
        tile = self.tile_size
        if h <= tile and w <= tile:
            return super()._net_out(x, t)
        overlap = min(self.overlap, tile - 1)
        tiles = tile_layout(h, w, tile, overlap)
        rows = dict(zip(axis_starts(h, tile, overlap), _axis_windows(h, tile, overlap, x.dtype, x.device)))
        cols = dict(zip(axis_starts(w, tile, overlap), _axis_windows(w, tile, overlap, x.dtype, x.device)))
        # 1. Every (tile, image) pair, run tile_batch at a time.
        jobs = [(top, left, th, tw, i) for (top, left, th, tw) in tiles for i in range(n)]
        out: Tensor | None = None
        weight = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
        for top, left, th, tw in tiles:
            weight[..., top : top + th, left : left + tw] += rows[top][:, None] * cols[left][None, :]
        for k in range(0, len(jobs), self.tile_batch):
            chunk = jobs[k : k + self.tile_batch]
            xin = torch.stack([x[i, :, top : top + th, left : left + tw] for (top, left, th, tw, i) in chunk])
            tin = torch.stack([t[i] for (*_, i) in chunk])
            o = super()._net_out(xin, tin)
            if out is None:
                out = torch.zeros(n, o.shape[1], h, w, dtype=x.dtype, device=x.device)
            # 2. Accumulate the windowed outputs.
            for j, (top, left, th, tw, i) in enumerate(chunk):
                win = rows[top][:, None] * cols[left][None, :]
                out[i, :, top : top + th, left : left + tw] += o[j] * win
        # 3. Normalise by the summed windows.
        return out.div_(weight)
