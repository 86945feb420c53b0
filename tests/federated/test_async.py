import math

import pytest
import torch
from fed_reference import Reference, make_problem

from anyorder.federated import FedAvg, flatten
from anyorder.federated.asynchronous import AsyncSimulator, FedBuff, FedFix, skewed_times
from anyorder.federated.simulator import Simulator

LOSS = torch.nn.functional.cross_entropy


def reference_schedule(tau, n_aggreg, fedfix=None, c=None):
    """The paper's schedule written out: (arrived ids, version each started from) per step."""
    m = len(tau)
    ret = list(tau)
    version = [0] * m
    out = []
    for n in range(n_aggreg):
        if fedfix is not None:
            now = (n + 1) * fedfix
            ids = [i for i in range(m) if ret[i] <= now + 1e-12]
        else:
            ids = sorted(sorted(range(m), key=lambda i: (ret[i], i))[:c])
            now = max(ret[i] for i in ids)
        out.append((ids, [version[i] for i in ids]))
        for i in ids:
            ret[i] = now + tau[i]
            version[i] = n + 1
    return out


@pytest.mark.parametrize("rule", [FedFix(period=0.35), FedBuff(buffer_size=2)])
def test_async_equals_reference(rule):
    data, model = make_problem(num_clients=5)
    tau = skewed_times(5, 60.0)
    x0 = flatten(list(model.parameters()))
    K, bs, lr = 2, 4, 0.3
    alg = FedAvg(local_steps=K, batch_size=bs, lr=lr)
    s = AsyncSimulator(alg, rule, model, LOSS, data, tau, seed=4)
    s.run(8)
    fix = rule.period if isinstance(rule, FedFix) else None
    sched = reference_schedule(tau.tolist(), 8, fedfix=fix, c=getattr(rule, "buffer_size", None))
    ref = Reference(model)
    sizes = torch.tensor([len(d) for d in data], dtype=torch.float64)
    p = sizes / sizes.sum()
    models = [x0.clone()]
    updates = [0] * 5
    for n, (ids, versions) in enumerate(sched):
        assert s.history[n].participants == ids
        assert s.staleness[n] == {str(i): n - v for i, v in zip(ids, versions)}
        x = models[-1].clone()
        for i, v in zip(ids, versions):
            w = models[v].clone()
            for xb, yb in ref.batches(data[i], 4, updates[i], i, K, bs):
                w = w - lr * ref.grad(w, xb, yb)
            updates[i] += 1
            if fix is not None:
                d = math.ceil(float(tau[i]) / fix - 1e-9) * p[i]
            else:
                d = 1 / rule.buffer_size
            x = x + d * (w - models[v])
        models.append(x)
    torch.testing.assert_close(s.global_model(), models[-1], rtol=1e-12, atol=1e-12)
    assert any(r.extra["max_staleness"] > 0 for r in s.history)


def test_fedfix_with_a_period_above_every_time_is_fedavg():
    data, model = make_problem(num_clients=4)
    alg = FedAvg(local_steps=3, batch_size=4, lr=0.2)
    a = AsyncSimulator(alg, FedFix(period=1.0), model, LOSS, data, skewed_times(4, 50), seed=1)
    b = Simulator(alg, model, LOSS, data, seed=1)
    a.run(3)
    b.run(3)
    torch.testing.assert_close(a.global_model(), b.global_model(), rtol=1e-14, atol=1e-15)
    assert all(r.extra["max_staleness"] == 0 for r in a.history)


def test_async_resume_and_bad_input(tmp_path):
    data, model = make_problem(num_clients=4)
    alg = FedAvg(local_steps=2, batch_size=4)
    mk = lambda: AsyncSimulator(alg, FedBuff(2), model, LOSS, data, skewed_times(4, 70))  # noqa: E731
    full = mk()
    full.run(6)
    part = mk()
    part.run(3, checkpoint=tmp_path / "a.pt")
    res = mk()
    res.load(tmp_path / "a.pt")
    res.run(6)
    assert torch.equal(full.global_model(), res.global_model())
    assert full.staleness == res.staleness
    with pytest.raises(ValueError, match="times"):
        AsyncSimulator(alg, FedBuff(2), model, LOSS, data, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="buffer_size"):
        AsyncSimulator(alg, FedBuff(5), model, LOSS, data, skewed_times(4, 10))
    from anyorder.federated import FedSpeed, MoFedSAM

    for stateful in (FedSpeed(), MoFedSAM()):
        with pytest.raises(TypeError, match="stateless"):
            AsyncSimulator(stateful, FedBuff(2), model, LOSS, data, skewed_times(4, 10))
    with pytest.raises(ValueError, match="period"):
        FedFix(period=0)
