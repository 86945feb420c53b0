"""The closure contract (DESIGN.md) and a helper that builds conforming closures.

``closure(backward: bool = True) -> loss`` re-evaluates the loss on the current batch. With
``backward=True`` it zeroes the gradients and calls ``loss.backward()``; with ``backward=False`` it
only returns the loss (optimizers call it so for function values, or to differentiate themselves).
A plain ``torch.optim`` closure without the argument is accepted by :func:`call_closure`.

Policy for repeated evaluations inside one optimizer step, implemented by :func:`make_closure`:

* **Dropout and other random layers** see the same masks on every call of one closure: the global
  CPU (and current CUDA device) RNG state is captured when the closure is built, every call runs
  inside ``torch.random.fork_rng`` from that state, and the first call's final state is written back
  afterwards, so training advances the RNG exactly as one ordinary forward pass would. By default
  (``replay_rng=None``) this is done when the model has a dropout layer with ``p > 0`` in training
  mode; pass ``replay_rng=True`` for models with other random operations (the capture costs a few
  kilobytes per call, which would otherwise show in the memory figures of tiny models).
* **BatchNorm running statistics** are updated by the first call only: later calls save the
  running mean, variance and batch counter of every batch-norm layer and put them back after the
  forward pass.

Build one closure per batch (per optimizer step).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "Closure",
    "ClosureOutputError",
    "ClosureOutputTypeError",
    "call_closure",
    "check_closure_output",
    "make_closure",
    "accepts_backward",
    "has_active_dropout",
]


class Closure(Protocol):
    """A callable that re-evaluates the loss; see the module docstring for the contract."""

    def __call__(self, backward: bool = True) -> torch.Tensor: ...


#: accepts_backward's answers by code object: a closure is usually rebuilt every step (one per
#: batch) from the same code, and inspect.signature costs ~10 us a call (0.3 us cached).
_ACCEPTS_BY_CODE: dict[Any, bool] = {}


def accepts_backward(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` takes the ``backward`` keyword of the contract."""
    code = getattr(closure, "__code__", None)
    cacheable = (
        code is not None
        and not hasattr(closure, "__wrapped__")  # wrappers' signatures are their targets'
        and not hasattr(closure, "__signature__")
    )
    if cacheable and code in _ACCEPTS_BY_CODE:
        return _ACCEPTS_BY_CODE[code]
    try:
        sig = inspect.signature(closure)
    except (TypeError, ValueError):
        return False
    params = sig.parameters
    answer = "backward" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if cacheable:
        _ACCEPTS_BY_CODE[code] = answer
    return answer


def call_closure(closure: Callable[..., Any], backward: bool) -> torch.Tensor:
    """Call ``closure`` under the contract, tolerating plain closures without the argument.

    A plain closure is called as ``closure()``; with ``backward=False`` it must therefore not call
    ``backward()`` itself (under ``torch.no_grad`` that would fail).
    """
    if closure is None:
        raise ValueError("this optimizer needs a closure: call opt.step(closure)")
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if accepts_backward(closure):
        return closure(backward=backward)
    return closure()


class ClosureOutputError(ValueError):
    """A closure returned a value of the right kind but the wrong shape (e.g. a vector)."""


class ClosureOutputTypeError(TypeError):
    """A closure returned something that is not a loss (``None``, a string, a tuple...)."""


def _describe(value: Any) -> str:
    if value is None:
        return "None (does the closure end with `return loss`?)"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (str, bytes)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} elements"
    return f"a {type(value).__name__}"


def _split_pair(output: Any) -> tuple[Any, Any] | None:
    """``(loss, logits)`` from a pair, a mapping or a ``ModelOutput``; ``None`` if it is none."""
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    if isinstance(output, Mapping) and "loss" in output and "logits" in output:
        return output["loss"], output["logits"]
    if (
        not isinstance(output, (torch.Tensor, numbers.Number, str, bytes))
        and output is not None
        and getattr(output, "loss", None) is not None
        and hasattr(output, "logits")
    ):
        return output.loss, output.logits
    return None


