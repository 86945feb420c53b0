"""Communication graphs and their mixing matrices for gossip (decentralized) algorithms.

A topology is a symmetric 0/1 adjacency matrix without self-loops; :func:`metropolis` turns it
into the Metropolis–Hastings mixing matrix (Xiao & Boyd, "Fast linear iterations for distributed
averaging", 2004): w_ij = 1 / (1 + max(d_i, d_j)) on edges, w_ii = 1 − Σ_{j≠i} w_ij; symmetric
and doubly stochastic. :func:`spectral_gap` is 1 − max(|λ₂|, |λ_m|): the consensus error
contracts by (1 − gap) per gossip step, so Q steps contract it by (1 − gap)^Q.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "ring",
    "torus",
    "erdos_renyi",
    "complete",
    "metropolis",
    "spectral_gap",
    "check_mixing",
    "mixing_matrix",
    "neighbours",
    "TOPOLOGIES",
]

TOPOLOGIES = ("ring", "torus", "erdos-renyi", "complete")


def _check_m(m: Any, least: int = 1) -> int:
    if not isinstance(m, int) or isinstance(m, bool) or m < least:
        raise ValueError(f"the number of nodes must be an integer >= {least}, got {m!r}")
    return m


def ring(m: int) -> torch.Tensor:
    """Node i linked to i ± 1 (mod m)."""
    _check_m(m)
    a = torch.zeros(m, m)
    for i in range(m):
        for j in ((i + 1) % m, (i - 1) % m):
            if j != i:
                a[i, j] = 1.0
    return a


def torus(m: int, rows: int | None = None) -> torch.Tensor:
    """A 2-D torus of ``rows`` × m/rows nodes (``rows`` defaults to the largest divisor of m at
    most √m); node (r, c) linked to its four neighbours with wrap-around."""
    _check_m(m)
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    if not isinstance(rows, int) or rows < 1 or m % rows:
        raise ValueError(f"rows must be a positive divisor of m={m}, got {rows!r}")
    cols = m // rows
    a = torch.zeros(m, m)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                j = ((r + dr) % rows) * cols + (c + dc) % cols
                if j != i:
                    a[i, j] = 1.0
    return a


def complete(m: int) -> torch.Tensor:
    """Every pair linked."""
    _check_m(m)
    return torch.ones(m, m) - torch.eye(m)


def _connected(a: torch.Tensor) -> bool:
    m = len(a)
    seen = {0}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in torch.nonzero(a[i]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    return len(seen) == m


def erdos_renyi(
    m: int, p: float, generator: torch.Generator, *, max_tries: int = 1000
) -> torch.Tensor:
    """G(m, p): each pair linked with probability p, redrawn until connected."""
    _check_m(m)
    if not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"p must be a probability in (0, 1], got {p!r}")
    for _ in range(max_tries):
        upper = torch.triu((torch.rand(m, m, generator=generator) < p).float(), diagonal=1)
        a = upper + upper.T
        if _connected(a):
            return a
    raise ValueError(f"no connected G({m}, {p}) in {max_tries} draws; raise p")


def metropolis(adjacency: torch.Tensor) -> torch.Tensor:
    """The Metropolis–Hastings weights of a symmetric adjacency matrix (float64)."""
    a = torch.as_tensor(adjacency, dtype=torch.float64)
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square matrix, got shape {tuple(a.shape)}")
    if not torch.equal(a, a.T) or bool(((a != 0) & (a != 1)).any()) or bool(a.diagonal().any()):
        raise ValueError("adjacency must be symmetric 0/1 with a zero diagonal")
    deg = a.sum(1)
    w = a / (1.0 + torch.maximum(deg[:, None], deg[None, :]))
    w = w + torch.diag(1.0 - w.sum(1))
    return w


def spectral_gap(mixing: torch.Tensor) -> float:
    """1 − the second largest eigenvalue modulus of a symmetric mixing matrix (0: no
    consensus; 1: one step averages exactly)."""
    w = check_mixing(mixing, len(mixing))
    if not torch.allclose(w, w.T, atol=1e-12):
        raise ValueError("spectral_gap needs a symmetric mixing matrix")
    ev = torch.linalg.eigvalsh(w).abs().sort(descending=True).values
    return float(1.0 - ev[1]) if len(ev) > 1 else 1.0


def check_mixing(mixing: Any, m: int, tol: float = 1e-9) -> torch.Tensor:
    """``mixing`` as a float64 (m, m) tensor if it is non-negative and doubly stochastic."""
    w = torch.as_tensor(mixing, dtype=torch.float64)
    if w.shape != (m, m):
        raise ValueError(f"mixing matrix must be {m} x {m}, got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("mixing matrix must be finite and non-negative")
    ones = torch.ones(m, dtype=torch.float64)
    if not (torch.allclose(w @ ones, ones, atol=tol) and torch.allclose(w.T @ ones, ones, atol=tol)):
        raise ValueError("mixing matrix must be doubly stochastic (rows and columns sum to 1)")
    return w


def mixing_matrix(
    topology: str, m: int, *, p: float = 0.3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Metropolis weights of a named topology (``ring``, ``torus``, ``erdos-renyi``,
    ``complete``)."""
    if topology == "ring":
        a = ring(m)
    elif topology == "torus":
        a = torus(m)
    elif topology == "erdos-renyi":
        a = erdos_renyi(m, p, generator if generator is not None else torch.Generator())
    elif topology == "complete":
        a = complete(m)
    else:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    return metropolis(a)


def neighbours(mixing: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Row i of ``mixing`` as [(j, w_ij)] for every j with w_ij != 0 (i itself included), in
    increasing j: what :meth:`GossipAlgorithm.mix` receives at node i."""
    w = torch.as_tensor(mixing, dtype=torch.float64)
    return [
        [(j, float(w[i, j])) for j in range(w.shape[1]) if w[i, j] != 0] for i in range(w.shape[0])
    ]
