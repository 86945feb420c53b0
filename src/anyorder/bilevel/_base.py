"""The base of every bilevel algorithm: outer variables in ``param_groups``, inner variables
beside them, closures evaluated at any point, derivatives taken by the library.

The bilevel problem is ``min_x F(x, y*(x))`` with ``y*(x) = argmin_y G(x, y)``.

The closure contract
--------------------
``outer_loss()`` returns ``F`` and ``inner_loss()`` returns ``G`` as scalar tensors, computed from
the CURRENT values of the outer tensors (the optimizer's parameters) and the inner tensors (given
as ``inner=``), with autograd recording (no ``torch.no_grad()``, no ``backward()`` call: the
algorithm differentiates them itself with ``torch.autograd.grad``, ``create_graph=True`` where it
needs Hessian-vector products). Each call is one oracle access: a closure may draw a fresh
minibatch on every call (a stochastic oracle) or use a batch captured before ``step()``. Closures
that accept a ``backward`` keyword (the anyorder contract) are called with ``backward=False``.

To evaluate a closure at a point other than the current one (the penalty method's ``z``,
LV-HBA's ``theta``, a stored unrolled iterate) the algorithm copies that point into the tensors,
evaluates, and copies the current values back in a ``finally`` block.

Error paths
-----------
``step()`` snapshots the outer and inner tensors and the algorithm state first; any exception
(including ``KeyboardInterrupt`` inside a closure) restores all of them before it propagates. A
non-finite loss, gradient or product found during a step restores them too and then follows
``on_nonfinite``: ``"raise"`` (default) raises :class:`~anyorder.core.NonFiniteLossError`,
``"skip"`` counts the step in ``global_state["skipped_steps"]`` and returns ``None``.

Inner warm-up
-------------
Every algorithm takes ``init_steps`` (default 0; BO-REP's default is its ``inner_steps``) and
``init_lr``: the first step (``global_state["step"] == 0``) starts with ``init_steps`` plain
gradient steps ``y <- y - init_lr grad_y G(x_0, y)`` on the inner problem at the starting outer
point, before the algorithm's own update (:meth:`BilevelOptimizer.inner_gd_`; BSVRB: every block
on its own ``g_i``). It is part of that
step: an exception in it rolls it back with the rest, a state dict saved after it does not repeat
it. Without it the hypergradient of an algorithm whose inner iterate starts far from
``y*(x_0)`` (a randomly initialised network) and takes a few steps per outer step is meaningless
for the first outer steps. It is BO-REP's initialization refinement (Hao et al., ICLR 2024),
offered to every algorithm.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from anyorder.core.base import AnyOrderOptimizer, NonFiniteLossError
from anyorder.curvature.hvp import check_scalar_loss, grads_or_zeros, loss_with_graph

__all__ = ["BilevelOptimizer", "MixedHessian", "check_positive", "check_int"]

Tensors = list[torch.Tensor]


class _NonFinite(Exception):
    """Internal: a non-finite value was met during a step (the step is rolled back)."""


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, or ``ValueError`` naming it unless it is finite and > 0 (>= 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int, or an error naming it unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_closure(name: str, closure: Any) -> None:
    if closure is None or not callable(closure):
        raise TypeError(
            f"{name} must be a callable returning a scalar loss tensor, got {type(closure).__name__}"
        )


def _finite(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _evaluate(closure: Callable[..., Any], name: str) -> torch.Tensor:
    try:
        loss = check_scalar_loss(loss_with_graph(closure))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None
    return loss.reshape(())


class MixedHessian:
    """Derivatives of one closure at one point ``(x, y)``: the loss, ``grad_x``, ``grad_y`` and,
    for any vectors ``v`` (shaped like ``y``), ``(d^2 G/dx dy) v`` and ``(d^2 G/dy^2) v``.

    The gradient is built once with ``create_graph=True`` (the double-backward path of
    :mod:`anyorder.curvature.hvp`, whose loss and gradient helpers it uses); each product is one
    more backward pass through it: ``d/d(x, y) <grad_y G, v>``, the Hessian of ``G`` over
    ``(x, y)`` applied to ``(0, v)``. Everything returned is detached. Call :meth:`release` (or
    let it go out of scope) to free the graph.
    """

    def __init__(
        self, closure: Callable[..., Any], x: Tensors, y: Tensors, *, name: str = "inner_loss"
    ) -> None:
        self.x, self.y, self.name = list(x), list(y), name
        loss = _evaluate(closure, name)
        grads = torch.autograd.grad(loss, self.x + self.y, create_graph=True, allow_unused=True)
        nx = len(self.x)
        self.loss = loss.detach()
        self._gy = [g for g in grads[nx:]]
        self.grad_x = [g.detach() for g in grads_or_zeros(grads[:nx], self.x)]
        self.grad_y = [g.detach() for g in grads_or_zeros(grads[nx:], self.y)]
        self._live = [i for i, g in enumerate(self._gy) if g is not None and g.requires_grad]

    def products(self, v: Sequence[torch.Tensor], *, retain: bool = True) -> tuple[Tensors, Tensors]:
        """``((d^2 G/dx dy) v, (d^2 G/dy^2) v)`` at the point, detached."""
        if not self._live:
            return [torch.zeros_like(p) for p in self.x], [torch.zeros_like(p) for p in self.y]
        try:
            out = torch.autograd.grad(
                [self._gy[i] for i in self._live],
                self.x + self.y,
                grad_outputs=[v[i] for i in self._live],
                retain_graph=retain,
                allow_unused=True,
            )
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"{self.name}: the bilevel algorithm needs second derivatives (double backward) "
                f"of the inner loss and could not take them: {str(err).splitlines()[0]}"
            ) from err
        out = grads_or_zeros(out, self.x + self.y)
        nx = len(self.x)
        return [o.detach() for o in out[:nx]], [o.detach() for o in out[nx:]]

    def hyy(self, v: Sequence[torch.Tensor]) -> Tensors:
        """``(d^2 G/dy^2) v`` alone (one backward pass over ``y`` only), detached."""
        if not self._live:
            return [torch.zeros_like(p) for p in self.y]
        try:
            out = torch.autograd.grad(
                [self._gy[i] for i in self._live],
                self.y,
                grad_outputs=[v[i] for i in self._live],
                retain_graph=True,
                allow_unused=True,
            )
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"{self.name}: the bilevel algorithm needs second derivatives (double backward) "
                f"of the inner loss and could not take them: {str(err).splitlines()[0]}"
            ) from err
        return [o.detach() for o in grads_or_zeros(out, self.y)]

    def release(self) -> None:
        self._gy = []
        self._live = []


class BilevelOptimizer(AnyOrderOptimizer):
    """``torch.optim.Optimizer`` over the outer variables, with the inner variables beside them.

    Args:
        params: outer tensors or param groups (``lr`` etc. per group; LR schedulers act on them).
        inner: the inner tensors ``y`` (leaf tensors with ``requires_grad=True``, disjoint from
            the outer ones). They are updated in place.
        defaults: the per-group hyperparameters.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``; see the module docstring.

    Algorithm state lives in ``global_state["bilevel"]`` (tensors and numbers only), which
    ``state_dict()`` saves under the ``"anyorder"`` key, so a fresh optimizer built with the same
    arguments resumes bit-identically after ``load_state_dict``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        defaults: dict[str, Any],
        *,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)
        if isinstance(inner, torch.Tensor):
            inner = [inner]
        try:
            self.inner: Tensors = list(inner)
        except TypeError:
            raise TypeError(
                f"inner must be an iterable of tensors, got {type(inner).__name__}"
            ) from None
        if not self.inner:
            raise ValueError("inner is empty: pass the inner variables y as a list of tensors")
        outer_ids = {id(p) for p in self.outer}
        for i, t in enumerate(self.inner):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"inner[{i}] must be a tensor, got {type(t).__name__}")
            if not t.is_leaf or not t.requires_grad:
                raise ValueError(
                    f"inner[{i}] must be a leaf tensor with requires_grad=True (the algorithm "
                    "differentiates the closures with respect to it)"
                )
            if id(t) in outer_ids:
                raise ValueError(f"inner[{i}] is also an outer parameter: they must be disjoint")
        for p in self.outer:
            if not p.requires_grad:
                raise ValueError("every outer parameter must have requires_grad=True")
        self.global_state["bilevel"] = {}
        self.init_steps = 0
        self.init_lr = 0.0

    def set_inner_warmup(self, init_steps: int, init_lr: float | None, default_lr: float) -> None:
        """Validate and set the inner warm-up of the first step (see the module docstring):
        ``init_steps >= 0`` gradient steps of size ``init_lr > 0`` (``default_lr``, the
        algorithm's own inner step, when ``init_lr`` is None)."""
        self.init_steps = check_int("init_steps", init_steps, minimum=0)
        self.init_lr = check_positive("init_lr", default_lr if init_lr is None else init_lr)

    # -- variables ------------------------------------------------------------------------------
    @property
    def outer(self) -> Tensors:
        """The outer tensors, over all param groups in order."""
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def bstate(self) -> dict[str, Any]:
        """The algorithm's state (``global_state["bilevel"]``)."""
        return self.global_state["bilevel"]

    def _lr_per_outer(self, key: str = "lr") -> list[float]:
        return [float(g[key]) for g in self.param_groups for _ in g["params"]]

    @contextlib.contextmanager
    def at(self, tensors: Tensors, values: Sequence[torch.Tensor]) -> Iterator[None]:
        """Temporarily give ``tensors`` the ``values`` (restored exactly afterwards)."""
        with torch.no_grad():
            saved = [t.detach().clone() for t in tensors]
            torch._foreach_copy_(tensors, list(values))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)

    # -- derivatives ----------------------------------------------------------------------------
    def grad(
        self, closure: Callable[..., Any], wrt: Tensors, name: str
    ) -> tuple[torch.Tensor, Tensors]:
        """``(loss, d loss / d wrt)`` of ``closure`` at the current point, detached and checked
        finite."""
        loss = _evaluate(closure, name)
        grads = grads_or_zeros(torch.autograd.grad(loss, wrt, allow_unused=True), wrt)
        out = [g.detach() for g in grads]
        self.check_finite([loss.detach(), *out])
        return loss.detach(), out

    def grad_xy(self, closure: Callable[..., Any], name: str) -> tuple[torch.Tensor, Tensors, Tensors]:
        """``(loss, d/dx, d/dy)`` of ``closure`` at the current point (one evaluation)."""
        nx = len(self.outer)
        loss, g = self.grad(closure, self.outer + self.inner, name)
        return loss, g[:nx], g[nx:]

    def mixed(self, closure: Callable[..., Any], name: str = "inner_loss") -> MixedHessian:
        """A :class:`MixedHessian` of ``closure`` at the current ``(x, y)``."""
        m = MixedHessian(closure, self.outer, self.inner, name=name)
        self.check_finite([m.loss, *m.grad_x, *m.grad_y])
        return m

    def check_finite(self, tensors: Sequence[torch.Tensor]) -> None:
        if not _finite(tensors):
            raise _NonFinite()

    # -- the step wrapper -----------------------------------------------------------------------
    def _snapshot(self) -> tuple[Tensors, Tensors, dict[str, Any]]:
        with torch.no_grad():
            xs = [p.detach().clone() for p in self.outer]
            ys = [p.detach().clone() for p in self.inner]
        return xs, ys, copy.deepcopy(self.bstate)

    def _restore(self, snap: tuple[Tensors, Tensors, dict[str, Any]]) -> None:
        xs, ys, state = snap
        with torch.no_grad():
            torch._foreach_copy_(self.outer, xs)
            torch._foreach_copy_(self.inner, ys)
        self.global_state["bilevel"] = state

    def _guarded(self, body: Callable[[], Any]) -> Any:
        snap = self._snapshot()
        try:
            result = body()
        except _NonFinite:
            self._restore(snap)
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"{type(self).__name__}: a non-finite loss, gradient or product at step "
                    f"{self.global_state['step']}; variables and state were left unchanged"
                ) from None
            self.global_state["skipped_steps"] += 1
            return None
        except BaseException:
            self._restore(snap)
            raise
        self.global_state["step"] += 1
        return result

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]
    ) -> torch.Tensor | None:
        """One outer iteration; returns the outer loss at the point where the outer gradient was
        taken (detached), or ``None`` for a skipped step."""
        _check_closure("inner_loss", inner_loss)
        _check_closure("outer_loss", outer_loss)
        with torch.enable_grad():
            return self._guarded(lambda: self._warm_then_step(inner_loss, outer_loss))

    def _warm_then_step(
        self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]
    ) -> torch.Tensor:
        if self.global_state["step"] == 0 and self.init_steps:
            self.inner_gd_(self._warmup_loss(inner_loss), self.init_steps, self.init_lr)
        return self._step(inner_loss, outer_loss)

    def _warmup_loss(self, inner_loss: Callable[..., Any]) -> Callable[..., Any]:
        """The closure the warm-up descends (multi-block algorithms: the sum of the blocks)."""
        return inner_loss

    def _step(self, inner_loss: Callable[..., Any], outer_loss: Callable[..., Any]) -> torch.Tensor:
        raise NotImplementedError

    # -- shared update pieces -------------------------------------------------------------------
    def outer_sgd_(self, direction: Sequence[torch.Tensor], key: str = "lr") -> None:
        """``x <- x - lr_group * direction`` (in place, per group)."""
        self.check_finite(list(direction))
        with torch.no_grad():
            for p, d, lr in zip(self.outer, direction, self._lr_per_outer(key)):
                p.add_(d, alpha=-lr)

    def inner_gd_(self, inner_loss: Callable[..., Any], steps: int, lr: float) -> None:
        """``steps`` gradient steps ``y <- y - lr grad_y G(x, y)`` on the inner tensors (each
        gradient checked finite)."""
        for _ in range(steps):
            _, g = self.grad(inner_loss, self.inner, "inner_loss")
            self.sgd_(self.inner, g, lr)

    @staticmethod
    def sgd_(tensors: Tensors, direction: Sequence[torch.Tensor], lr: float) -> None:
        with torch.no_grad():
            torch._foreach_add_(tensors, list(direction), alpha=-lr)
