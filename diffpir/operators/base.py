"""The base class of every degradation, with its shared checks and a conjugate-gradient proximal step.

Conventions shared by all operators (see ``docs/CONTRACTS.md``):

- images ``x`` are ``[N, C, H, W]`` float tensors in [0, 1] space, measurements ``y`` are ``[N, C, h, w]``;
- ``prox(z, y, rho)`` returns ``argmin_x ||y - H x||^2 + rho ||x - z||^2`` (no factor 1/2 on either term),
  with ``rho`` a positive float or a tensor of shape ``[N]`` (one value per image); it is always
  ``prox_fn(y)(z, rho)``: an operator writes its proximal step once, as :meth:`Operator.prox_fn`;
- per-image parameters (kernels ``[N, kh, kw]``, masks ``[N, 1|C, H, W]``) apply image by image; a single one
  is shared by the whole batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Shape = tuple[int, ...] | torch.Size


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, a new one seeded with an int (0 is a seed too), or a freshly
    seeded one for ``None`` (non-deterministic). The global RNG is never used."""
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    if generator is None:
        g.seed()
    else:
        g.manual_seed(int(generator))
    return g


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype the FFT/matrix work runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-image inner products ``<a_i, b_i>`` of two ``[N, ...]`` tensors, shape ``[N]``."""
    return (a * b).flatten(1).sum(1)


class Operator(nn.Module):
    """A degradation ``y = H(x)`` with its adjoint and data-consistency proximal step.

    Subclasses implement :meth:`forward` (and :meth:`adjoint` when linear) and usually override :meth:`prox_fn`
    with a closed form; the base :meth:`prox_fn` solves the normal equations by conjugate gradients
    (:meth:`prox_cg`). :meth:`prox` is derived from :meth:`prox_fn` and is not overridden (a subclass that
    defines it is refused), so the two always agree to the bit.

    Attributes:
        linear: whether ``H`` is linear (then :meth:`adjoint` exists and the CG prox is exact).
        cg_tol: relative residual ``||r_i|| <= cg_tol * ||b_i||`` at which CG stops for image ``i``.
        cg_max_iter: the most CG iterations per call.
        last_cg_iterations: iterations the last :meth:`prox_cg` call took (for diagnostics).
    """

    linear: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "prox" in vars(cls):
            raise TypeError(
                f"{cls.__name__} defines prox(z, y, rho): implement prox_fn(y) -> (z, rho) -> x instead "
                f"(Operator.prox is prox_fn(y)(z, rho))"
            )

    def __init__(self, cg_tol: float = 1e-6, cg_max_iter: int = 200):
        super().__init__()
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        self.last_cg_iterations = 0

    # --------------------------------------------------------------------------------------------------------
    # The interface
    def forward(self, x: Tensor) -> Tensor:
        """``y = H(x)``: ``x`` ``[N, C, H, W]`` in [0, 1] space to a measurement ``[N, C, h, w]``."""
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """``H^T y``: a measurement ``[N, C, h, w]`` to image space ``[N, C, H, W]`` (linear only)."""
        raise NotImplementedError(f"{type(self).__name__} has no adjoint (it is not a linear operator)")

    def x_shape(self, y_shape: Shape) -> torch.Size:
        """The image shape ``[N, C, H, W]`` of a measurement of shape ``y_shape`` (by default the same)."""
        return torch.Size(y_shape)

    def prox(self, z: Tensor, y: Tensor, rho: float | Tensor) -> Tensor:
        """``argmin_x ||y - H x||^2 + rho ||x - z||^2`` for ``z`` ``[N, C, H, W]``, ``y`` ``[N, C, h, w]``;
        ``rho`` a positive float or a tensor ``[N]``. It is ``prox_fn(y)(z, rho)``, bit for bit."""
        return self.prox_fn(y)(z, rho)

    def prox_fn(self, y: Tensor) -> Callable[[Tensor, float | Tensor], Tensor]:
        """The proximal step for a fixed measurement ``y``: ``(z, rho) -> argmin_x ||y - H x||^2 + rho ||x - z||^2``.

        The one place an operator writes its proximal step (:meth:`prox` calls it). The sampler calls it once per
        restoration and the returned function at every step, so closed forms do the work that depends on ``y``
        alone here, once (e.g. ``conj(K) F(y)`` for deblurring). That work may use the operator's parameters
        (kernel, mask) as they are now: after changing them, call :meth:`prox_fn` again. The base class solves
        ``(H^T H + rho I) x = H^T y + rho z`` by conjugate gradients (:meth:`prox_cg`), linear ``H`` only.
        """
        return lambda z, rho: self.prox_cg(z, y, rho)

    def check(self, y: Tensor) -> None:
        """Raise ``ValueError`` when ``y`` cannot be a measurement of this operator (ndim, dtype, batch,
        channels, spatial size, non-finite values), with a message saying what does not fit and what to do."""
        check_measurement(y)
        self._check_shape(y)
        check_finite(y, "y")

    def initial_estimate(self, y: Tensor) -> Tensor:
        """An image-shaped first guess ``[N, C, H, W]`` in [0, 1] from ``y``.

        Default: ``y`` itself when it is image-shaped; else for a linear ``H`` the normalised back-projection
        ``H^T y / H^T 1``; else mid-grey.
        """
        shape = self.x_shape(y.shape)
        if shape == y.shape:
            return y.clamp(0, 1)
        if self.linear:
            num = self.adjoint(y)
            den = self.adjoint(self.forward(torch.ones(shape, dtype=y.dtype, device=y.device)))
            return (num / den.clamp_min(1e-8)).clamp(0, 1)
        return torch.full(shape, 0.5, dtype=y.dtype, device=y.device)

    def official_start(self, y: Tensor) -> tuple[Tensor, bool]:
        """The image-shaped start of the official DiffPIR scripts (in [0, 1] units, **not** clamped) and whether
        it carries ``y``'s noise (the sampler then diffuses it from ``t_y``, else takes it as clean).

        Default: ``y`` itself when it is image-shaped (deblurring, denoising: ``main_ddpir_deblur.py``), noisy;
        else :meth:`initial_estimate`, noisy.
        """
        if self.x_shape(y.shape) == y.shape:
            return y, True
        return self.initial_estimate(y), True

    def select(self, index: int) -> Operator:
        """The operator of image ``index`` alone (batch 1), sharing this one's data. The base class holds no
        per-image parameters and returns itself; operators with per-image kernels or masks slice them."""
        return self

    def _with_buffer(self, name: str, value: Tensor) -> Operator:
        """A shallow copy of this operator with buffer ``name`` replaced (caches dropped)."""
        new = copy.copy(self)
        new._buffers = dict(self._buffers)
        new._buffers[name] = value
        for cache in ("_otf_cache", "_mat_cache", "_eig_cache"):
            if hasattr(new, cache):
                setattr(new, cache, {})
        return new

    # --------------------------------------------------------------------------------------------------------
    # Helpers for subclasses
    def _check_shape(self, y: Tensor) -> None:
        """Subclass hook: shape checks of a measurement beyond ``[N, C, h, w]`` (batch, channels, size)."""

    def prox_cg(self, z: Tensor, y: Tensor, rho: float | Tensor) -> Tensor:
        """The proximal step by batched conjugate gradients on ``(H^T H + rho I) x = H^T y + rho z``.

        Each image converges on its own (``||r_i|| <= cg_tol ||b_i||``); converged images stop moving while
        the others continue, up to ``cg_max_iter`` iterations. Starts from ``z``. Needs a linear ``H``.
        """
        if not self.linear:
            raise NotImplementedError(f"{type(self).__name__} is not linear: conjugate gradients do not apply")
        r_ = rho_view(rho, z)

        def normal(v: Tensor) -> Tensor:
            return self.adjoint(self.forward(v)) + r_ * v

        b = self.adjoint(y) + r_ * z
        x = z.clone()
        r = b - normal(x)
        p = r.clone()
        rs = batch_dot(r, r)
        target = (self.cg_tol**2) * batch_dot(b, b)
        tiny = torch.finfo(rs.dtype).tiny
        it = 0
        while it < self.cg_max_iter:
            active = rs > target
            if not bool(active.any()):
                break
            it += 1
            ap = normal(p)
            alpha = torch.where(active, rs / batch_dot(p, ap).clamp_min(tiny), torch.zeros_like(rs))
            x = x + alpha.view(-1, 1, 1, 1) * p
            r = r - alpha.view(-1, 1, 1, 1) * ap
            rs_new = batch_dot(r, r)
            beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
            p = torch.where(active.view(-1, 1, 1, 1), r + beta.view(-1, 1, 1, 1) * p, p)
            rs = torch.where(active, rs_new, rs)
        self.last_cg_iterations = it
        return x


def _holds_inference_tensor(obj: object) -> bool:
    if isinstance(obj, Tensor):
        return obj.is_inference()
    if isinstance(obj, (list, tuple)):
        return any(_holds_inference_tensor(v) for v in obj)
    if isinstance(obj, dict):
        return any(_holds_inference_tensor(v) for v in obj.values())
    if isinstance(obj, nn.Module):
        return any(_holds_inference_tensor(v) for v in vars(obj).values())
    return False


def differentiable(op: nn.Module) -> nn.Module:
    """``op`` ready for autograd: itself, or, when it holds tensors made under ``torch.inference_mode`` (as
    Lightning's predict builds the operators of a batch), a deep copy made outside inference mode, whose tensors
    are normal ones. Inference tensors cannot be saved for backward, so a method that differentiates through
    ``op.forward`` (DPS) calls this inside ``torch.inference_mode(False)``. Tensors captured in a user's closure
    (``LinearOperator``/``NonlinearOperator`` functions) are not reached: build those outside inference mode."""
    if not _holds_inference_tensor(op):
        return op
    with torch.inference_mode(False):
        return copy.deepcopy(op)


def rho_view(rho: float | Tensor, like: Tensor) -> Tensor | float:
    """``rho`` ready to broadcast against ``like`` ``[N, ...]``: a float stays a float, a tensor ``[N]`` (or a
    scalar / ``[1]``) becomes ``[N, 1, 1, 1]`` in ``like``'s dtype and device.

    Floats are checked to be positive and finite here; tensor values are not inspected (no device sync).
    """
    if isinstance(rho, Tensor):
        if rho.ndim == 0 or rho.numel() == 1:
            return rho.reshape(1, *([1] * (like.ndim - 1))).to(like.dtype).to(like.device)
        if rho.ndim != 1 or rho.shape[0] != like.shape[0]:
            raise ValueError(
                f"rho must be a float or a tensor of shape [N] = [{like.shape[0]}] (one value per image), "
                f"got shape {tuple(rho.shape)}"
            )
        return rho.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    rho = float(rho)
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be positive and finite, got {rho}")
    return rho


def check_measurement(y: Tensor, name: str = "y") -> None:
    """Raise unless ``y`` is a floating-point ``[N, C, H, W]`` tensor."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, C, H, W], got {type(y).__name__}")
    if y.ndim != 4:
        hint = f" (add a batch dimension: {name}[None])" if y.ndim == 3 else ""
        raise ValueError(f"{name} must be a batch of images [N, C, H, W], got shape {tuple(y.shape)}{hint}")
    if not y.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1] space, got dtype {y.dtype}")


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or infinite values (syncs with the device once)."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN or infinite value(s) out of {t.numel()}; clean or re-load it before restoring"
        )


def check_batch(param_batch: int, n: int, what: str, single: str, per_image: str) -> None:
    """Raise ``ValueError`` unless a parameter of batch ``param_batch`` fits a batch of ``n`` images."""
    if param_batch not in (1, n):
        raise ValueError(
            f"{what} batch {param_batch} does not match the image batch {n}: give one {what} {single} "
            f"shared by all images, or one per image {per_image}"
        )
