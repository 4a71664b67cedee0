"""The ADM UNet of guided-diffusion ("Diffusion Models Beat GANs", Dhariwal & Nichol 2021), written anew.

The module tree (and so every ``state_dict`` key and shape) mirrors guided-diffusion's ``UNetModel`` so
that the official checkpoints (``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``) load with ``strict=True``:

- ``time_embed``: ``Linear(mc, 4 mc), SiLU, Linear(4 mc, 4 mc)`` on the sinusoidal embedding of ``t``;
- ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` x (``ResBlock`` [+ ``AttentionBlock``])
  and a downsampling block between levels (``ResBlock(down=True)`` with ``resblock_updown``, else a
  stride-2 conv);
- ``middle_block``: ``ResBlock, AttentionBlock, ResBlock`` (the attention block is left out when
  ``middle_attention=False``, a diffpir addition for fully convolutional nets);
- ``output_blocks``: per level (reversed) ``num_res_blocks + 1`` x (``ResBlock`` on the concatenated skip
  [+ ``AttentionBlock``]) and an upsampling block;
- ``out``: ``GroupNorm, SiLU, zero-initialised 3x3 conv``.

Only the unconditional 2-D model is implemented (no class embedding, no fp16 conversion: use autocast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AttentionBlock",
    "Downsample",
    "GroupNorm32",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNet",
    "Upsample",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, exactly as guided-diffusion's ``timestep_embedding``.

    ``freqs_i = exp(-log(max_period) * i / half)`` for ``i < half = dim // 2``; the embedding is
    ``[cos(t freqs), sin(t freqs)]`` (cos half first), zero-padded by one column when ``dim`` is odd.

    :param t: [N] timesteps (int or float; fractional values allowed).
    :param dim: embedding width.
    :return: [N, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype; the output is cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` and return it (guided-diffusion's ``zero_module``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``emb`` to the children that take it (:class:`TimestepBlock`)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (parameters under ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C', 2H, 2W]."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a stride-2 3x3 conv (``use_conv``) or 2x2 average pooling (parameters: ``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample by pooling cannot change the channel count")
            self.op = nn.AvgPool2d(2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C', H/2, W/2]."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """guided-diffusion's residual block with timestep conditioning.

    ``h = in_layers(x)`` (GroupNorm, SiLU, [resample], conv); then with ``use_scale_shift_norm``
    ``h = out_rest(norm(h) * (1 + scale) + shift)`` where ``scale, shift = emb_layers(emb)``, else
    ``h = out_layers(h + emb_layers(emb))``; the block returns ``skip_connection(x) + h``. The last conv of
    ``out_layers`` is zero-initialised, so a fresh block is its skip path.

    :param channels: input channels.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout rate before the last conv.
    :param out_channels: output channels (default ``channels``).
    :param use_conv: 3x3 (rather than 1x1) skip conv when the channel count changes.
    :param up: upsample x2 inside the block (nearest); ``down``: downsample x2 (average pooling).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.updown = up or down

        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """:param x: [N, C, H, W]; :param emb: [N, emb_channels]; :return: [N, C_out, H', W']."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(c)) v`` over [B, heads, T, c] tensors (fused kernel where available)."""
    return F.scaled_dot_product_attention(q, k, v)


class _PackedAttention(nn.Module):
    """Multi-head attention on a packed ``qkv`` [N, 3 H c, T], unpacked by the subclass's ``layout``. Output
    [N, H c, T]: ``out[:, h c + i, t] = sum_s softmax_s(q_t . k_s / sqrt(c)) v[i, s]`` (q, k, v of head h)."""

    layout: str  # an einops pattern from the packed channels to (q|k|v, N, heads, T, c)

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        q, k, v = rearrange(qkv, self.layout, h=self.n_heads, three=3)
        return rearrange(_attend(q, k, v), "n h t c -> n (h c) t")


