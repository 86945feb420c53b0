"""Shared small models and their exact (dense) curvature for the Hessian tests."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian


def make_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.6 if p.dim() > 1 else 0.1))
    return model.to(dtype)


def make_data(n: int = 60, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def dense_hessian(model: nn.Module, loss_fn, batch, params=None) -> torch.Tensor:
    """The exact Hessian of loss_fn(model(x), y) by torch.func.hessian over the flat parameters."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if params is None or any(p is q for q in params)]
    base = [named[n].detach() for n in names]
    sizes = [p.numel() for p in base]

    def f(flat):
        parts = torch.split(flat, sizes)
        swapped = {n: q.view_as(p) for n, q, p in zip(names, parts, base)}
        return loss_fn(functional_call(model, swapped, (batch[0],)), batch[1])

    return hessian(f)(torch.cat([p.reshape(-1) for p in base]))


@pytest.fixture(scope="module")
def mlp_problem():
    model = make_mlp()
    batch = make_data()
    exact = dense_hessian(model, F.cross_entropy, batch)
    evals = torch.linalg.eigvalsh(exact)
    return model, batch, exact, evals
