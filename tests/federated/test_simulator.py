from dataclasses import dataclass

import pytest
import torch
from fed_reference import make_problem

from anyorder.federated import FedAvg, flatten
from anyorder.federated.fedspeed import FedSpeed
from anyorder.federated.mofedsam import MoFedSAM
from anyorder.federated.simulator import CheckpointError, Simulator, accuracy_evaluator

LOSS = torch.nn.functional.cross_entropy


def sim(alg, data, model, **kw):
    return Simulator(alg, model, LOSS, data, seed=7, **kw)


def test_bytes_are_counted_from_payloads():
    data, model = make_problem(num_clients=5)
    d = flatten(list(model.parameters())).numel()
    s = sim(MoFedSAM(local_steps=2, batch_size=4), data, model, participation=0.6)
    rec = s.step()
    assert len(rec.participants) == 3
    assert set(rec.bytes_down) == {str(i) for i in rec.participants}
    assert all(v == 2 * d * 8 for v in rec.bytes_down.values())  # model + momentum, float64
    assert all(v == d * 8 + 8 for v in rec.bytes_up.values())  # delta + int64 count
    assert rec.total_bytes == 3 * (3 * d * 8 + 8)


def test_dropout_recorded_and_aggregates_the_others():
    data, model = make_problem(num_clients=6)
    s = sim(FedAvg(local_steps=2, batch_size=4), data, model, dropout=0.5)
    recs = s.run(4)
    assert any(r.dropped for r in recs)
    for r in recs:
        for i in r.dropped:
            assert r.bytes_up[str(i)] == 0 and r.bytes_down[str(i)] > 0
    # replay by hand: the aggregate of the clients that did not drop
    s2 = sim(FedAvg(local_steps=2, batch_size=4), data, model, dropout=0.5)
    x = s2.global_model().clone()
    for t in range(4):
        s2.round = t
        participants, dropped = s2.select()
        assert participants == recs[t].participants and dropped == recs[t].dropped
        ups = []
        for i in participants:
            if i not in dropped:
                up, _ = s2.algorithm.client_update({"model": x}, {}, s2._context(i))
                ups.append((i, up))
        x = s2.algorithm.aggregate({"model": x}, ups, 6)["model"]
    assert torch.equal(x, s.global_model())


@dataclass
class PoisonOne(FedAvg):
    def client_update(self, down, client, ctx):
        up, state = super().client_update(down, client, ctx)
        if ctx.client_id == 1:
            up = {**up, "delta": up["delta"] * float("nan")}
        return up, state


def test_nonfinite_upload_is_rejected_and_recorded():
    data, model = make_problem()
    s = sim(PoisonOne(local_steps=2, batch_size=4), data, model)
    rec = s.step()
    assert rec.rejected == [1]
    assert bool(torch.isfinite(s.global_model()).all())


def test_resume_is_bit_identical(tmp_path):
    data, model = make_problem(num_clients=6)
    alg = FedSpeed(local_steps=3, batch_size=4, rho=0.05, lam=5.0)
    kw = {"participation": 0.5, "dropout": 0.2}
    full = sim(alg, data, model, **kw)
    full.run(5)
    part = sim(alg, data, model, **kw)
    ckpt = tmp_path / "fed.pt"
    part.run(2, checkpoint=ckpt)
    resumed = sim(alg, data, model, **kw)
    resumed.load(ckpt)
    assert resumed.round == 2
    resumed.run(5)
    assert torch.equal(full.global_model(), resumed.global_model())
    for k in full.server:
        assert torch.equal(full.server[k], resumed.server[k])
    for a, b in zip(full.client_states, resumed.client_states):
        assert torch.equal(a["h"], b["h"])
    strip = [
        {k: v for k, v in r.to_dict().items() if not k.endswith("time_s")} for r in full.history
    ]
    assert strip == [
        {k: v for k, v in r.to_dict().items() if not k.endswith("time_s")}
        for r in resumed.history
    ]


def test_checkpoint_of_another_federation_is_refused(tmp_path):
    data, model = make_problem()
    s = sim(FedAvg(local_steps=2, batch_size=4), data, model)
    s.run(1, checkpoint=tmp_path / "a.pt")
    other = sim(FedAvg(local_steps=3, batch_size=4), data, model)
    before = other.global_model().clone()
    with pytest.raises(CheckpointError, match="hyperparameters"):
        other.load(tmp_path / "a.pt")
    assert other.round == 0 and torch.equal(other.global_model(), before)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        s.load(tmp_path / "bad.pt")


def test_evaluate_and_bad_arguments():
    data, model = make_problem()
    x = torch.cat([d.inputs for d in data])
    y = torch.cat([d.targets for d in data])
    s = sim(FedAvg(local_steps=5, batch_size=8, lr=0.5), data, model,
            evaluate=accuracy_evaluator(model, x, y), eval_every=2)  # fmt: skip
    recs = s.run(3)
    assert recs[0].metrics == {} and "accuracy" in recs[1].metrics and "loss" in recs[2].metrics
    assert recs[2].metrics["loss"] < recs[1].metrics["loss"] + 1.0
    with pytest.raises(ValueError, match="participation"):
        sim(FedAvg(), data, model, participation=0.0)
    with pytest.raises(ValueError, match="dropout"):
        sim(FedAvg(), data, model, dropout=1.0)
    with pytest.raises(TypeError, match="ServerAlgorithm"):
        Simulator(object(), model, LOSS, data)


@dataclass
class InterruptTwo(FedAvg):
    def client_update(self, down, client, ctx):
        if ctx.client_id == 2:
            raise KeyboardInterrupt
        return super().client_update(down, client, ctx)


def test_interrupt_inside_a_round_leaves_the_federation_as_it_was(tmp_path):
    data, model = make_problem()
    s = sim(InterruptTwo(local_steps=2, batch_size=4), data, model)
    before = s.global_model().clone()
    with pytest.raises(KeyboardInterrupt):
        s.run(2, checkpoint=tmp_path / "c.pt")
    assert s.round == 0 and s.history == [] and torch.equal(s.global_model(), before)
    assert not (tmp_path / "c.pt").exists()
