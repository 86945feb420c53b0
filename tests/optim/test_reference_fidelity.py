"""Fidelity to the papers' reference codes where they differ from a first reading (issue 13):
AdaHessian's weight decay, ASAM's scaling of biases, M-FAC's momentum, ZO weight decay groups.
Each reference below is written fresh from the rule as the authors' code states it."""

import math

import torch
import torch.nn.functional as F

from anyorder.optim import MFAC, SAM, ZOSGD, AdaHessian, asam_groups, decay_groups


def test_adahessian_weight_decay_is_scaled_by_lr_not_by_the_bias_corrected_step():
    # The authors' optim_adahessian.py: p <- p - lr * (m / (1 - b1^t) / denom + wd * p). On a
    # loss that does not depend on p (g = 0, D = 0) the first step is p <- (1 - lr wd) p; with the
    # bias-corrected step size it would be (1 - lr wd / (1 - b1)) p, ten times the decay.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    q = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    lr, wd = 0.2, 0.1
    opt = AdaHessian([p, q], lr=lr, weight_decay=wd, betas=(0.9, 0.999))

    def closure(backward=True):
        loss = (q**2).sum() * 0 + 1.0
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    start = p.detach().clone()
    for t in range(3):
        opt.step(closure)
        assert torch.allclose(p.detach(), start * (1 - lr * wd) ** (t + 1), rtol=0, atol=1e-15)


def _net():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()


def _data(t):
    g = torch.Generator().manual_seed(50 + t)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


def _grads(model, t, params=None):
    x, y = _data(t)
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, list(params.values()))


def test_asam_groups_reproduce_the_authors_code_biases_unscaled():
    # SamsungLabs/ASAM asam.py: for parameters named '*weight*' the gradient is multiplied by
    # T = |w| + eta before the norm and again for the ascent; all others (biases) get T = 1.
    rho, eta, lr = 0.5, 0.01, 0.1
    model = _net()
    opt = SAM(asam_groups(model), "SGD", rho=rho, adaptive=True, eta=eta, lr=lr)
    names = [n for n, _ in model.named_parameters()]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(5):
        x, y = _data(t)

        def closure(backward=True, x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        opt.step(closure)
        leaves = {n: v.clone().requires_grad_() for n, v in ref.items()}
        g = dict(zip(names, _grads(model, t, leaves)))
        tw = {n: (ref[n].abs() + eta) if "weight" in n else torch.ones_like(ref[n]) for n in names}
        norm = math.sqrt(sum(float(((tw[n] * g[n]) ** 2).sum()) for n in names))
        e = {n: rho * tw[n] * tw[n] * g[n] / (norm + 1e-12) for n in names}
        moved = {n: (ref[n] + e[n]).requires_grad_() for n in names}
        g_adv = dict(zip(names, _grads(model, t, moved)))
        ref = {n: ref[n] - lr * g_adv[n] for n in names}
        for n, p in model.named_parameters():
            assert torch.allclose(p.detach(), ref[n], rtol=0, atol=1e-12), (t, n)
    # the biases really are in a group of their own, without the scaling
    assert [g["adaptive"] for g in opt.param_groups] == [True, False]
    assert all(p.dim() == 1 for p in opt.param_groups[1]["params"])


def test_mfac_momentum_maps_to_the_references_averaged_form_with_lr_times_one_minus_mu():
    # Reference: v <- mu v + (1 - mu) d, p <- p - lr_ref v, d = F^-1 g over the window.
    lr_ref, mu, m, lam = 0.05, 0.9, 3, 0.1
    model = _net()
    opt = MFAC(model.parameters(), lr=lr_ref * (1 - mu), m=m, damping=lam, momentum=mu)
    names = [n for n, _ in model.named_parameters()]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    window, v = [], None
    for t in range(6):
        x, y = _data(t)

        def closure(backward=True, x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        opt.step(closure)
        leaves = {n: r.clone().requires_grad_() for n, r in ref.items()}
        g = torch.cat([gr.reshape(-1) for gr in _grads(model, t, leaves)])
        window = (window + [g])[-m:]
        fisher = lam * torch.eye(g.numel(), dtype=torch.float64)
        for w in window:
            fisher += torch.outer(w, w) / m
        d = torch.linalg.solve(fisher, g)
        v = (1 - mu) * d if v is None else mu * v + (1 - mu) * d
        flat = torch.cat([ref[n].reshape(-1) for n in names]) - lr_ref * v
        ref = dict(
            zip(
                names,
                (
                    c.view_as(ref[n])
                    for c, n in zip(flat.split([ref[n].numel() for n in names]), names)
                ),
            )
        )
        for n, p in model.named_parameters():
            assert torch.allclose(p.detach(), ref[n], rtol=0, atol=1e-10), (t, n)


def test_decay_groups_exempt_biases_and_norms_from_zo_weight_decay():
    # On a constant loss every projected gradient is 0, so a ZO-SGD step is pure weight decay:
    # p <- (1 - lr wd) p for matrices, and nothing for biases and LayerNorm weights.
    model = _net()
    lr, wd = 0.1, 0.5
    groups = decay_groups(model, wd)
    opt = ZOSGD(groups, lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda backward=False: torch.tensor(1.0))
    for n, p in model.named_parameters():
        factor = (1 - lr * wd) if p.dim() >= 2 else 1.0
        assert torch.allclose(p.detach(), factor * before[n], rtol=0, atol=1e-12), n
    assert [g["weight_decay"] for g in groups] == [wd, 0.0]
