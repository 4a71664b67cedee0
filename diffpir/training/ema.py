"""Exponential moving average of a network's weights: :class:`torch.optim.swa_utils.AveragedModel` with a
warm-up-aware EMA step (a module, so checkpoints carry it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMA(AveragedModel):
    """A frozen copy of ``net`` whose weights follow ``net``'s by an exponential moving average.

    After each optimizer step, :meth:`update` does ``ema <- d * ema + (1 - d) * net`` for every floating
    parameter (buffers are copied: ``use_buffers=False``), with the warm-up-aware decay

        ``d = min(decay, (1 + n) / (10 + n))``  (``n``: updates done so far; plain ``decay`` without warm-up),

    so that the average is not dominated by the random initial weights early in training (the rule of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``).

    The average starts at ``net``'s weights: AveragedModel's first :meth:`update_parameters` (a copy) is done at
    construction, so ``n_averaged`` (in :meth:`state_dict`, with the copy in :attr:`module`) is ``n + 1`` and a
    resumed run continues the average. The decay is computed from a host mirror of ``n`` (:attr:`count`).
    Checkpoints of the former layout (``num_updates`` = ``n``) load as they are.
    """

    n_averaged: Tensor

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        super().__init__(net, multi_avg_fn=self._lerp, use_buffers=False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # The copy follows the parent's train/eval mode; it is only run in eval mode (validation, sampling).
        self.module.requires_grad_(False)
        self.update_parameters(net)  # n_averaged 0 -> 1: AveragedModel's first update copies the start weights
        self._n: int | None = 0  # host mirror of n_averaged - 1 (the decay needs no device sync)
        self.register_load_state_dict_pre_hook(EMA._old_layout)
        self.register_load_state_dict_post_hook(EMA._forget_count)

    @staticmethod
    def _old_layout(module: EMA, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Read ``num_updates`` (updates done, the former key) as ``n_averaged`` (that + the starting copy)."""
        old = state_dict.pop(prefix + "num_updates", None)
        if old is not None and prefix + "n_averaged" not in state_dict:
            state_dict[prefix + "n_averaged"] = old + 1

    @staticmethod
    def _forget_count(module: EMA, incompatible_keys) -> None:
        module._n = None  # re-read n_averaged after a load

    @property
    def count(self) -> int:
        """Updates done so far."""
        if self._n is None:
            self._n = int(self.n_averaged.item()) - 1
        return self._n

    @property
    def num_updates(self) -> Tensor:
        """Updates done so far, as a tensor (``n_averaged - 1``)."""
        return self.n_averaged - 1

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.count
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _lerp(self, averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        """AveragedModel's ``multi_avg_fn`` (one device/dtype group): ``averaged <- lerp(averaged, current, 1 - d)``."""
        if averaged[0].dtype.is_floating_point:
            torch._foreach_lerp_(
                averaged, [p.to(e.dtype) for e, p in zip(averaged, current)], 1.0 - self.current_decay()
            )

    @torch.no_grad()
    def update(self, net: nn.Module) -> float:
        """One EMA step towards ``net``'s current weights; returns the decay used."""
        n = self.count
        d = self.current_decay()
        if sum(1 for _ in self.module.parameters()) != sum(1 for _ in net.parameters()):
            raise RuntimeError("EMA: the network's parameters no longer match the averaged copy")
        self.update_parameters(net)
        self._n = n + 1
        return d

    @torch.no_grad()
    def copy_from(self, net: nn.Module) -> None:
        """Restart the average at ``net``'s weights (e.g. after loading pretrained weights)."""
        self.module.load_state_dict(net.state_dict())
        self.n_averaged.fill_(1)
        self._n = 0

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warmup={self.warmup}"


__all__ = ["EMA"]
