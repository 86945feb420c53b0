"""Federated zeroth-order rounds: clients send (seed, projected gradient) pairs, everyone replays."""

from __future__ import annotations

import math

import pytest
import torch
from fed_reference import Reference, contexts

from anyorder.core.rng import derive_seed, direction
from anyorder.distributed.payload import ScalarCodec
from anyorder.federated import FedAvg, flatten, payload_bytes
from anyorder.federated.fedavg import weighted_mean_update
from anyorder.federated.zeroth_order import (
    FedZO,
    ZOSteps,
    query_seed,
    replay_pairs,
    zo_local_steps,
)

SEED = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

RULE = ZOSteps(lr=0.05, mu=1e-4, queries=2, seed=7)


def _quadratic_losses(d=9, steps=3):
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(d, d, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return [lambda w, a=a: 0.5 * (a @ w).pow(2).sum() + w.sum() for a in mats]


def test_local_steps_equal_mezo_written_out():
    """g = (L(w + mu z) - L(w - mu z)) / 2 mu with z the Rademacher direction of
    (seed, step, query seed), sent as float32, and w <- w - lr * mean_j g_j z_j."""
    losses = _quadratic_losses()
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    got, pairs, _, dropped = zo_local_steps(x, losses, RULE, ScalarCodec(), client_seed=5,
                                            start_step=6)  # fmt: skip
    w = x.clone()
    for k, loss in enumerate(losses):
        step, update = 6 + k, torch.zeros_like(w)
        for j in range(RULE.queries):
            z = direction((9,), 7, step, query_seed(5, step, j), 0, distribution="rademacher",
                          dtype=torch.float64)  # fmt: skip
            g = (float(loss(w + 1e-4 * z)) - float(loss(w - 1e-4 * z))) / 2e-4
            update += float(torch.tensor(g, dtype=torch.float32)) / RULE.queries * z
        w = w - 0.05 * update
    torch.testing.assert_close(got, w, rtol=0, atol=1e-12)
    assert not torch.equal(got, x) and dropped == 0
    assert pairs.numel() == 3 * 2 * 8  # a 4-byte seed and a float32 per query
    assert torch.equal(replay_pairs(x, pairs, RULE, ScalarCodec(), 6), got)


def _run(alg, data, model, rounds, drop=()):
    x0 = flatten(list(model.parameters()))
    server = alg.init_server(x0, len(data))
    clients = [alg.init_client(x0, i) for i in range(len(data))]
    up_bytes, down_bytes = [], []
    for t in range(rounds):
        down = alg.downlink(server)
        down_bytes.append(payload_bytes(down))
        ups = []
        for ctx in contexts(data, model, SEED, t):
            if (t, ctx.client_id) in drop:
                continue
            up, clients[ctx.client_id] = alg.client_update(down, clients[ctx.client_id], ctx)
            up_bytes.append(payload_bytes(up))
            ups.append((ctx.client_id, up))
        server = alg.aggregate(server, ups, len(data))
    return server, clients, up_bytes, down_bytes


def _weights_sending_reference(alg, data, model, rounds):
    """FedAvg whose clients run the same ZO-SGD steps and upload their weights (the deltas)."""
    ref = Reference(model)
    x = flatten(list(model.parameters()))
    scale = math.nan
    for t in range(rounds):
        codec = ScalarCodec(bits=alg.quantize_bits)
        codec.mean_abs = None if math.isnan(scale) else scale
        ups, values = [], []
        for i, d in enumerate(data):
            losses = [lambda w, xb=xb, yb=yb: ref.loss(w, xb, yb)
                      for xb, yb in ref.batches(d, SEED, t, i, alg.local_steps, alg.batch_size)]  # fmt: skip
            x_i, pairs, _, _ = zo_local_steps(x, losses, alg.rule, codec,
                                              client_seed=derive_seed(alg.seed, i),
                                              start_step=t * alg.local_steps)  # fmt: skip
            ups.append((i, {"delta": x_i - x, "num_examples": torch.tensor(len(d))}))
            values += [g for _, g in _pairs(codec, pairs)]
        x = x + alg.server_lr * weighted_mean_update(ups, alg.weighting)
        codec.observe(values)
        scale = codec.mean_abs
    return x


def _pairs(codec, pairs):
    from anyorder.distributed.payload import decode, payload_size

    q, g = decode(codec, pairs.reshape(-1, payload_size(codec)))
    return list(zip(q, g))


@pytest.mark.parametrize("sync,bits", [("pairs", None), ("pairs", 8), ("model", None)])
def test_rounds_of_seeds_and_scalars_equal_fedavg_over_the_zo_clients_weights_bit_for_bit(
    problem, sync, bits
):
    data, model = problem
    alg = FedZO(local_steps=3, batch_size=5, lr=0.05, mu=1e-3, queries=2, seed=11, sync=sync,
                quantize_bits=bits)  # fmt: skip
    server, clients, up_bytes, down_bytes = _run(alg, data, model, rounds=3)
    want = _weights_sending_reference(alg, data, model, rounds=3)
    assert torch.equal(alg.global_model(server), want)
    if sync == "pairs":  # every client rebuilt the global model it last started from
        before_last = server["model"] - server["model"]  # shape only
        for c in clients:
            assert int(c["round"]) == 2 and c["model"].shape == before_last.shape
        # one more downlink: every client folds round 2's pairs into exactly the server's model
        down = alg.downlink(server)
        for ctx, c in zip(contexts(data, model, SEED, 3), clients):
            _, state = alg.client_update(down, c, ctx)
            assert torch.equal(state["model"], server["model"])
    # bytes: K * Q queries of (4-byte seed + 4-byte float, or 1 byte once the scale exists)
    per_query = [8] * 4 + [5] * 8 if bits else [8] * 12
    assert up_bytes == [3 * 2 * q + 8 for q in per_query]
    d = alg.global_model(server).numel()
    if sync == "pairs":
        assert down_bytes == [8, 8 + sum(up_bytes[:4]), 8 + sum(up_bytes[4:8])]
    else:
        assert down_bytes == [8 * d + 8] * 3  # float64 model + round
    fedavg = FedAvg(local_steps=3, batch_size=5)
    assert payload_bytes(fedavg.downlink({"model": server["model"]})) == 8 * d


def test_zo_rounds_descend(problem):
    data, model = problem
    alg = FedZO(local_steps=5, batch_size=8, lr=0.1, mu=1e-3, queries=4, seed=0)
    ref = Reference(model)
    full_x = torch.cat([d.inputs for d in data])
    full_y = torch.cat([d.targets for d in data])
    x0 = flatten(list(model.parameters()))
    server, *_ = _run(alg, data, model, rounds=8)
    assert float(ref.loss(server["model"], full_x, full_y)) < 0.9 * float(ref.loss(x0, full_x, full_y))


def test_dropped_queries_are_skipped_by_client_and_replay_alike():
    losses = _quadratic_losses()
    calls = {"n": 0}

    def poisoned(loss):
        def at(w):
            calls["n"] += 1
            return torch.tensor(float("nan")) if calls["n"] in (1, 5, 6, 7, 8) else loss(w)

        return at

    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    got, pairs, _, dropped = zo_local_steps(x, [poisoned(f) for f in losses], RULE, ScalarCodec(),
                                            client_seed=1, start_step=0)  # fmt: skip
    values = [g for _, g in _pairs(ScalarCodec(), pairs)]
    assert math.isnan(values[0]) and math.isfinite(values[1])
    assert all(math.isnan(v) for v in values[2:4]) and dropped == 1  # a whole step dropped
    assert torch.isfinite(got).all()
    assert torch.equal(replay_pairs(x, pairs, RULE, ScalarCodec(), 0), got)


def test_an_interrupted_query_leaves_the_input_alone():
    losses = _quadratic_losses()
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    before = x.clone()

    def interrupted(w):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zo_local_steps(x, [losses[0], interrupted], RULE, ScalarCodec(), client_seed=1,
                       start_step=0)  # fmt: skip
    assert torch.equal(x, before)


def test_a_client_that_missed_a_round_cannot_sync_from_pairs(problem):
    data, model = problem
    alg = FedZO(local_steps=2, batch_size=5, lr=0.05, seed=1)
    with pytest.raises(ValueError, match="sync='model'"):
        _run(alg, data, model, rounds=3, drop={(1, 2)})
    partial = FedZO(local_steps=2, batch_size=5, lr=0.05, seed=1, sync="model")
    server, *_ = _run(partial, data, model, rounds=3, drop={(1, 2)})
    assert int(server["round"]) == 3 and torch.isfinite(server["model"]).all()


def test_bad_hyperparameters_are_refused():
    for kwargs, word in [({"local_steps": 0}, "local_steps"), ({"quantize_bits": 4}, "quantize_bits"),
                         ({"mu": -1.0}, "mu"), ({"sync": "gossip"}, "sync"),
                         ({"momentum": 1.0}, "momentum"), ({"seed": -1}, "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=word):
            FedZO(**kwargs)
    with pytest.raises(ValueError, match="uint8"):
        replay_pairs(torch.zeros(3), torch.zeros(7, dtype=torch.uint8), RULE, ScalarCodec(), 0)
