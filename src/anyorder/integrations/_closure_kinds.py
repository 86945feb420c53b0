"""How an optimizer uses the closure contract, for the trainer integrations (shared by
:mod:`anyorder.integrations.hf_trainer` and :mod:`anyorder.integrations.lightning`; it imports
neither Hugging Face nor Lightning).

Three kinds, by what the optimizer asks of ``closure(backward=...)``:

* ``"gradient_free"`` (ZOSGD, ZOAdam, CBO): only ``closure(backward=False)`` under
  ``torch.no_grad()``; no gradient ever exists, so there is nothing to clip or scale, and a
  trainer that runs ``backward`` for them wastes a pass and the inference-memory property;
* ``"self_differentiating"`` (Sophia, AdaHessian): on Hessian-refresh steps the optimizer calls
  ``closure(backward=False)`` with grad enabled and differentiates the loss itself (Hessian-vector
  products), so a trainer cannot reach that gradient between the backward pass and the update;
* ``"first_order"`` (SAM, ``torch.optim`` optimizers, anything else): every evaluation is
  ``closure()`` / ``closure(backward=True)``, which fills ``.grad`` as in a standard loop.
"""

from __future__ import annotations

from typing import Any

from anyorder.optim import CBO
from anyorder.optim._curvature import CurvatureOptimizer
from anyorder.optim.zo import _ZeroOrderOptimizer

__all__ = ["closure_kind", "needs_contract_closure", "unwrap_optimizer"]

GRADIENT_FREE = (_ZeroOrderOptimizer, CBO)  # ZOSGD, ZOAdam (and HybridZO), CBO
SELF_DIFFERENTIATING = (CurvatureOptimizer,)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside trainer wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, the Trainer-facing adapter of ``ClosureTrainer``): the object whose
    ``step`` does the update. Only those wrappers are looked through (an optimizer that holds
    another, as SAM holds its base optimizer, is not)."""
    for _ in range(8):
        inner = getattr(type(optimizer), "_anyorder_adapter", False) and optimizer.inner
        module = type(optimizer).__module__
        if not inner and module.startswith(("accelerate.", "lightning.", "pytorch_lightning.")):
            inner = optimizer.__dict__.get("optimizer") or optimizer.__dict__.get("_optimizer")
        if inner is None or inner is False or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def closure_kind(optimizer: Any) -> str:
    """``"gradient_free"``, ``"self_differentiating"`` or ``"first_order"`` (see the module
    docstring) for ``optimizer`` (wrappers are looked through)."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, GRADIENT_FREE):
        return "gradient_free"
    if isinstance(inner, SELF_DIFFERENTIATING):
        return "self_differentiating"
    return "first_order"


def needs_contract_closure(optimizer: Any) -> bool:
    """Whether ``optimizer`` must be stepped with a closure that honours ``backward=False`` (a
    plain training-loop closure that always runs ``backward`` breaks or wastes it)."""
    return closure_kind(optimizer) != "first_order"
