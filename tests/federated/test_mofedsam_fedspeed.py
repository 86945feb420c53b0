"""MoFedSAM and FedSpeed's first rounds in float64 against plain references of the papers'
updates (as FL-Simulator's reference code orders them), with partial participation."""

import pytest
import torch
from fed_reference import Reference, contexts

from anyorder.federated import flatten
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.mofedsam import MoFedSAM

SEED = 5
ROUNDS = 3
PARTICIPANTS = [[0, 1, 2, 3], [1, 3], [0, 2, 3]]


def run(alg, data, model):
    x0 = flatten(list(model.parameters()))
    server = alg.init_server(x0, len(data))
    clients = [alg.init_client(x0, i) for i in range(len(data))]
    for t in range(ROUNDS):
        down = alg.downlink(server)
        ups = []
        for ctx in contexts(data, model, SEED, t):
            if ctx.client_id in PARTICIPANTS[t]:
                up, clients[ctx.client_id] = alg.client_update(down, clients[ctx.client_id], ctx)
                ups.append((ctx.client_id, up))
        server = alg.aggregate(server, ups, len(data))
    return alg.global_model(server), clients


def sam_grad(ref, w, xb, yb, rho):
    g = ref.grad(w, xb, yb)
    return ref.grad(w + rho * g / (g.norm() + 1e-12), xb, yb)


def test_mofedsam_equals_reference(problem):
    data, model = problem
    x0 = flatten(list(model.parameters()))
    K, bs, lr, rho, alpha = 4, 5, 0.2, 0.1, 0.3
    got, _ = run(
        MoFedSAM(local_steps=K, batch_size=bs, lr=lr, rho=rho, alpha=alpha, weighting="uniform"),
        data,
        model,
    )
    ref = Reference(model)
    x, avg_update = x0.clone(), torch.zeros_like(x0)
    for t in range(ROUNDS):
        momentum = -avg_update / (K * lr)
        updates = []
        for i in PARTICIPANTS[t]:
            w = x.clone()
            for xb, yb in ref.batches(data[i], SEED, t, i, K, bs):
                w = w - lr * (alpha * sam_grad(ref, w, xb, yb, rho) + (1 - alpha) * momentum)
            updates.append(w - x)
        avg_update = torch.stack(updates).mean(0)
        x = x + avg_update
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_fedspeed_equals_reference(problem, rho):
    data, model = problem
    x0 = flatten(list(model.parameters()))
    K, bs, lr, lam = 4, 5, 0.2, 2.0
    got, clients = run(
        FedSpeed(local_steps=K, batch_size=bs, lr=lr, rho=rho, lam=lam), data, model
    )
    ref = Reference(model)
    m = len(data)
    x = x0.clone()
    h = [torch.zeros_like(x0) for _ in range(m)]  # server-side copies, as FL-Simulator keeps them
    for t in range(ROUNDS):
        finals = []
        for i in PARTICIPANTS[t]:
            w = x.clone()
            for xb, yb in ref.batches(data[i], SEED, t, i, K, bs):
                g = sam_grad(ref, w, xb, yb, rho) if rho else ref.grad(w, xb, yb)
                w = w - lr * (g + (w - x) / lam + h[i] / lam)
            h[i] = h[i] + (w - x)
            finals.append(w)
        x = torch.stack(finals).mean(0) + torch.stack(h).mean(0)
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-12)
    for i in range(m):
        torch.testing.assert_close(clients[i]["h"], h[i], rtol=1e-11, atol=1e-12)


def test_fedspeed_local_fixed_point():
    """With h_i = -lam * grad f_i(x) and rho = 0, a full-batch client does not move: the
    correction cancels the client's drift exactly (the property the correction is built for)."""
    from fed_reference import make_problem

    data, model = make_problem(num_clients=1)
    x = flatten(list(model.parameters()))
    ref = Reference(model)
    d = data[0]
    lam = 3.0
    h = -lam * ref.grad(x, d.inputs, d.targets)
    alg = FedSpeed(local_steps=3, batch_size=len(d), lr=0.5, rho=0.0, lam=lam)
    up, state = alg.client_update({"model": x}, {"h": h}, contexts(data, model, 0, 0)[0])
    assert float(up["delta"].abs().max()) < 1e-12
