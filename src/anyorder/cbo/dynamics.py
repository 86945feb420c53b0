"""The consensus-based optimization (CBO) dynamics, written once for both :func:`anyorder.cbo.minimize`
and :class:`anyorder.optim.CBO`.

Particles ``x`` of shape ``(n, d)`` with energies ``f(x_i)`` drift toward the consensus point

    x̄ = Σ_i x_i exp(-α f(x_i)) / Σ_i exp(-α f(x_i))

(Pinnau, Totzeck, Tse & Martin 2017), computed with a softmax, i.e. log-sum-exp, so that energies of
any size neither overflow nor underflow. One Euler–Maruyama step of the dynamics reads

    x_i ← x_i − λ dt (x_i − x̄) + σ √dt · noise_i

with isotropic noise ``‖x_i − x̄‖₂ ξ_i`` (Pinnau et al. 2017) or anisotropic noise
``(x_i − x̄) ⊙ ξ_i`` (Carrillo, Jin, Li & Zhu 2021, which makes the method work in high dimension),
``ξ_i ~ N(0, I_d)``. With random batches (Carrillo et al. 2021, after the random batch method of
Jin, Li & Liu) the particles are split at random into groups of ``batch_size`` at every step and
each group drifts toward its own consensus. "Gradient is All You Need?" (Riedl, Klock, Geldhauser &
Fornasier 2023) explains why this finds global minimisers of nonconvex, nonsmooth functions.

Non-finite energies (NaN, ±inf) get weight zero: such a particle never pulls the consensus. A
group of random-batch particles none of whose energies is finite has no consensus: its particles
stay where they are for that step (no drift, and the noise, proportional to the drift, is zero).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "NOISE_TYPES",
    "sanitize_energies",
    "softmin_weights",
    "consensus",
    "batch_consensus",
    "random_batch_step",
    "cbo_update_",
    "particle_variance",
]

NOISE_TYPES = ("isotropic", "anisotropic")


def sanitize_energies(energies: torch.Tensor) -> torch.Tensor:
    """``energies`` with every non-finite value (NaN, +inf, -inf) replaced by +inf (weight 0).

    +inf stays +inf (``nan_to_num``'s default would map it to the largest finite float, which
    counts as a finite energy: a swarm whose values are all +inf would then form a NaN consensus
    instead of being reported as having no finite value)."""
    return torch.nan_to_num(energies, nan=math.inf, posinf=math.inf, neginf=math.inf)


def softmin_weights(energies: torch.Tensor, alpha: float) -> torch.Tensor:
    """The consensus weights ``softmax(-alpha f)`` along the last dimension (stable: the softmax
    subtracts the largest logit); ``alpha=inf`` puts all the weight on the lowest energy."""
    if math.isinf(alpha):
        best = torch.argmin(energies, dim=-1, keepdim=True)
        return torch.zeros_like(energies).scatter_(-1, best, 1.0)
    return torch.softmax(energies * -alpha, dim=-1)


def consensus(
    x: torch.Tensor, energies: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consensus point of particles ``x`` ``(n, d)`` with ``energies`` ``(n,)``.

    Returns ``(x̄, weights)``: the weights are ``softmax(-α f)``, computed stably (the largest
    logit is subtracted before exponentiating), so ``α f`` of 1e4 or more is fine. ``alpha=inf``
    picks the particle with the lowest energy. Energies must be finite where they should count
    (see :func:`sanitize_energies`); if none is finite the result is NaN.
    """
    weights = softmin_weights(energies, alpha)
    return weights.to(x.dtype) @ x, weights


