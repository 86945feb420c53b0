"""Hessian-vector products computed inside the library (DESIGN.md, principle 4).

The user never calls ``backward(create_graph=True)``: :class:`HVPEngine` evaluates the closure
with ``backward=False`` under ``torch.enable_grad()``, differentiates the loss itself with
``create_graph=True`` and differentiates the gradient once more against the probe vectors
(Pearlmutter's R-operator, "Fast Exact Multiplication by the Hessian", 1994). Every graph is
released before the call returns: nothing returned carries a ``grad_fn``.

Where double backward is unavailable (e.g. PyTorch's fused CPU attention kernel, which
``transformers`` models use by default), ``method="auto"`` falls back, with one
:class:`CurvatureFallbackWarning` per engine, to the one-sided finite difference of two gradients

    H v ~ (grad L(theta + h v) - grad L(theta)) / h,   h = sqrt(eps_dtype) (1 + |theta|) / |v|,

which costs one extra forward and backward pass per vector. The parameters are restored exactly
(from a copy), and closures built by :func:`anyorder.core.make_closure` replay the same dropout
masks, so the two gradients see the same function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from anyorder.core.closure import accepts_backward, call_closure, check_closure_output

__all__ = [
    "HVP_METHODS",
    "CurvatureFallbackWarning",
    "HVPEngine",
    "double_backward_unavailable",
    "is_double_backward_error",
    "loss_with_graph",
    "finite_difference_step",
]

HVP_METHODS = ("auto", "autograd", "finite_difference")

_DOUBLE_BACKWARD_MARKERS = (
    "derivative for",
    "double backward",
    "not implemented",
    "does not support",
    "once_differentiable",
    "trying to backward through the graph a second time",
)


class _Blocked(RuntimeError):
    """Internal: the gradient's graph shows that double backward is unavailable."""


class CurvatureFallbackWarning(UserWarning):
    """Double backward is unavailable; a curvature estimator fell back to another method."""


#: Autograd nodes that stand for a backward that cannot itself be differentiated
#: (``once_differentiable`` functions, operators without a derivative formula).
_BLOCKING_NODES = ("Error", "DelayedError", "NotImplemented")


def double_backward_unavailable(
    grads: Sequence[torch.Tensor] = (), err: BaseException | None = None
) -> str | None:
    """Why double backward is unavailable, or ``None``: the one detector of a missing double
    derivative (used by :class:`HVPEngine` and by :mod:`anyorder.hessian.operators`).

    ``grads`` (gradients taken with ``create_graph=True``): their graph is walked for a node that
    stands for a backward without a derivative; such nodes may silently drop their contribution
    (a ``once_differentiable`` function makes the Hessian-vector product zero without an error).
    ``err`` (an error raised by a double backward): its text says the derivative is missing.
    """
    if err is not None:
        if isinstance(err, (RuntimeError, NotImplementedError)):
            text = str(err).strip()
            if any(marker in text.lower() for marker in _DOUBLE_BACKWARD_MARKERS):
                return text.split("\n")[0]
        return None
    stack = [(g.grad_fn, None) for g in grads if g is not None and g.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node, parent = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _BLOCKING_NODES:
            # The blocking node's own name is generic; the node that uses it names the operation.
            where = f" below {parent.name()}" if parent is not None else ""
            return f"the gradient's graph holds a {type(node).__name__} node{where}"
        stack.extend((next_fn, node) for next_fn, _ in node.next_functions)
    return None


def is_double_backward_error(err: BaseException) -> bool:
    """Whether ``err`` says that an operation has no (double) derivative
    (:func:`double_backward_unavailable` given the error)."""
    return double_backward_unavailable(err=err) is not None


def require_contract_closure(closure: Any, who: str) -> None:
    """Raise unless ``closure`` follows the closure contract (``closure(backward=False)``)."""
    if closure is None:
        raise ValueError(
            f"{who} computes Hessian-vector products itself and needs a closure: call "
            "opt.step(closure) with closure(backward: bool = True) -> loss "
            "(anyorder.core.make_closure(model, loss_fn, batch) builds one)"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if not accepts_backward(closure):
        raise TypeError(
            f"{who} needs a closure that accepts backward=False (it differentiates the loss "
            "itself); got a closure without that argument. Use "
            "anyorder.core.make_closure(model, loss_fn, batch) or add the argument"
        )


def loss_with_graph(closure: Callable[..., Any]) -> Any:
    """``closure(backward=False)`` evaluated with autograd recording (whatever it returns)."""
    with torch.enable_grad():
        return call_closure(closure, backward=False)


def check_scalar_loss(loss: Any) -> torch.Tensor:
    """Validate that ``loss`` is a scalar tensor attached to the parameters' graph (the one
    check of :func:`anyorder.core.closure.check_closure_output`)."""
    return check_closure_output(loss, requires_grad=True, who="closure(backward=False)")[0]


def grads_or_zeros(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``grads`` with a zero tensor (shaped like its parameter) for every unused parameter."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def finite_difference_step(params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> float:
    """The step ``h = sqrt(eps) (1 + |theta|) / |v|`` of the one-sided finite difference."""
    dtype = params[0].dtype if params else torch.float32
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    norms = torch._foreach_norm(list(params))
    theta = float(torch.linalg.vector_norm(torch.stack(norms).double()))
    vnorm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(vector))).double()))
    if vnorm == 0.0:
        return 0.0
    return math.sqrt(eps) * (1.0 + theta) / vnorm


