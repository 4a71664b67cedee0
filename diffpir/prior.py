"""The diffusion prior: an eps-network plus its noise schedule, as an eps-model and a Gaussian denoiser.

:class:`Prior` is what the sampler calls (``prior(x_t, t) -> eps``); it also offers ``x0(x_t, t)`` and the
denoiser ``denoise(x, sigma)`` of ``x = x0 + sigma n`` (k-diffusion's ``DiscreteEpsDDPMDenoiser`` idea).
Everything here works on the network's [-1, 1] scale. :func:`eps_denoise` is that denoiser for any eps-model
(the one Gaussian denoiser of the package). Prior files (export, loading, bundled priors) live in
:mod:`diffpir.priorfile`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpir.schedule import NoiseSchedule

__all__ = ["PREDICTIONS", "Prior", "eps_denoise"]

SizeMode = Literal["pad", "any"]
Prediction = Literal["eps", "v"]
PREDICTIONS = ("eps", "v")


# ---------------------------------------------------------------------------------------------------------
# The prior
# ---------------------------------------------------------------------------------------------------------
class Prior(nn.Module):
    """An eps-network and its schedule: ``prior(x_t, t) == prior.eps(x_t, t)``.

    :param net: a :class:`~diffpir.models.UNet` (or any module ``net(x, t) -> [N, C or 2C, H, W]`` with the
        attributes ``in_channels``, ``out_channels``, ``size_multiple``, ``has_attention``, ``image_size``).
        For learn_sigma nets (``2C`` outputs) the eps is the first C channels.
        The net's train/eval mode is left as is (:func:`~diffpir.priorfile.load_prior` returns an eval-mode prior).
    :param schedule: the schedule the net was trained with (default: the linear T = 1000 DDPM schedule).
    :param clip_x0: clamp :meth:`x0` and :meth:`denoise` outputs to [-1, 1] (the official DiffPIR code clips).
    :param autocast_dtype: run the net under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``) when
        the input is on CUDA; on the CPU the net always runs in float32. Outputs come back in the input dtype.
    :param channels_last: convert the net and its inputs to the channels-last memory format (faster convs on
        recent GPUs).
    :param prediction: what the net predicts: ``"eps"`` (the noise, as guided-diffusion's and DiffPIR's nets) or
        ``"v"`` (``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``, Salimans & Ho 2022). A v-net is still used as an
        eps-model: :meth:`eps` returns ``sqrt(1 - ab_t) x_t + sqrt(ab_t) v`` (exact), so samplers never see the
        difference. Exported priors record it (``"prediction"`` in the file's metadata).
    :param size_mode: how inputs the net cannot take directly are handled.
        Fully convolutional nets: inputs are always reflect-padded (centred) to the next multiple of
        ``net.size_multiple`` and the output cropped back, whatever ``size_mode``.
        Nets with attention are tied to their training size ``image_size``: with ``"pad"`` (default) inputs up
        to ``image_size`` are reflect-padded to exactly ``image_size`` and cropped back, larger inputs raise a
        ValueError; with ``"any"`` they run at any size (padded to a multiple only), attention spanning the
        whole image, which works but is off the training distribution.
        Reflected noise in the padded border is not i.i.d.; its effect stays near the border and is cropped.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | None = None,
        *,
        clip_x0: bool = False,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        size_mode: SizeMode = "pad",
        prediction: Prediction = "eps",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        c_in, c_out = int(net.in_channels), int(net.out_channels)
        if c_out not in (c_in, 2 * c_in):
            raise ValueError(f"a prior net must output C (eps) or 2C (eps, v) channels; got {c_out} for C = {c_in}")
        if size_mode not in ("pad", "any"):
            raise ValueError(f"size_mode must be 'pad' or 'any', got {size_mode!r}")
        self.net = net
        self.schedule = schedule if schedule is not None else NoiseSchedule.linear()
        self.clip_x0 = bool(clip_x0)
        self.autocast_dtype = autocast_dtype
        self.channels_last = bool(channels_last)
        self.size_mode: SizeMode = size_mode
        self.prediction: Prediction = prediction
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    @property
    def in_channels(self) -> int:
        """Image channels C the prior works on."""
        return int(self.net.in_channels)

    @property
    def image_size(self) -> int:
        """The net's training resolution."""
        return int(self.net.image_size)

    def extra_repr(self) -> str:
        return (
            f"clip_x0={self.clip_x0}, autocast_dtype={self.autocast_dtype}, size_mode={self.size_mode!r}, "
            f"prediction={self.prediction!r}"
        )

    # -- geometry ------------------------------------------------------------------------------------------
    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H', W') the net is run at for an (h, w) input; ValueError if the net cannot take it."""
        m = int(self.net.size_multiple)
        if self.net.has_attention and self.size_mode == "pad":
            s = self.image_size
            if h > s or w > s:
                raise ValueError(
                    f"this prior has attention and was trained at {s}x{s}; an input of {w}x{h} is larger. "
                    f"Use a fully convolutional prior, crop/tile the image, or pass size_mode='any' to run "
                    f"attention over the whole image (off the training distribution)."
                )
            return s, s
        return -(-h // m) * m, -(-w // m) * m

    # -- the network -----------------------------------------------------------------------------------------
    def _timesteps(self, t: Tensor | int | float, n: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape [{n}], got {tuple(t.shape)}")
        return t

    def _net_out(self, x: Tensor, t: Tensor) -> Tensor:
        """The net's raw output on ``x`` [N, C, H, W] (padded for the net, cropped back), in ``x.dtype``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = self.padded_size(h, w)
        top, left = (ph - h) // 2, (pw - w) // 2
        p = next(self.net.parameters(), None)
        net_dtype = p.dtype if p is not None else torch.float32
        xin = _reflect_pad(x.to(net_dtype), top, ph - h - top, left, pw - w - left)
        if self.channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        use_amp = self.autocast_dtype is not None and x.device.type == "cuda"
        ctx = torch.autocast("cuda", dtype=self.autocast_dtype) if use_amp else contextlib.nullcontext()
        with ctx:
            out = self.net(xin, t)
        return out[..., top : top + h, left : left + w].to(x.dtype).contiguous()

    def eps(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted noise.

        :param x_t: [N, C, H, W] on the [-1, 1] scale (diffused: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``).
        :param t: [N] timesteps (int64; floats are passed to the net as they are) or a scalar.
        :return: [N, C, H, W] eps in ``x_t.dtype`` (the first C channels of learn_sigma nets).
        """
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        out = self._net_out(x_t, t)[:, : self.in_channels]
        if self.prediction == "v":
            # x_t = a x0 + b eps and v = a eps - b x0 with a^2 + b^2 = 1  =>  eps = b x_t + a v.
            a = self.schedule.extract("sqrt_alphas_cumprod", t.long(), x_t)
            b = self.schedule.extract("sqrt_one_minus_alphas_cumprod", t.long(), x_t)
            out = b * x_t + a * out
        return out

    forward = eps

    def x0(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Predicted clean image ``(x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, [N, C, H, W] in [-1, 1]
        (clamped when ``clip_x0``). ``t``: integer [N] timesteps or a scalar."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        x0 = self.schedule.x0_from_eps(x_t, t, self.eps(x_t, t))
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Gaussian denoiser ``D(x, sigma)`` for ``x = x0 + sigma n``, n ~ N(0, I), on the [-1, 1] scale.

        1. ``t`` = the timestep whose ``sigma_bar_t`` is nearest to ``sigma`` (``timestep_for_sigma``);
        2. ``eps = eps_theta(c_in x, t)`` with ``c_in = 1 / sqrt(1 + sigma^2)`` (equal to ``sqrt(ab_t)`` when
           ``sigma = sigma_bar_t``, so the net sees ``x_t`` exactly; otherwise a unit-variance input);
        3. return ``x - sigma * eps`` (``= x0_pred`` of the schedule when ``sigma = sigma_bar_t``).

        ``sigma = 0`` returns ``x`` unchanged. This is :func:`eps_denoise` of the prior, clamped when ``clip_x0``.

        :param x: [N, C, H, W] noisy images on the [-1, 1] scale.
        :param sigma: noise std on the [-1, 1] scale: a float or a [N] tensor.
        :return: [N, C, H, W] estimate of x0 in ``x.dtype`` (clamped to [-1, 1] when ``clip_x0``).
        """
        x0 = eps_denoise(self.eps, self.schedule, x, sigma)
        return x0.clamp(-1, 1) if self.clip_x0 else x0


def eps_denoise(
    eps_model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule, x: Tensor, sigma: float | Tensor
) -> Tensor:
    """The Gaussian denoiser ``D(x, sigma)`` of any eps-model, for ``x = x0 + sigma n``, n ~ N(0, I), on the
    [-1, 1] scale (the steps of :meth:`Prior.denoise`, which is this function, clamped when ``clip_x0``).

    :param eps_model: ``eps_model(x_t [N, C, H, W], t [N] int64) -> [N, C or 2C, H, W]`` (a :class:`Prior`, or a
        raw eps-network: its first C output channels are the eps), trained with ``schedule``.
    :param x: [N, C, H, W] noisy images on the [-1, 1] scale.
    :param sigma: noise std on the [-1, 1] scale: a float or a [N] tensor, >= 0 (0 returns ``x``).
    :return: [N, C, H, W] estimate of x0 in ``x.dtype``, not clamped.
    """
    n, c = x.shape[:2]
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma.ndim == 0:
        sigma = sigma.expand(n)
    if sigma.shape != (n,) or bool((sigma < 0).any()):
        raise ValueError(f"sigma must be >= 0, a scalar or of shape [{n}], got {tuple(sigma.shape)}")
    t = schedule.timestep_for_sigma(sigma).to(x.device)
    s = sigma.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)
    eps = eps_model(x / (1 + s**2).sqrt(), t)[:, :c].to(x.dtype)
    return x - s * eps


def _reflect_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Reflect-pad [N, C, H, W] by any amounts (repeated reflection when a pad exceeds the size - 1;
    replicate for a size of 1)."""
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        if (h == 1 and (top or bottom)) or (w == 1 and (left or right)):
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        t, b = min(top, h - 1), min(bottom, h - 1)
        le, r = min(left, w - 1), min(right, w - 1)
        x = F.pad(x, (le, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - le, right - r
    return x
