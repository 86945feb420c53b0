"""Stochastic trace estimation: Hutchinson's estimator (as in PyHessian, Yao et al. 2020) and
Hutch++ (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", 2021).

Probe vectors are drawn from an explicit generator (``seed``) and multiplied in blocks through
``op.matmat``, so one batched Hessian-vector product serves many probes.
"""

from __future__ import annotations

import math

import torch

from anyorder.hessian.lanczos import random_vectors
from anyorder.hessian.operators import CurvatureOperator
from anyorder.hessian.results import TraceEstimate

__all__ = ["trace", "hutchinson_samples", "METHODS"]

METHODS = ("hutch++", "hutchinson")


def _apply(op: CurvatureOperator, vs: torch.Tensor, block: int) -> torch.Tensor:
    return torch.cat([op.matmat(vs[i : i + block]) for i in range(0, vs.shape[0], block)])


def hutchinson_samples(
    op: CurvatureOperator,
    n: int,
    *,
    generator: torch.Generator,
    distribution: str = "rademacher",
    block: int = 4,
    project: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` Hutchinson samples ``z^T A z`` (float64); with ``project`` (orthonormal columns
    ``Q``), of the deflated operator ``(I - QQ^T) A (I - QQ^T)``."""
    z = random_vectors(
        n, op.size, generator=generator, distribution=distribution, dtype=op.dtype, device=op.device
    )
    if project is not None:
        z = z - (z @ project) @ project.T
    az = _apply(op, z, block)
    return (z.double() * az.double()).sum(1).cpu()


def trace(
    op: CurvatureOperator,
    *,
    method: str = "hutch++",
    matvecs: int = 99,
    seed: int = 0,
    distribution: str = "rademacher",
    block: int = 4,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with ``matvecs`` operator products.

    ``"hutchinson"`` (Hutchinson 1990; PyHessian's trace): the mean of ``z^T A z`` over
    ``matvecs`` random vectors, unbiased, variance ``2 ||A||_F^2 / m`` for Rademacher ``z``.

    ``"hutch++"`` (Meyer et al. 2021): a third of the budget sketches the dominant range
    ``Q = qr(A S)``, a third takes its trace exactly (``tr(Q^T A Q)``) and the rest runs Hutchinson
    on the deflated ``(I - QQ^T) A (I - QQ^T)``; ``samples`` are ``tr(Q^T A Q) + z^T A' z`` and
    ``stderr`` is conditional on ``Q``. For decaying spectra the error falls as ``1/m`` instead
    of ``1/sqrt(m)``.

    Raises ``ValueError`` for an unknown method or distribution, or too small a budget (2 for
    Hutchinson, 5 for Hutch++).
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    least = 2 if method == "hutchinson" else 5
    if not isinstance(matvecs, int) or isinstance(matvecs, bool) or matvecs < least:
        raise ValueError(f"matvecs must be an integer >= {least} for {method}, got {matvecs!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    generator = torch.Generator().manual_seed(int(seed))
    before = op.matvecs
    if method == "hutchinson":
        samples = hutchinson_samples(
            op, matvecs, generator=generator, distribution=distribution, block=block
        )
    else:
        sketch = min(matvecs // 3, op.size)
        s = random_vectors(
            sketch,
            op.size,
            generator=generator,
            distribution=distribution,
            dtype=op.dtype,
            device=op.device,
        )
        q, _ = torch.linalg.qr(_apply(op, s, block).T)  # (size, sketch), orthonormal columns
        exact = float(torch.einsum("in,ni->", q.T.double(), _apply(op, q.T, block).T.double()))
        rest = matvecs - 2 * sketch
        samples = exact + hutchinson_samples(
            op, rest, generator=generator, distribution=distribution, block=block, project=q
        )
    n = samples.numel()
    stderr = float(samples.std(correction=1)) / math.sqrt(n)
    return TraceEstimate(
        estimate=float(samples.mean()),
        stderr=stderr,
        samples=tuple(float(x) for x in samples),
        method=method,
        matvecs=op.matvecs - before,
    )
