"""Stochastic trace estimation: Hutchinson's estimator (as in PyHessian, Yao et al. 2020),
Hutchinson stratified over diagonal blocks (the probing idea of Bekas, Kokiopoulou and Saad, "An
estimator for the diagonal of a matrix", 2007, applied to the layers of a network), the same with
the probes allocated to the blocks by their estimated spread (Neyman, "On the two different
aspects of the representative method", 1934) and Hutch++ (Meyer, Musco, Musco and Woodruff,
"Hutch++: Optimal Stochastic Trace Estimation", 2021).

Probe vectors are drawn from an explicit generator (``seed``) and multiplied through
``op.matmat`` in blocks of ``block`` vectors. An optional stop rule ends the sampling once the
standard error falls below ``rtol`` times the estimate.
"""

from __future__ import annotations

import math

import torch

from anyorder.hessian.lanczos import random_vectors
from anyorder.hessian.operators import CurvatureOperator
from anyorder.hessian.results import TraceEstimate

__all__ = ["trace", "hutchinson_samples", "METHODS", "MIN_SAMPLES"]

METHODS = ("neyman", "blocks", "hutch++", "hutchinson")

#: Fewest samples before the ``rtol`` stop rule may end an estimate.
MIN_SAMPLES = 4


def _apply(op: CurvatureOperator, vs: torch.Tensor, block: int) -> torch.Tensor:
    return torch.cat([op.matmat(vs[i : i + block]) for i in range(0, vs.shape[0], block)])


