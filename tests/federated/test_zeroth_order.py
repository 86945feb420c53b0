"""Federated zeroth-order rounds: clients send (seed, projected gradient) pairs, everyone replays."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from anyorder.core.rng import direction
from anyorder.distributed.payload import ScalarCodec
from anyorder.federated.zeroth_order import (
    FedZOConfig,
    ZOClientMessage,
    observe_round,
    query_seed,
    replay_zo_client,
    run_zo_client,
)


def _problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=gen, dtype=dtype)
    y = torch.randn(60, generator=gen, dtype=dtype)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    return x, y, model


def _closures(model, x, y, starts, width=10):
    def make(i):
        def closure(backward: bool = False):
            return ((model(x[i : i + width]).squeeze(-1) - y[i : i + width]) ** 2).mean()

        return closure

    return [make(i) for i in starts]


def _reference_client(weights, x, y, cfg, client_seed, start_step, starts, width=10):
    """MeZO's two-point ZO-SGD written out: g = (L(w+mu z) - L(w-mu z)) / 2mu with z the
    Rademacher direction of (seed, step, query seed, tensor index), sent as float32, and
    w <- w - lr * mean_j g_j z_j."""
    w = [t.clone() for t in weights]

    def loss(ws, i):
        h = torch.tanh(x[i : i + width] @ ws[0].T + ws[1])
        return float((((h @ ws[2].T + ws[3]).squeeze(-1) - y[i : i + width]) ** 2).mean())

    for k, i in enumerate(starts):
        step = start_step + k
        update = [torch.zeros_like(t) for t in w]
        for j in range(cfg.queries):
            q = query_seed(client_seed, step, j)
            z = [direction(t.shape, cfg.seed, step, q, n, distribution="rademacher", dtype=t.dtype)
                 for n, t in enumerate(w)]  # fmt: skip
            plus = loss([t + cfg.mu * d for t, d in zip(w, z)], i)
            minus = loss([t - cfg.mu * d for t, d in zip(w, z)], i)
            g = float(torch.tensor((plus - minus) / (2 * cfg.mu), dtype=torch.float32))
            for u, d in zip(update, z):
                u += g / cfg.queries * d
        w = [t - cfg.lr * u for t, u in zip(w, update)]
    return w


CFG = FedZOConfig(lr=0.05, mu=1e-4, queries=2, local_steps=3, seed=7)


def test_client_steps_equal_the_papers_rule_written_out():
    x, y, model = _problem()
    weights = [p.detach().clone() for p in model.parameters()]
    starts = [0, 10, 20]
    msg = run_zo_client(
        model, _closures(model, x, y, starts), CFG, ScalarCodec(), client=0, client_seed=3,
        start_step=6,
    )  # fmt: skip
    ref = _reference_client(weights, x, y, CFG, 3, 6, starts)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
    assert all(len(set(q)) == CFG.queries for q in msg.queries)  # fresh direction per query
    assert msg.nbytes == CFG.local_steps * CFG.queries * 8  # 4-byte seed + float32 per query


@pytest.mark.parametrize("bits", [None, 8])
def test_round_of_seeds_and_scalars_equals_fedavg_of_the_clients_weights_bit_for_bit(bits):
    x, y, model = _problem(torch.float32)
    cfg = FedZOConfig(lr=0.05, mu=1e-3, queries=2, local_steps=3, seed=7, quantize_bits=bits)
    codec = ScalarCodec(bits=bits)
    sizes = [10.0, 25.0, 25.0]
    for rnd in range(2):  # the second round quantises with the scale the first one set
        clients, messages = [], []
        for c in range(3):
            local = copy.deepcopy(model)
            starts = [(7 * c + 3 * k + rnd) % 50 for k in range(cfg.local_steps)]
            msg = run_zo_client(local, _closures(local, x, y, starts), cfg, codec, client=c,
                                client_seed=100 + c, start_step=rnd * cfg.local_steps)  # fmt: skip
            clients.append(local)
            messages.append(msg)
        # what crossed the wire: bytes only; the receiver decodes and replays
        replayed = []
        for msg in messages:
            received = ZOClientMessage.received(
                codec, msg.payload.clone(), cfg, client=msg.client, start_step=msg.start_step
            )
            scratch = copy.deepcopy(model)
            replay_zo_client(scratch, received, cfg)
            replayed.append(scratch)
        for a, b in zip(clients, replayed):
            for pa, pb in zip(a.parameters(), b.parameters()):
                assert torch.equal(pa, pb)
        total = sum(sizes)
        with torch.no_grad():
            for ps in zip(model.parameters(), *[m.parameters() for m in replayed]):
                ps[0].copy_(sum(s / total * p for s, p in zip(sizes, ps[1:])))
        expected = cfg.local_steps * cfg.queries * (5 if bits and rnd else 8)
        assert all(m.nbytes == expected for m in messages)
        observe_round(codec, messages)


def test_a_dropped_query_is_skipped_by_client_and_replay_alike():
    x, y, model = _problem()
    calls = {"n": 0}
    inner = _closures(model, x, y, [0, 10, 20])

    def poisoned(c):
        def closure(backward: bool = False):
            calls["n"] += 1
            return torch.tensor(float("nan")) if calls["n"] in (1, 5, 6, 7, 8) else c()

        return closure

    start = copy.deepcopy(model)
    msg = run_zo_client(model, [poisoned(c) for c in inner], CFG, ScalarCodec(), client=0,
                        client_seed=1, start_step=0)  # fmt: skip
    assert torch.isnan(torch.tensor(msg.values[0][0])) and torch.isfinite(torch.tensor(msg.values[0][1]))
    assert all(torch.isnan(torch.tensor(v)) for v in msg.values[1])  # a whole step dropped
    replay_zo_client(start, ZOClientMessage.received(ScalarCodec(), msg.payload, CFG, client=0,
                                                     start_step=0), CFG)  # fmt: skip
    for a, b in zip(model.parameters(), start.parameters()):
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_an_interrupted_query_leaves_the_weights_of_the_last_finished_step():
    x, y, model = _problem()
    one = FedZOConfig(lr=0.05, mu=1e-4, local_steps=1, seed=7)
    ref = copy.deepcopy(model)
    msg = run_zo_client(ref, _closures(ref, x, y, [0]), one, ScalarCodec(), client=0,
                        client_seed=1, start_step=0)  # fmt: skip
    (first,) = _closures(model, x, y, [0])

    def interrupted(backward: bool = False):
        raise KeyboardInterrupt

    two = FedZOConfig(lr=0.05, mu=1e-4, local_steps=2, seed=7)
    with pytest.raises(KeyboardInterrupt):
        run_zo_client(model, [first, interrupted], two, ScalarCodec(), client=0, client_seed=1,
                      start_step=0)  # fmt: skip
    # the first step was applied; the interrupted probe's perturbation was undone exactly
    assert msg.nbytes == 8
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, r)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="local_steps"):
        FedZOConfig(local_steps=0)
    with pytest.raises(ValueError, match="quantize_bits"):
        FedZOConfig(quantize_bits=4)
    with pytest.raises(ValueError, match="mu"):
        FedZOConfig(mu=-1.0)
    with pytest.raises(ValueError, match="bytes"):
        ZOClientMessage.received(ScalarCodec(), torch.zeros(7, dtype=torch.uint8), CFG, client=0,
                                 start_step=0)  # fmt: skip
