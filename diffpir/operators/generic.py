"""User-supplied degradations: any linear operator (prox by conjugate gradients) or any differentiable one
(prox by gradient steps, the paper's first-order variant)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffpir.operators.base import Operator, Shape, check_measurement, rho_view

ShapeFn = Callable[[torch.Size], Shape]


class LinearOperator(Operator):
    """A linear ``H`` given as two functions.

    Args:
        forward_fn: ``x`` ``[N, C, H, W]`` to ``y`` (linear).
        adjoint_fn: its adjoint, ``y`` to ``[N, C, H, W]``; ``<H x, v> = <x, H^T v>`` must hold.
        x_shape_fn: image shape from measurement shape (default: the same shape).
        cg_tol, cg_max_iter: of the conjugate-gradient prox.

    ``prox(z, y, rho) = argmin_x ||y - H x||^2 + rho ||x - z||^2`` by conjugate gradients on
    ``(H^T H + rho I) x = H^T y + rho z`` (see :meth:`Operator.prox_cg`).
    """

    def __init__(
        self,
        forward_fn: Callable[[Tensor], Tensor],
        adjoint_fn: Callable[[Tensor], Tensor],
        x_shape_fn: ShapeFn | None = None,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 200,
    ):
        super().__init__(cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        self.forward_fn = forward_fn
        self.adjoint_fn = adjoint_fn
        self.x_shape_fn = x_shape_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_fn(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.adjoint_fn(y)

    def x_shape(self, y_shape: Shape) -> torch.Size:
        return torch.Size(y_shape if self.x_shape_fn is None else self.x_shape_fn(torch.Size(y_shape)))


class NonlinearOperator(Operator):
    """A differentiable (possibly nonlinear) ``H`` given as a function.

    Args:
        forward_fn: ``x`` ``[N, C, H, W]`` to ``y``, differentiable by ``torch.autograd``; images must not be
            mixed across the batch.
        steps: gradient steps per :meth:`prox` call.
        lr: step size relative to ``1 / (lipschitz + rho)``; ``lr < 2`` is stable for a linear ``H``.
        lipschitz: an upper bound on ``||J_H||^2`` (the squared norm of the Jacobian; 1 for the usual
            brightness-preserving degradations).
        x_shape_fn: image shape from measurement shape (default: the same shape).

    ``prox(z, y, rho) ~ argmin_x ||y - H(x)||^2 + rho ||x - z||^2``, approximated from ``x = z`` by ``steps``
    gradient steps ``x <- x - lr / (lipschitz + rho) * (J_H(x)^T (H(x) - y) + rho (x - z))`` (half the
    gradient, per image). The result is detached from the autograd graph.
    """

    linear = False

    def __init__(
        self,
        forward_fn: Callable[[Tensor], Tensor],
        steps: int = 10,
        lr: float = 1.0,
        lipschitz: float = 1.0,
        x_shape_fn: ShapeFn | None = None,
    ):
        super().__init__()
        if steps < 1 or lr <= 0 or lipschitz <= 0:
            raise ValueError(f"steps must be >= 1 and lr, lipschitz positive; got {steps}, {lr}, {lipschitz}")
        self.forward_fn = forward_fn
        self.steps = int(steps)
        self.lr = float(lr)
        self.lipschitz = float(lipschitz)
        self.x_shape_fn = x_shape_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_fn(x)

    def x_shape(self, y_shape: Shape) -> torch.Size:
        return torch.Size(y_shape if self.x_shape_fn is None else self.x_shape_fn(torch.Size(y_shape)))

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """``z, rho -> x``: ``steps`` gradient steps from ``z`` (class docstring); works under ``torch.no_grad()``
        and ``torch.inference_mode()`` too (Lightning's predict), for a ``fn`` that holds no inference tensors."""
        y = y.detach()

        def prox(z: Tensor, rho: float | Tensor) -> Tensor:
            check_measurement(z, "z")
            # Under torch.inference_mode (Lightning's predict) autograd is off and inference tensors refuse it:
            # step out, with normal copies of the inputs.
            with torch.inference_mode(False), torch.enable_grad():
                z, yy = z.detach().clone(), y.clone()
                rr = rho.detach().clone() if isinstance(rho, Tensor) else rho
                r = rho_view(rr, z)
                step = self.lr / (self.lipschitz + r)
                x = z.clone()
                for _ in range(self.steps):
                    x = x.detach().requires_grad_(True)
                    residual = self.forward_fn(x) - yy
                    (grad,) = torch.autograd.grad(0.5 * residual.square().sum(), x)
                    x = x - step * (grad + r * (x - z))
            return x.detach()

        return prox