class QKVAttentionLegacy(_PackedAttention):
    """Attention on ``qkv`` laid out per head as ``(heads, qkv, c)``: guided-diffusion's default order
    (``use_new_attention_order=False``), ``qkv.reshape(N * H, 3 c, T)`` then split into q, k, v."""

    layout = "n (h three c) t -> three n h t c"


class QKVAttention(_PackedAttention):
    """Attention on ``qkv`` laid out as ``(qkv, heads, c)`` (the "new" order: ``qkv.chunk(3)`` first, then
    heads)."""

    layout = "n (three h c) t -> three n h t c"


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: ``x + proj_out(attn(qkv(norm(x))))``.

    ``qkv`` and ``proj_out`` are 1-D convolutions (weights [3C, C, 1] and [C, C, 1]) as in guided-diffusion;
    ``proj_out`` is zero-initialised, so a fresh block is the identity.

    :param num_heads: number of heads, used when ``num_head_channels == -1``.
    :param num_head_channels: channels per head (overrides ``num_heads``).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads={self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        attention = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention(self.num_heads)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C, H, W]."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(n, c, *spatial)


# ----------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------
def default_channel_mult(image_size: int) -> list[int]:
    """guided-diffusion's ``channel_mult=""`` defaults by image size."""
    table = {512: [0.5, 1, 1, 2, 2, 4, 4], 256: [1, 1, 2, 2, 4, 4], 128: [1, 1, 2, 3, 4], 64: [1, 2, 3, 4]}
    if image_size not in table:
        raise ValueError(f"no default channel_mult for image_size={image_size}; pass channel_mult explicitly")
    return table[image_size]  # type: ignore[return-value]


