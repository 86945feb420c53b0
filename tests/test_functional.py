"""Update kernels against torch.optim's trajectories (float64, 30 steps, two param groups of
different shapes)."""

import pytest
import torch

from anyorder.functional import adam_, sgd_


def _problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    w0 = [
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn((), generator=g, dtype=torch.float64),
    ]

    def loss(w):
        return ((a @ w[0] + w[1] - b) ** 2).mean() + (w[0] ** 4).sum() * 0.01

    return w0, loss


def _grads(loss, params):
    return list(torch.autograd.grad(loss(params), params))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.05),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, weight_decay=0.1, dampening=0.1),
        dict(lr=0.05, momentum=0.9, nesterov=True),
    ],
)
def test_sgd_matches_torch(kwargs):
    w0, loss = _problem()
    ref = [p.clone().requires_grad_(True) for p in w0]
    ours = [p.clone().requires_grad_(True) for p in w0]
    opt = torch.optim.SGD(ref, **kwargs)
    bufs = [None, None]
    for _ in range(30):
        opt.zero_grad()
        loss(ref).backward()
        opt.step()
        bufs = sgd_(ours, _grads(loss, ours), bufs, **kwargs)
    for r, o in zip(ref, ours):
        assert torch.allclose(r, o, rtol=0, atol=1e-13)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_torch(decoupled):
    w0, loss = _problem()
    ref = [p.clone().requires_grad_(True) for p in w0]
    ours = [p.clone().requires_grad_(True) for p in w0]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(ref, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    for t in range(1, 31):
        opt.zero_grad()
        loss(ref).backward()
        opt.step()
        adam_(
            ours,
            _grads(loss, ours),
            m,
            v,
            step=t,
            lr=0.01,
            beta1=0.8,
            beta2=0.95,
            eps=1e-6,
            weight_decay=0.1,
            decoupled=decoupled,
        )
    for r, o in zip(ref, ours):
        assert torch.allclose(r, o, rtol=0, atol=1e-13)