def check_closure_output(
    output: Any, *, with_logits: bool = False, requires_grad: bool = False, who: str = "closure"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate what a closure returned and return ``(loss, logits)`` (``logits`` is ``None``
    unless ``with_logits``). The one check of a closure's return value in the library.

    Allowed: a one-element floating-point tensor or a Python real number (converted to a float64
    tensor); with ``with_logits``, ``(loss, logits)``, a mapping with keys ``"loss"`` and
    ``"logits"`` or an object with ``.loss`` and ``.logits`` (a Hugging Face ``ModelOutput``).
    ``requires_grad``: the loss must carry an autograd graph (for optimizers that differentiate
    it themselves). Raises :class:`ClosureOutputTypeError` (a ``TypeError``) or
    :class:`ClosureOutputError` (a ``ValueError``) naming what was returned.
    """
    allowed = "a scalar loss tensor or float"
    if with_logits:
        allowed += " paired with the logits: (loss, logits), {'loss', 'logits'} or a ModelOutput"
    logits = None
    loss = output
    if with_logits:
        pair = _split_pair(output)
        if pair is None:
            hint = (
                "; the Gauss-Newton-Bartlett estimator needs the logits"
                if isinstance(output, (torch.Tensor, numbers.Real))
                else ""
            )
            raise ClosureOutputTypeError(
                f"{who} must return {allowed}, got {_describe(output)}{hint}"
            )
        loss, logits = pair
        if not isinstance(logits, torch.Tensor):
            raise ClosureOutputTypeError(
                f"{who} must return {allowed}; the logits are {_describe(logits)}"
            )
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ClosureOutputError(f"{who} must return {allowed}, got {_describe(loss)}")
        if not (loss.is_floating_point() or loss.is_complex()):
            raise ClosureOutputTypeError(
                f"{who} must return {allowed}, got {_describe(loss)} (not floating point)"
            )
    elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        loss = torch.tensor(float(loss), dtype=torch.float64)
    else:
        raise ClosureOutputTypeError(f"{who} must return {allowed}, got {_describe(loss)}")
    if requires_grad and not loss.requires_grad:
        raise ClosureOutputError(
            f"the loss returned by {who} does not require grad: closure(backward=False) must "
            "build the autograd graph (do not wrap its forward pass in torch.no_grad())"
        )
    return loss, logits


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _bn_snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    saved = []
    for module in model.modules():
        if isinstance(module, _BN_TYPES) and module.track_running_stats and module.training:
            buffers = {
                name: buf.detach().clone()
                for name, buf in (
                    ("running_mean", module.running_mean),
                    ("running_var", module.running_var),
                    ("num_batches_tracked", module.num_batches_tracked),
                )
                if buf is not None
            }
            saved.append((module, buffers))
    return saved


def _bn_restore(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    with torch.no_grad():
        for module, buffers in saved:
            for name, value in buffers.items():
                getattr(module, name).copy_(value)


def has_active_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has a dropout layer with ``p > 0`` in training mode."""
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
        for m in model.modules()
    )


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


def make_closure(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Any,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    replay_rng: bool | None = None,
) -> Closure:
    """Build a contract closure for ``model`` on one ``batch``.

    ``loss_fn(output, target)`` is applied to ``model(inputs)`` when ``batch`` is an
    ``(inputs, target)`` pair; pass ``forward(model, batch) -> output`` for other batch layouts (then
    ``loss_fn(output, batch)`` is called). See the module docstring for the dropout and batch-norm
    policy (``replay_rng``). The closure carries the model as ``closure.model``: particle methods
    (:class:`anyorder.optim.CBO`) use it to evaluate a whole population of parameter vectors in one
    vectorised call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if replay_rng is None:
        replay_rng = has_active_dropout(model)
    devices = _cuda_devices()
    rng_state = torch.get_rng_state() if replay_rng else None
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices] if replay_rng else []
    calls = 0

    def evaluate() -> torch.Tensor:
        if forward is not None:
            return loss_fn(forward(model, batch), batch)
        if isinstance(batch, Sequence) and len(batch) == 2:
            inputs, target = batch
            return loss_fn(model(inputs), target)
        raise TypeError(
            "batch must be an (inputs, target) pair unless forward(model, batch) is given; "
            f"got {type(batch).__name__}"
        )

    def run(backward: bool) -> torch.Tensor:
        if backward:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = evaluate()
            loss.backward()
            return loss
        return evaluate()

    def closure(backward: bool = True) -> torch.Tensor:
        nonlocal calls
        first = calls == 0
        calls += 1
        saved_bn = [] if first else _bn_snapshot(model)
        if rng_state is None:
            loss = run(backward)
        else:
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(rng_state)
                for d, state in zip(devices, cuda_states):
                    torch.cuda.set_rng_state(state, d)
                loss = run(backward)
                after = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            if first:
                torch.set_rng_state(after[0])
                for d, state in zip(devices, after[1]):
                    torch.cuda.set_rng_state(state, d)
        if not first:
            _bn_restore(saved_bn)
        return loss

    closure.model = model  # type: ignore[attr-defined]  # particle methods vmap over it
    return closure