class UNet(nn.Module):
    """ADM / guided-diffusion UNet predicting eps (and, with ``out_channels = 2 * in_channels``, the variance
    interpolation ``v`` of "learn_sigma" models in the second half of the channels).

    :param image_size: the training resolution; attention resolutions are given relative to it.
    :param in_channels: image channels C.
    :param model_channels: base width.
    :param out_channels: output channels (C for eps models, 2C for guided-diffusion's learn_sigma models).
    :param num_res_blocks: residual blocks per level (the decoder has one more).
    :param attention_resolutions: feature-map sizes (in pixels at ``image_size``) that get self-attention,
        as guided-diffusion's ``--attention_resolutions`` flag: ``[16]`` at 256 px = after 4 downsamplings.
    :param dropout: dropout rate in the residual blocks.
    :param channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
    :param conv_resample: learned (conv) rather than parameter-free resampling when not ``resblock_updown``.
    :param use_checkpoint: gradient checkpointing of residual and attention blocks while training.
    :param num_heads: attention heads (when ``num_head_channels == -1``).
    :param num_head_channels: channels per attention head; overrides ``num_heads``.
    :param num_heads_upsample: heads in the decoder (``-1``: same as ``num_heads``).
    :param use_scale_shift_norm: FiLM-like ``norm(h) * (1 + scale) + shift`` conditioning.
    :param resblock_updown: resample with residual blocks instead of plain (conv) resampling layers.
    :param use_new_attention_order: ``(qkv, heads, c)`` packing instead of the legacy ``(heads, qkv, c)``.
    :param norm_groups: GroupNorm groups (32 in guided-diffusion; must divide every channel count).
    :param middle_attention: attention block in the middle (guided-diffusion always has one). Without it and
        without ``attention_resolutions`` the net is fully convolutional and takes any size divisible by
        :attr:`size_multiple`.

    ``forward(x, t)``: x [N, in_channels, H, W] in [-1, 1], t [N] timesteps (int64, or float)
    -> [N, out_channels, H, W]. ``config`` holds the constructor kwargs with primitive values (lists, not
    tuples): ``UNet(**net.config)`` rebuilds the architecture.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
        middle_attention: bool = True,
    ):
        super().__init__()
        channel_mult = [int(m) if float(m).is_integer() else float(m) for m in channel_mult]
        attention_resolutions = [int(r) for r in attention_resolutions]
        self.config: dict[str, Any] = {
            "image_size": int(image_size),
            "in_channels": int(in_channels),
            "model_channels": int(model_channels),
            "out_channels": int(out_channels),
            "num_res_blocks": int(num_res_blocks),
            "attention_resolutions": attention_resolutions,
            "dropout": float(dropout),
            "channel_mult": channel_mult,
            "conv_resample": bool(conv_resample),
            "use_checkpoint": bool(use_checkpoint),
            "num_heads": int(num_heads),
            "num_head_channels": int(num_head_channels),
            "num_heads_upsample": int(num_heads_upsample),
            "use_scale_shift_norm": bool(use_scale_shift_norm),
            "resblock_updown": bool(resblock_updown),
            "use_new_attention_order": bool(use_new_attention_order),
            "norm_groups": int(norm_groups),
            "middle_attention": bool(middle_attention),
        }
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_levels = len(channel_mult)

        # Attention at feature-map size r (pixels) <=> at downsampling rate ds = image_size // r.
        attention_ds = set()
        for r in attention_resolutions:
            ds = image_size // r if r > 0 else 0
            if r <= 0 or image_size % r or ds & (ds - 1) or ds.bit_length() > self.num_levels:
                raise ValueError(
                    f"attention resolution {r} matches no level of a {self.num_levels}-level UNet at "
                    f"image_size {image_size} (valid: {[image_size >> i for i in range(self.num_levels)]})"
                )
            attention_ds.add(ds)
        widths = {int(m * model_channels) for m in channel_mult}
        bad = sorted(w for w in widths if w % norm_groups)
        if bad:
            raise ValueError(f"norm_groups={norm_groups} does not divide the channel counts {bad}")

        res_kw = dict(use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups)
        attn_kw = dict(
            use_checkpoint=use_checkpoint,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
            norm_groups=norm_groups,
        )
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # 1. Encoder.
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, out_channels=out_ch, **res_kw)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, **attn_kw))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down: nn.Module = (
                    ResBlock(ch, emb_dim, dropout, out_channels=ch, down=True, **res_kw)
                    if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # 2. Middle.
        middle: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, **res_kw)]
        if middle_attention:
            middle.append(AttentionBlock(ch, num_heads=num_heads, **attn_kw))
        middle.append(ResBlock(ch, emb_dim, dropout, **res_kw))
        self.middle_block = TimestepEmbedSequential(*middle)

        # 3. Decoder (consumes the encoder's skips in reverse).
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = skip_chans.pop()
                out_ch = int(model_channels * mult)
                layers = [ResBlock(ch + skip, emb_dim, dropout, out_channels=out_ch, **res_kw)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, **attn_kw))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_dim, dropout, out_channels=ch, up=True, **res_kw)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # 4. Output head, zero-initialised.
        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    # -- properties --------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (self.num_levels - 1)

    @property
    def has_attention(self) -> bool:
        """Whether the net has self-attention (then it is tied to its training size ``image_size``)."""
        return bool(self.config["attention_resolutions"]) or self.config["middle_attention"]

    @property
    def fully_convolutional(self) -> bool:
        """True when the net has no attention and so takes any size divisible by :attr:`size_multiple`."""
        return not self.has_attention

    @property
    def learn_sigma(self) -> bool:
        """True for nets that output ``[eps, v]`` (guided-diffusion learn_sigma: ``out = 2 in`` channels)."""
        return self.out_channels == 2 * self.in_channels

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """:param x: [N, in_channels, H, W] in [-1, 1], H and W multiples of :attr:`size_multiple`.
        :param t: [N] timesteps (int64 or float), or a scalar broadcast over the batch.
        :return: [N, out_channels, H, W] (eps, and v for learn_sigma nets)."""
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(
                f"UNet input {tuple(x.shape[-2:])} is not divisible by {self.size_multiple} "
                f"(2 ** (levels - 1)); pad it (diffpir.Prior does this for you)"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def extra_repr(self) -> str:
        return f"params={sum(p.numel() for p in self.parameters()):,}"