class HVPEngine:
    """Gradient and Hessian-vector products of a closure's loss, with a remembered fallback.

    Args:
        method: ``"autograd"`` (double backward, error if unavailable), ``"finite_difference"``
            or ``"auto"`` (double backward, falling back to finite differences with one
            :class:`CurvatureFallbackWarning` the first time it is unavailable, and using them
            from then on).
        owner: the name used in messages (e.g. ``"Sophia"``).
    """

    def __init__(self, method: str = "auto", owner: str = "curvature estimator") -> None:
        if method not in HVP_METHODS:
            raise ValueError(
                f"unknown hvp method {method!r}; choose one of {', '.join(HVP_METHODS)}"
            )
        self.method = method
        self.owner = owner
        #: The method in use: ``None`` until the first product under ``"auto"``.
        self.resolved: str | None = None if method == "auto" else method
        self.warned = False
        #: Hessian-vector products taken by double backward so far (finite-difference ones
        #: call the closure instead, where a caller can count them).
        self.products = 0

    def _fall_back(self, reason: str) -> None:
        self.resolved = "finite_difference"
        if not self.warned:
            self.warned = True
            first_line = reason
            warnings.warn(
                f"{self.owner}: double backward is unavailable for this model ({first_line}); "
                "Hessian-vector products fall back to finite differences of two gradients (one "
                "extra forward and backward pass per probe). Pass hvp='finite_difference' to "
                "choose this explicitly, or use operations with double backward (for "
                "transformers models: attn_implementation='eager').",
                CurvatureFallbackWarning,
                stacklevel=4,
            )

    def gradient_and_hvps(
        self,
        closure: Callable[..., Any],
        params: Sequence[torch.Tensor],
        vectors: Sequence[Sequence[torch.Tensor]],
        *,
        split: Callable[[Any], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[list[torch.Tensor]]]:
        """``(loss, gradient, [H v for v in vectors])`` at the current parameters, detached.

        ``split`` maps what the closure returns to the scalar loss (default: the value itself).
        A non-finite loss returns early with empty products.
        """
        params = list(params)
        split = split or (lambda out: out)
        loss = check_scalar_loss(split(loss_with_graph(closure)))
        if self.resolved != "finite_difference":
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            loss = loss.detach()
            if not math.isfinite(float(loss)):
                return loss, [torch.zeros_like(p) for p in params], []
            blocked = None
            if self.resolved is None and self.method == "auto":
                # Once per engine (the model's graph keeps its structure): a node without a
                # double derivative may drop its part of H v silently, without an error.
                blocked = double_backward_unavailable(grads)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            every = len(live) == len(params)
            live_grads = grads if every else [grads[i] for i in live]
            live_params = params if every else [params[i] for i in live]
            try:
                products = []
                for k, v in enumerate(vectors):
                    out: Sequence[torch.Tensor | None] = ()
                    if live:
                        out = torch.autograd.grad(
                            live_grads,
                            live_params,
                            grad_outputs=v if every else [v[i] for i in live],
                            retain_graph=k < len(vectors) - 1,
                            allow_unused=True,
                        )
                        self.products += 1
                    if every and all(h is not None for h in out):
                        products.append(list(out))
                        continue
                    hv = [torch.zeros_like(p) for p in params]
                    for i, h in zip(live, out):
                        if h is not None:
                            hv[i] = h
                    products.append(hv)
                if blocked is not None:
                    # The products did not raise, but a blocking node may have dropped its part
                    # (an error, when there is one, names the operation better: tried first).
                    raise _Blocked(blocked)
                self.resolved = "autograd"
                return loss, [g.detach() for g in grads_or_zeros(grads, params)], products
            except (RuntimeError, NotImplementedError) as err:
                reason = (
                    str(err) if isinstance(err, _Blocked) else double_backward_unavailable(err=err)
                )
                if self.method != "auto" or reason is None:
                    raise
                self._fall_back(reason)
                flat = [g.detach() for g in grads_or_zeros(grads, params)]
                del grads
        else:
            flat = grads_or_zeros(torch.autograd.grad(loss, params, allow_unused=True), params)
            loss = loss.detach()
            if not math.isfinite(float(loss)):
                return loss, flat, []
        return loss, flat, self.finite_difference(closure, params, flat, vectors, split=split)

    def finite_difference(
        self,
        closure: Callable[..., Any],
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        vectors: Sequence[Sequence[torch.Tensor]],
        *,
        split: Callable[[Any], torch.Tensor] | None = None,
    ) -> list[list[torch.Tensor]]:
        """``(grad L(theta + h v) - grad L(theta)) / h`` for each ``v``; parameters restored
        exactly afterwards."""
        params = list(params)
        split = split or (lambda out: out)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
        products = []
        try:
            for v in vectors:
                h = finite_difference_step(saved, v)
                if h == 0.0:
                    products.append([torch.zeros_like(p) for p in params])
                    continue
                with torch.no_grad():
                    torch._foreach_add_(params, list(v), alpha=h)
                loss = check_scalar_loss(split(loss_with_graph(closure)))
                shifted = grads_or_zeros(
                    torch.autograd.grad(loss, params, allow_unused=True), params
                )
                with torch.no_grad():
                    torch._foreach_copy_(params, saved)
                    diff = torch._foreach_sub(shifted, list(grads))
                    torch._foreach_div_(diff, h)
                products.append(list(diff))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        return products
