import pickle

import pytest
import torch
from fed_reference import Reference, contexts

from anyorder.federated import FedAvg, FedSAM, flatten, payload_bytes

SEED = 3


def run_rounds(alg, data, model, rounds, drop=()):
    x0 = flatten(list(model.parameters()))
    server = alg.init_server(x0, len(data))
    clients = [alg.init_client(x0, i) for i in range(len(data))]
    for t in range(rounds):
        down = alg.downlink(server)
        ups = []
        for ctx in contexts(data, model, SEED, t):
            if (t, ctx.client_id) in drop:
                continue
            up, clients[ctx.client_id] = alg.client_update(down, clients[ctx.client_id], ctx)
            ups.append((ctx.client_id, up))
        server = alg.aggregate(server, ups, len(data))
    return alg.global_model(server)


def reference_fedavg(data, model, x0, rounds, steps, bs, lr, rho=0.0, drop=()):
    ref = Reference(model)
    x = x0.clone()
    for t in range(rounds):
        new, total = torch.zeros_like(x), 0
        for i, d in enumerate(data):
            if (t, i) in drop:
                continue
            w = x.clone()
            for xb, yb in ref.batches(d, SEED, t, i, steps, bs):
                g = ref.grad(w, xb, yb)
                if rho > 0:  # SAM: gradient at w + rho g / ||g||
                    g = ref.grad(w + rho * g / (g.norm() + 1e-12), xb, yb)
                w = w - lr * g
            new += len(d) * w
            total += len(d)
        x = new / total
    return x


@pytest.mark.parametrize("cls,rho", [(FedAvg, 0.0), (FedSAM, 0.1)])
def test_first_rounds_equal_reference(problem, cls, rho):
    data, model = problem
    kw = {"rho": rho} if rho else {}
    alg = cls(local_steps=4, batch_size=5, lr=0.3, **kw)
    x0 = flatten(list(model.parameters()))
    got = run_rounds(alg, data, model, rounds=3)
    want = reference_fedavg(data, model, x0, 3, 4, 5, 0.3, rho)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dropout_aggregates_the_others_with_renormalised_weights(problem):
    data, model = problem
    drop = {(0, 1), (1, 0), (1, 3)}
    alg = FedAvg(local_steps=3, batch_size=4, lr=0.2)
    x0 = flatten(list(model.parameters()))
    got = run_rounds(alg, data, model, rounds=2, drop=drop)
    want = reference_fedavg(data, model, x0, 2, 3, 4, 0.2, drop=drop)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # everyone dropped: the model stays
    server = alg.aggregate(alg.init_server(x0, 4), [], 4)
    assert torch.equal(server["model"], x0)


def test_payload_bytes_and_pickle(problem):
    data, model = problem
    alg = FedSAM(local_steps=1, batch_size=4)
    x0 = flatten(list(model.parameters()))
    down = alg.downlink(alg.init_server(x0, 4))
    up, _ = alg.client_update(down, {}, contexts(data, model, 0, 0)[0])
    assert payload_bytes(down) == x0.numel() * 8
    assert payload_bytes(up) == x0.numel() * 8 + 8  # delta + int64 example count
    clone = pickle.loads(pickle.dumps(alg))
    assert clone == alg


@pytest.mark.parametrize(
    "kwargs", [{"lr": -1.0}, {"local_steps": 0}, {"batch_size": 2.5}, {"weighting": "mean"}]
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FedAvg(**kwargs)
