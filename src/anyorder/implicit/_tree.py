"""The few pytrees the implicit layer and the linear solvers accept: a tensor, or tuples, lists and
dicts (string keys) nesting tensors. One small flatten/unflatten pair, so that no private torch
module is needed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TreeSpec", "tree_flatten", "tree_unflatten", "describe"]

#: A tree's structure: ``None`` (a tensor leaf), ``("tuple" | "list", children)`` or
#: ``("dict", keys, children)``.
TreeSpec = Any


def tree_flatten(tree: Any, name: str = "input") -> tuple[list[torch.Tensor], TreeSpec]:
    """The tensor leaves of ``tree`` in order and its structure; ``TypeError`` naming ``name`` and
    the bad part when something other than a tensor, tuple, list or dict is inside."""
    leaves: list[torch.Tensor] = []

    def go(node: Any, where: str) -> TreeSpec:
        if isinstance(node, torch.Tensor):
            leaves.append(node)
            return None
        if isinstance(node, (tuple, list)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return (kind, tuple(go(c, f"{where}[{i}]") for i, c in enumerate(node)))
        if isinstance(node, dict):
            keys = tuple(node.keys())
            return ("dict", keys, tuple(go(node[k], f"{where}[{k!r}]") for k in keys))
        raise TypeError(
            f"{where} must be a tensor or a tuple, list or dict of tensors, "
            f"got {type(node).__name__}"
        )

    spec = go(tree, name)
    return leaves, spec


def tree_unflatten(spec: TreeSpec, leaves: Sequence[torch.Tensor]) -> Any:
    """Rebuild the tree of structure ``spec`` from ``leaves`` (in the order of ``tree_flatten``)."""
    it = iter(leaves)

    def go(s: TreeSpec) -> Any:
        if s is None:
            return next(it)
        if s[0] == "dict":
            return {k: go(c) for k, c in zip(s[1], s[2])}
        children = [go(c) for c in s[1]]
        return tuple(children) if s[0] == "tuple" else children

    return go(spec)


def describe(spec: TreeSpec) -> str:
    """A short text of a structure for error messages, e.g. ``dict(w, b)`` or ``tuple(2)``."""
    if spec is None:
        return "tensor"
    if spec[0] == "dict":
        return "dict(" + ", ".join(str(k) for k in spec[1]) + ")"
    return f"{spec[0]}({len(spec[1])})"