def batch_consensus(
    x: torch.Tensor,
    energies: torch.Tensor,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-particle consensus ``(n, d)`` under random batches of interacting particles.

    A random permutation (from ``generator``) splits the ``n`` particles into ``ceil(n / b)``
    groups of ``b = batch_size`` (the last one smaller when ``b`` does not divide ``n``); row ``i``
    of the result is the consensus of particle ``i``'s group.
    """
    n, d = x.shape
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    groups = -(-n // batch_size)
    pad = groups * batch_size - n
    index = (torch.cat([perm, perm[:pad]]) if pad else perm).view(groups, batch_size)
    group_energies = energies[index]
    if pad:  # the padding repeats real particles: give the copies no weight
        group_energies.view(-1)[n:] = math.inf
    weights = softmin_weights(group_energies, alpha)
    members = x[index]
    centres = torch.bmm(weights.to(x.dtype).unsqueeze(1), members)  # (groups, 1, d)
    # a group without a finite energy has no consensus: its particles are their own target
    targets = torch.where(_has_finite(group_energies), centres, members)
    out = torch.empty_like(x)
    if pad:
        out[perm] = targets.reshape(-1, d)[:n]
    else:
        out[index] = targets
    return out


def _has_finite(group_energies: torch.Tensor) -> torch.Tensor:
    """``(groups, 1, 1)``: whether each group has at least one finite energy."""
    return torch.isfinite(group_energies).any(-1)[:, None, None]


def cbo_update_(
    x: torch.Tensor,
    target: torch.Tensor,
    drift_coef: float | torch.Tensor,
    noise_coef: float | torch.Tensor,
    noise: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One Euler–Maruyama CBO step, in place: ``x ← x − c_drift (x − target) + c_noise · noise``.

    ``target`` is the consensus, ``(d,)`` or per particle ``(n, d)`` (any shape that broadcasts
    against ``x``, whose last dimension is the coordinates); ``drift_coef`` is ``λ dt``
    and ``noise_coef`` is ``σ √dt``, floats or ``(d,)`` tensors (one value per coordinate, e.g. per
    parameter group). ``noise`` is ``"isotropic"`` (``‖x_i − x̄‖₂ ξ_i``) or ``"anisotropic"``
    (``(x_i − x̄) ⊙ ξ_i``); ``ξ`` is drawn from ``generator`` as one ``(n, d)`` standard normal
    tensor before the update (in float32 for float64 particles: 4x cheaper on a CPU, and noise
    needs no more precision). Returns ``x``.
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_TYPES)}, got {noise!r}")
    drift = x - target
    xi = torch.randn(
        x.shape, generator=generator, dtype=_draw_dtype(x.dtype), device=generator.device
    )
    xi = xi.to(device=x.device, dtype=x.dtype)
    if noise == "isotropic":  # x - drift_coef * drift + noise_coef * |drift_i| xi
        xi.mul_(torch.linalg.vector_norm(drift, dim=-1, keepdim=True)).mul_(noise_coef)
        x.add_(xi).sub_(drift.mul_(drift_coef))
    else:  # x + drift * (noise_coef * xi - drift_coef)
        x.addcmul_(drift, xi.mul_(noise_coef).sub_(drift_coef))
    return x


def random_batch_step(
    x: torch.Tensor,
    energies: torch.Tensor,
    alpha: float,
    batch_size: int,
    drift_coef: float | torch.Tensor,
    noise_coef: float | torch.Tensor,
    noise: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One CBO step with random batches when ``batch_size`` divides ``n``; returns the new swarm.

    The same maths as :func:`batch_consensus` followed by :func:`cbo_update_`, cheaper: particles
    are exchangeable, so the swarm is *reordered* by the random permutation and the groups are
    contiguous blocks ``(n / b, b, d)`` whose consensus broadcasts without a scatter. The rows of
    the result are therefore in permuted order (row ``j`` is particle ``perm[j]``).
    """
    n, d = x.shape
    if n % batch_size:
        raise ValueError(f"batch_size={batch_size} must divide the number of particles {n}")
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    groups = n // batch_size
    x = x.index_select(0, perm).view(groups, batch_size, d)
    group_energies = energies.index_select(0, perm).view(groups, batch_size)
    weights = softmin_weights(group_energies, alpha)
    centres = torch.bmm(weights.to(x.dtype).unsqueeze(1), x)  # (groups, 1, d)
    targets = torch.where(_has_finite(group_energies), centres, x)  # no consensus: no move
    return cbo_update_(x, targets, drift_coef, noise_coef, noise, generator).view(n, d)


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 normals cost ~4x float32 ones on a CPU; noise needs no 53-bit mantissa
    return torch.float32 if dtype == torch.float64 else dtype


def particle_variance(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σ_i ‖x_i − centre‖²``: the spread of the swarm around its consensus (the Lyapunov
    functional of Carrillo, Choi, Totzeck & Tse 2018), a 0-dim tensor."""
    return (x - centre).square().sum(-1).mean()