def hutchinson_samples(
    op: CurvatureOperator,
    n: int,
    *,
    generator: torch.Generator,
    distribution: str = "rademacher",
    block: int = 1,
    project: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    offset: float = 0.0,
    rtol: float | None = None,
) -> torch.Tensor:
    """Up to ``n`` Hutchinson samples ``offset + z^T A z`` (float64).

    ``project`` (orthonormal columns ``Q``): samples of the deflated operator
    ``(I - QQ^T) A (I - QQ^T)``. ``labels`` (a block index per coordinate, ``0 .. G-1``): each
    sample is ``sum_g z_g^T A z_g`` over the restrictions ``z_g`` of one probe to the blocks, an
    unbiased sample of the trace that costs ``G`` products and drops the off-diagonal blocks'
    share of the variance. ``rtol``: stop at the first block of products after which at least
    ``MIN_SAMPLES`` samples have standard error ``<= rtol * |mean|``.
    """
    groups = 1 if labels is None else int(labels.max()) + 1
    masks = None if labels is None else [(labels == g).to(op.dtype) for g in range(groups)]
    rounds = max(1, block // groups)  # samples per batch of products
    out: list[torch.Tensor] = []
    done = 0
    while done < n:
        c = min(rounds, n - done)
        z = random_vectors(
            c,
            op.size,
            generator=generator,
            distribution=distribution,
            dtype=op.dtype,
            device=op.device,
        )
        if project is not None:
            z = z - (z @ project) @ project.T
        probes = z if masks is None else torch.stack([z * m for m in masks], 1).flatten(0, 1)
        forms = (probes.double() * _apply(op, probes, block).double()).sum(1).cpu()
        out.append(forms.reshape(c, groups).sum(1) + offset)
        done += c
        if rtol is not None and done >= MIN_SAMPLES:
            s = torch.cat(out)
            if float(s.std(correction=1)) / math.sqrt(done) <= rtol * abs(float(s.mean())):
                break
    return torch.cat(out)


def _relabel(labels: torch.Tensor, size: int, budget: int) -> torch.Tensor:
    """Labels ``0 .. G-1`` in order of first appearance, merged round-robin (label ``% G'``) into
    ``G' = budget // 2`` groups when the budget cannot give two samples of ``G`` products."""
    if not isinstance(labels, torch.Tensor) or labels.shape != (size,):
        raise ValueError(
            f"blocks must be a tensor of shape ({size},) with a block index per coordinate, got "
            f"{getattr(labels, 'shape', labels)!r}"
        )
    uniq, inverse = torch.unique(labels, return_inverse=True)
    order = torch.full((uniq.numel(),), size, dtype=torch.long)
    order.scatter_reduce_(0, inverse.cpu(), torch.arange(size), reduce="amin")
    rank = torch.empty_like(order)
    rank[torch.argsort(order)] = torch.arange(uniq.numel())
    dense = rank[inverse.cpu()]
    groups = max(1, min(uniq.numel(), budget // 2))
    return (dense % groups).to(labels.device)


def _embed(op: CurvatureOperator, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(rows.shape[0], op.size, dtype=op.dtype, device=op.device)
    full[:, idx] = rows.to(op.dtype)
    return full


def _neyman(
    op: CurvatureOperator,
    labels: torch.Tensor,
    matvecs: int,
    seed: int,
    distribution: str,
    block: int,
    rtol: float | None,
) -> tuple[float, float, list[float]]:
    """Stratified Hutchinson with a one-product pilot per block and Neyman allocation; returns
    the estimate, its standard error and the residual samples in the order they were taken."""
    groups = int(labels.max()) + 1
    # The pilot directions come from their own generator: the allocation, and the direction
    # removed from each block, must not depend on the probes for the samples to stay unbiased.
    pilot_gen = torch.Generator().manual_seed(int(seed) * 2 + 1)
    probe_gen = torch.Generator().manual_seed(int(seed) * 2)
    idx = [(labels == g).nonzero().flatten() for g in range(groups)]
    q = []
    for g in range(groups):
        v = random_vectors(
            1, idx[g].numel(), generator=pilot_gen, distribution="gaussian", dtype=torch.float64
        )[0]
        q.append((v / torch.linalg.vector_norm(v)).to(op.dtype).to(op.device))
    pilots = torch.cat([_embed(op, idx[g], q[g][None]) for g in range(groups)])
    aq = _apply(op, pilots, block)
    exact, spread = [], []
    for g in range(groups):
        y = aq[g, idx[g]].double()
        exact.append(float(q[g].double() @ y))  # q^T A_gg q: the removed direction, exactly
        spread.append(idx[g].numel() * float(y @ y))  # E ||A_gg q||^2 = ||A_gg||_F^2 / n_g
    live = [g for g in range(groups) if idx[g].numel() > 1]  # a 1-wide block is exact
    # Var(w^T A w) ~ 2 ||A_gg||_F^2 per sample; samples in the order of the integer Neyman
    # allocation (n_g ~ sqrt(var_g)): one per block, then each to the block whose predicted
    # variance var_g / n_g drops most.
    counts = {g: 1 for g in live}
    order = list(live)
    for _ in range(matvecs - groups - len(live) if live else 0):
        g = max(live, key=lambda h: spread[h] / (counts[h] * (counts[h] + 1)))
        counts[g] += 1
        order.append(g)
    taken: dict[int, list[float]] = {g: [] for g in live}
    history: list[float] = []

    def result() -> tuple[float, float]:
        mean = sum(exact) + sum(sum(v) / len(v) for v in taken.values() if v)
        var = 0.0
        for g, v in taken.items():
            if len(v) >= 2:
                var += float(torch.tensor(v, dtype=torch.float64).var(correction=1)) / len(v)
            elif v:
                var += 2 * spread[g]  # one sample: the pilot's estimate of its variance
        return mean, math.sqrt(var)

    for start in range(0, len(order), block):
        chunk = order[start : start + block]
        rows = []
        for g in chunk:
            z = random_vectors(
                1,
                idx[g].numel(),
                generator=probe_gen,
                distribution=distribution,
                dtype=op.dtype,
                device=op.device,
            )[0]
            rows.append(_embed(op, idx[g], (z - (z @ q[g]) * q[g])[None]))
        w = torch.cat(rows)
        forms = (w.double() * op.matmat(w).double()).sum(1).cpu()
        for g, f in zip(chunk, forms.tolist()):
            taken[g].append(f)
            history.append(f)
        if rtol is not None and len(history) >= max(MIN_SAMPLES, len(live)):
            mean, err = result()
            if err <= rtol * abs(mean):
                break
    mean, err = result()
    return mean, err, history


def trace(
    op: CurvatureOperator,
    *,
    method: str = "neyman",
    matvecs: int = 99,
    seed: int = 0,
    distribution: str = "rademacher",
    block: int = 1,
    rtol: float | None = None,
    blocks: torch.Tensor | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with at most ``matvecs`` operator products.

    ``"hutchinson"`` (Hutchinson 1990; PyHessian's trace): the mean of ``z^T A z`` over random
    vectors, unbiased, variance ``2 (||A||_F^2 - sum a_ii^2) / m`` for Rademacher ``z``.

    ``"neyman"`` (default): the layer blocks of ``"blocks"`` sampled separately, with probes
    allocated to the blocks in proportion to their spread (Neyman allocation, Neyman 1934). One
    pilot product per block with a random unit direction ``q_g`` (from its own generator, so
    independent of the probes) estimates ``||A_gg||_F^2`` as ``n_g ||A_gg q_g||^2`` and gives
    ``q_g^T A_gg q_g`` exactly; each sample of block ``g`` is ``w^T A w`` with ``w`` a probe on the
    block less its ``q_g`` component, an unbiased sample of ``tr(A_gg) - q_g^T A_gg q_g`` that
    costs one product. Every block gets one sample, the rest go one by one to the block whose
    predicted variance ``2 ||A_gg||_F^2 / n_g`` drops most. In a network Hessian one layer can hold
    nearly all the within-block spread (the linear layer of the small CNN in the benchmarks: 95%),
    and equal samples per block, as ``"blocks"`` takes, spend most products where they do not
    lower the error. The estimate is ``sum_g (q_g^T A_gg q_g + mean of block g's samples)``;
    ``samples`` are the samples of all blocks in the order taken (their mean is *not* the
    estimate); ``stderr`` is ``sqrt(sum_g s_g^2 / n_g)`` over the sample variances ``s_g^2``,
    conditional on the pilot directions (whose part is exact), with the pilot's ``2 ||A_gg||_F^2``
    for a block with a single sample. Needs ``matvecs >= 2 G`` for ``G`` blocks (else the
    blocks are merged round-robin into ``matvecs // 2``, as for ``"blocks"``). Deflating each
    block's top eigenvectors by Lanczos (Chen and Hallman, "Krylov-aware stochastic trace
    estimation", 2023) was measured and did not pay at budgets of 16 products on the benchmark CNN:
    its linear layer has a cluster of 9 outliers (one per class but one) that a single-vector
    Krylov space in float32 resolves only slowly, and a block sketch costs 18 products or more.

    ``"blocks"``: Hutchinson stratified over diagonal blocks (probing, Bekas et al.
    2007). ``tr(A) = sum_g tr(A_gg)``; each sample restricts one probe to each of the ``G``
    blocks and costs ``G`` products, so its variance holds only the diagonal blocks' off-diagonal
    mass. In a network Hessian most of the Frobenius norm sits in the blocks *between* layers
    (98% for an MLP on digits), so at equal products the variance is many times lower than
    Hutchinson's. ``blocks``: a block index per coordinate (default ``op.block_labels()``: the
    layers of a model operator, one block otherwise, which is Hutchinson). When ``matvecs`` cannot
    buy two samples, blocks are merged round-robin into ``matvecs // 2``; ``matvecs`` is rounded
    down to whole samples.

    ``"hutch++"`` (Meyer et al. 2021): a third of the budget sketches the dominant range
    ``Q = qr(A S)``, a third takes its trace exactly (``tr(Q^T A Q)``) and the rest runs Hutchinson
    on the deflated ``(I - QQ^T) A (I - QQ^T)``; ``samples`` are ``tr(Q^T A Q) + z^T A' z`` and
    ``stderr`` is conditional on ``Q``. For decaying spectra the error falls as ``1/m`` instead
    of ``1/sqrt(m)``; a network Hessian's flat bulk gains little.

    ``rtol``: stop early once ``stderr <= rtol * |estimate|`` (after at least ``MIN_SAMPLES``
    samples, and one per block for neyman); a stop rule on the standard error, unlike PyHessian's change-of-mean rule. ``block``:
    vectors per batched product (one at a time is fastest for autograd Hessians on a CPU).

    Raises ``ValueError`` for an unknown method or distribution, bad ``blocks`` (or ``blocks``
    with a method other than ``"blocks"`` and ``"neyman"``), or too small a budget (2 for
    Hutchinson, blocks and neyman, 5 for Hutch++).
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    least = 5 if method == "hutch++" else 2
    if not isinstance(matvecs, int) or isinstance(matvecs, bool) or matvecs < least:
        raise ValueError(f"matvecs must be an integer >= {least} for {method}, got {matvecs!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a number > 0 or None, got {rtol!r}")
    if blocks is not None and method not in ("blocks", "neyman"):
        raise ValueError(
            f"blocks applies to method='blocks' or 'neyman' only, got method={method!r}"
        )
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    generator = torch.Generator().manual_seed(int(seed))
    before = op.matvecs
    if method == "neyman":
        labels = _relabel(op.block_labels() if blocks is None else blocks, op.size, matvecs)
        estimate, stderr, taken = _neyman(op, labels, matvecs, seed, distribution, block, rtol)
        return TraceEstimate(
            estimate=estimate,
            stderr=stderr,
            samples=tuple(taken),
            method=method,
            matvecs=op.matvecs - before,
        )
    if method == "hutch++":
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
        samples = hutchinson_samples(
            op,
            matvecs - 2 * sketch,
            generator=generator,
            distribution=distribution,
            block=block,
            project=q,
            offset=exact,
            rtol=rtol,
        )
    else:
        labels = None
        if method == "blocks":
            given = op.block_labels() if blocks is None else blocks
            labels = _relabel(given, op.size, matvecs)
            if int(labels.max()) == 0:
                labels = None
        groups = 1 if labels is None else int(labels.max()) + 1
        samples = hutchinson_samples(
            op,
            matvecs // groups,
            generator=generator,
            distribution=distribution,
            block=block,
            labels=labels,
            rtol=rtol,
        )
    n = samples.numel()
    stderr = float(samples.std(correction=1)) / math.sqrt(n) if n > 1 else 0.0
    return TraceEstimate(
        estimate=float(samples.mean()),
        stderr=stderr,
        samples=tuple(float(x) for x in samples),
        method=method,
        matvecs=op.matvecs - before,
    )
