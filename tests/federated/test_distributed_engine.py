"""The multi-process engine (3 gloo processes on this machine) against the in-process simulator:
the same seeds give the same model, bit for bit, and the bytes that crossed are counted."""

from __future__ import annotations

import pytest
import torch
from fed_reference import make_problem
from torch import nn

from anyorder.federated import FedAvg, payload_bytes
from anyorder.federated.decentralized import DFedSAM
from anyorder.federated.multiprocess import FederationSpec, launch
from anyorder.federated.topology import mixing_matrix
from anyorder.federated.transport import pack, unpack
from anyorder.federated.zeroth_order import FedZO

WORLD = 3
ROUNDS = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec(algorithm, num_clients=5, **kw):
    data, model = make_problem(num_clients=num_clients)
    return FederationSpec(algorithm, model, nn.functional.cross_entropy, data, seed=4, **kw)


def _same_records(got, want):
    for g, w in zip(got, want, strict=True):
        w = w.to_dict()
        for key in ("round", "participants", "dropped", "rejected", "bytes_up", "bytes_down"):
            assert g[key] == w[key], key
        assert g["train_loss"] == w["train_loss"]


def test_server_rounds_on_three_processes_equal_the_simulator_bit_for_bit(tmp_path):
    spec = _spec(FedAvg(local_steps=3, batch_size=4, lr=0.2), participation=0.8, dropout=0.25)
    sim = spec.simulator()
    sim.run(ROUNDS)
    got = launch(WORLD, spec, ROUNDS, tmp_path)
    assert torch.equal(got["model"], sim.global_model())
    _same_records(got["history"], sim.history)
    assert any(r["dropped"] for r in got["history"])  # the draw exercised a dropout
    # what crossed: the server received every upload of a client on ranks 1 and 2 (the 8-byte
    # count and the model delta of float64) plus framing, and sent the downlink to two ranks
    d = got["model"].numel()
    for r in got["history"]:
        remote = [i for i in r["participants"] if i % WORLD and i not in r["dropped"]]
        body = len(remote) * (8 * d + 8)
        assert body <= r["extra"]["wire_received_by_server"] <= body + 2 * 1024
        assert 2 * 8 * d <= r["extra"]["wire_sent_by_server"] <= 2 * 8 * d + 4096


@pytest.mark.slow
def test_federated_zeroth_order_over_processes_exchanges_seeds_and_scalars(tmp_path):
    spec = _spec(FedZO(local_steps=3, batch_size=4, lr=0.05, mu=1e-3, queries=2, seed=1))
    sim = spec.simulator()
    sim.run(ROUNDS)
    ckpt = tmp_path / "fed.pt"
    # two rounds on 2 processes, checkpointed (every client's copy of the model gathered on
    # rank 0), then resumed on 3 processes for the last round
    first = launch(2, spec, ROUNDS - 1, tmp_path, checkpoint=ckpt)
    assert first["rounds"] == ROUNDS - 1 and ckpt.exists()
    got = launch(WORLD, spec, ROUNDS, tmp_path, checkpoint=ckpt)
    assert torch.equal(got["model"], sim.global_model())
    _same_records(got["history"], sim.history)
    upload = 3 * 2 * 8 + 8  # K * Q pairs of (seed, float32) and the example count
    assert all(b == upload for r in got["history"] for b in r["bytes_up"].values())
    last = got["history"][-1]["extra"]  # the round run on 3 processes
    # three remote clients (ids 1, 2, 4 on ranks 1, 2, 1), each upload framed by < 256 bytes ...
    assert 3 * upload <= last["wire_received_by_server"] <= 3 * (upload + 256)
    # ... and the downlink: the previous round's 5 uploads and the round index, to 2 ranks
    down = 5 * upload + 8
    assert 2 * down <= last["wire_sent_by_server"] <= 2 * (down + 2 * 256)  # + accepted ids


def test_gossip_on_three_processes_equals_the_simulator_bit_for_bit(tmp_path):
    alg = DFedSAM(local_steps=2, batch_size=4, lr=0.2, rho=0.05, gossip_steps=2)
    spec = _spec(alg, num_clients=6, mixing=mixing_matrix("ring", 6))
    sim = spec.simulator()
    sim.run(2)
    got = launch(WORLD, spec, 2, tmp_path)
    want = torch.stack([sim.algorithm.node_model(n) for n in sim.nodes])
    assert torch.equal(got["node_models"], want)
    _same_records(got["history"], sim.history)
    for g, w in zip(got["history"], sim.history):
        assert g["extra"]["consensus"] == w.extra["consensus"]
    # ring of 6 over 3 ranks (node i on rank i % 3): every edge crosses ranks, so each node's
    # model goes to both neighbours' ranks, once per gossip step
    d = got["model"].numel()
    body = 2 * 6 * 2 * 8 * d
    for r in got["history"]:
        assert body <= r["extra"]["wire_bytes"] <= body + 2 * 6 * 2 * 1024


def test_pack_round_trip_and_counts():
    payload = {"delta": torch.arange(5, dtype=torch.float64), "n": torch.tensor(3)}
    tree = {"ids": [1, 4], "ups": [payload, payload], "loss": [0.5, float("nan")], "ok": True}
    data, body = pack(tree)
    assert body == 2 * payload_bytes(payload) + 2 * 8 + 2 * 8
    back = unpack(data)
    assert back["ids"] == [1, 4] and back["ok"] is True
    assert torch.equal(back["ups"][1]["delta"], payload["delta"])
    assert back["loss"][0] == 0.5 and back["loss"][1] != back["loss"][1]
    assert len(data) - body < 250  # the JSON header
    with pytest.raises(TypeError, match="tensors, numbers"):
        pack({"bad": object()})


def test_launch_refuses_bad_arguments(tmp_path):
    spec = _spec(FedAvg(local_steps=1, batch_size=4))
    with pytest.raises(ValueError, match="world"):
        launch(0, spec, 1, tmp_path)
    with pytest.raises(ValueError, match="backend"):
        launch(2, spec, 1, tmp_path, backend="mpi")
    with pytest.raises(TypeError, match="must pickle"):
        launch(2, _spec(FedAvg(local_steps=1, batch_size=4), evaluate=lambda x: {}), 1, tmp_path)


@pytest.mark.slow
def test_torchrun_entry_point_equals_the_simulator(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from torchrun_spec import make_spec

    here = Path(__file__).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parents[1] / "src"), str(here),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "anyorder.federated.multiprocess", "--spec", "torchrun_spec:make_spec",
         "--rounds", str(ROUNDS), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    sim = make_spec().simulator()
    sim.run(ROUNDS)
    assert got["world"] == WORLD and torch.equal(got["model"], sim.global_model())
    _same_records(got["history"], sim.history)
