"""Bilevel problems users recognise, runnable offline: a quadratic with a closed form,
per-feature L2 regularisation, data hyper-cleaning, multi-task regularisation."""

from anyorder.bilevel.problems.quadratic import QuadraticBilevel

__all__ = ["QuadraticBilevel"]
