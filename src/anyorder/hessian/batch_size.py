"""Learning rate for a new batch size from batch-Hessian extremes (Granziol et al., "Learning
Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural Network Training",
JMLR 2022).

The mini-batch Hessian is the full Hessian plus a noise matrix whose size falls with the batch
size ``B``; its top eigenvalue behaves as ``lambda(B) ~ curvature + noise / B``. With the
learning rate inversely proportional to the extreme eigenvalue, SGD's learning rate scales with
``lambda(B_ref) / lambda(B_new)`` (linearly in ``B`` while noise dominates) and Adam's with the
square root of that ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from anyorder.hessian.lanczos import eigenvalues
from anyorder.hessian.operators import Hessian
from anyorder.hessian.results import BatchSizeAdvice

__all__ = ["batch_extremes", "advise_lr", "fit_batch_curvature"]

OPTIMIZERS = ("sgd", "adam")


def batch_extremes(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    draw: Callable[[int, torch.Generator], Any] | tuple[torch.Tensor, ...],
    batch_sizes: Sequence[int],
    *,
    repeats: int = 3,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
    tol: float = 1e-3,
) -> dict[int, tuple[float, float]]:
    """Mean ``(largest, smallest)`` eigenvalue of the Hessian on ``repeats`` random batches of
    each size (Granziol et al. 2022 measure these extremes).

    ``draw(batch_size, generator) -> batch`` draws one batch; a tuple of tensors (a whole data set
    with samples along the first dimension) is sampled without replacement.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    sizes = list(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {sizes!r}")
    if isinstance(draw, tuple):
        tensors = draw
        n = tensors[0].shape[0]
        if any(b > n for b in sizes):
            raise ValueError(f"batch sizes {sizes} exceed the data set's {n} samples")

        def draw(b: int, g: torch.Generator) -> Any:
            idx = torch.randperm(n, generator=g)[:b].to(tensors[0].device)
            return tuple(t[idx] for t in tensors)

    elif not callable(draw):
        raise TypeError(f"draw must be callable or a tuple of tensors, got {type(draw).__name__}")
    generator = torch.Generator().manual_seed(int(seed))
    out: dict[int, tuple[float, float]] = {}
    for b in sizes:
        tops, bottoms = [], []
        for r in range(repeats):
            op = Hessian(model, loss_fn, draw(b, generator), forward=forward)
            tops.append(eigenvalues(op, 1, tol=tol, seed=seed + r).eigenvalues[0])
            bottoms.append(
                eigenvalues(op, 1, which="smallest", tol=tol, seed=seed + r).eigenvalues[0]
            )
        out[b] = (sum(tops) / repeats, sum(bottoms) / repeats)
    return out


def fit_batch_curvature(measured: Mapping[int, float]) -> tuple[float, float]:
    """Least-squares ``(curvature, noise)`` of ``lambda(B) = curvature + noise / B`` (Granziol
    et al. 2022's outlier behaviour of the batch Hessian) from at least two batch sizes."""
    if len(measured) < 2:
        raise ValueError(f"need measurements at two or more batch sizes, got {dict(measured)}")
    b = torch.tensor([float(k) for k in measured], dtype=torch.float64)
    lam = torch.tensor([float(v) for v in measured.values()], dtype=torch.float64)
    design = torch.stack([torch.ones_like(b), 1.0 / b], dim=1)
    sol = torch.linalg.lstsq(design, lam[:, None]).solution.flatten()
    return float(sol[0]), float(sol[1])


def advise_lr(
    measured: Mapping[int, float] | Mapping[int, tuple[float, float]],
    *,
    base_batch_size: int,
    base_lr: float,
    new_batch_size: int,
    optimizer: str = "sgd",
) -> BatchSizeAdvice:
    """The learning rate for ``new_batch_size`` given one tuned at ``base_batch_size``, from
    measured top batch-Hessian eigenvalues (``{B: lambda_max}`` or :func:`batch_extremes`'s
    output), after Granziol et al. 2022: ``lr_new = lr_ref * r`` for SGD and ``lr_ref * sqrt(r)``
    for Adam, ``r = lambda(B_ref) / lambda(B_new)`` from the fitted ``curvature + noise / B``.
    ``stability_lr`` is ``2 / lambda(B_new)``, gradient descent's stability limit."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    for label, value in (("base_batch_size", base_batch_size), ("new_batch_size", new_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not (isinstance(base_lr, (int, float)) and base_lr > 0):
        raise ValueError(f"base_lr must be a number > 0, got {base_lr!r}")
    tops = {int(k): float(v[0] if isinstance(v, (tuple, list)) else v) for k, v in measured.items()}
    curvature, noise = fit_batch_curvature(tops)

    def predict(b: int) -> float:
        return curvature + noise / b

    ref, new = predict(base_batch_size), predict(new_batch_size)
    if ref <= 0 or new <= 0:
        raise ValueError(
            f"the fitted top eigenvalue is not positive (lambda({base_batch_size})={ref:.3g}, "
            f"lambda({new_batch_size})={new:.3g}): the measurements do not show positive curvature"
        )
    ratio = ref / new
    lr = base_lr * (ratio if optimizer == "sgd" else ratio**0.5)
    return BatchSizeAdvice(
        optimizer=optimizer,
        base_batch_size=base_batch_size,
        base_lr=float(base_lr),
        new_batch_size=new_batch_size,
        lr=float(lr),
        curvature=curvature,
        noise=noise,
        predicted_top_eigenvalue=new,
        measured=tops,
        stability_lr=2.0 / new,
    )
