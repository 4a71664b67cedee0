"""Exponential moving average of a network's weights, as a module (so checkpoints carry it)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """A frozen copy of ``net`` whose weights follow ``net``'s by an exponential moving average.

    After each optimizer step, :meth:`update` does ``ema <- d * ema + (1 - d) * net`` for every floating
    parameter (buffers are copied), with the warm-up-aware decay

        ``d = min(decay, (1 + n) / (10 + n))``  (``n``: updates done so far; plain ``decay`` without warm-up),

    so that the average is not dominated by the random initial weights early in training (the rule of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``). The copy lives in :attr:`module`; its weights
    and the update count ``num_updates`` are in :meth:`state_dict`, so a resumed run continues the average.
    """

    num_updates: Tensor

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # The copy follows the parent's train/eval mode; it is only run in eval mode (validation, sampling).
        self.module = copy.deepcopy(net).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._n: int | None = 0  # host mirror of num_updates (no device sync per step)
        self.register_load_state_dict_post_hook(EMA._forget_count)

    @staticmethod
    def _forget_count(module: EMA, incompatible_keys) -> None:
        module._n = None  # re-read num_updates after a load

    @property
    def count(self) -> int:
        """Updates done so far."""
        if self._n is None:
            self._n = int(self.num_updates.item())
        return self._n

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.count
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> float:
        """One EMA step towards ``net``'s current weights; returns the decay used."""
        n = self.count
        d = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        net_p = [p.detach() for p in net.parameters()]
        if len(ema_p) != len(net_p):
            raise RuntimeError("EMA: the network's parameters no longer match the averaged copy")
        pairs = [(e, p) for e, p in zip(ema_p, net_p) if e.dtype.is_floating_point]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], 1.0 - d)
        for e, b in zip(self.module.buffers(), net.buffers()):
            e.copy_(b)
        self.num_updates += 1
        self._n = n + 1
        return d

    @torch.no_grad()
    def copy_from(self, net: nn.Module) -> None:
        """Restart the average at ``net``'s weights (e.g. after loading pretrained weights)."""
        self.module.load_state_dict(net.state_dict())
        self.num_updates.zero_()
        self._n = 0

    def forward(self, *args, **kwargs):
        """Runs the averaged network."""
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}"


__all__ = ["EMA"]
