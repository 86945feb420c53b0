import pytest
import torch
from fed_reference import Reference, make_problem

from anyorder.federated import GossipAlgorithm, flatten
from anyorder.federated.decentralized import DFedAvg, DFedSAM, DFedSAMMGS
from anyorder.federated.simulator import GossipSimulator
from anyorder.federated.topology import (
    check_mixing,
    complete,
    erdos_renyi,
    metropolis,
    mixing_matrix,
    ring,
    spectral_gap,
    torus,
)

LOSS = torch.nn.functional.cross_entropy


@pytest.mark.parametrize(
    "adj",
    [ring(6), torus(12), complete(5), erdos_renyi(10, 0.3, torch.Generator().manual_seed(0))],
)
def test_metropolis_is_symmetric_doubly_stochastic(adj):
    w = metropolis(adj)
    check_mixing(w, len(w))
    assert torch.equal(w, w.T)
    assert bool(((w > 0) == ((adj > 0) | torch.eye(len(w), dtype=torch.bool))).all())
    assert 0 < spectral_gap(w) <= 1


def test_spectral_gap_values():
    assert spectral_gap(metropolis(complete(5))) == pytest.approx(1.0)
    # ring of m nodes, every degree 2: W = I/3 + (shift + shift^T)/3
    m = 8
    lam2 = 1 / 3 + 2 / 3 * torch.cos(torch.tensor(2 * torch.pi / m, dtype=torch.float64))
    assert spectral_gap(metropolis(ring(m))) == pytest.approx(1 - float(lam2))
    assert torus(12).sum(1).tolist() == [4.0] * 12


class Still(GossipAlgorithm):
    name = "still"

    def __init__(self, q):
        self.gossip_steps = q

    def local_update(self, node, ctx):
        return node


def _random_nodes(m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"model": torch.randn(d, generator=g, dtype=torch.float64)} for _ in range(m)]


def test_q_gossip_steps_equal_w_to_the_q():
    data, model = make_problem(num_clients=6)
    w = mixing_matrix("ring", 6)
    s = GossipSimulator(Still(3), model, LOSS, data, w)
    s.nodes = _random_nodes(6, 57)
    start = torch.stack([n["model"] for n in s.nodes])
    rec = s.step()
    got = torch.stack([n["model"] for n in s.nodes])
    torch.testing.assert_close(got, torch.linalg.matrix_power(w, 3) @ start, rtol=0, atol=1e-14)
    # every node sends its model to 2 neighbours per step: 3 steps x 2 x 57 x 8 bytes
    assert set(rec.bytes_up.values()) == {3 * 2 * 57 * 8} == set(rec.bytes_down.values())
    # the mean is preserved (W doubly stochastic)
    torch.testing.assert_close(got.mean(0), start.mean(0), rtol=0, atol=1e-13)


def test_consensus_at_the_rate_of_the_spectral_gap():
    m = 10
    data, model = make_problem(num_clients=m)
    w = mixing_matrix("ring", m)
    gap = spectral_gap(w)
    s = GossipSimulator(Still(1), model, LOSS, data, w)
    s.nodes = _random_nodes(m, 200, seed=1)
    dist = [s.consensus_distance()]
    for _ in range(40):
        s.step()
        dist.append(s.consensus_distance())
    ratios = [b / a for a, b in zip(dist, dist[1:])]
    assert max(ratios) <= (1 - gap) ** 2 + 1e-12  # never slower than the gap says
    assert ratios[-1] == pytest.approx((1 - gap) ** 2, rel=1e-3)  # and attains it


def test_dfedsam_mgs_first_rounds_equal_reference():
    m, K, bs, lr, rho, Q = 4, 3, 5, 0.2, 0.1, 2
    data, model = make_problem(num_clients=m)
    x0 = flatten(list(model.parameters()))
    w = mixing_matrix("ring", m)
    s = GossipSimulator(
        DFedSAMMGS(local_steps=K, batch_size=bs, lr=lr, rho=rho, gossip_steps=Q),
        model, LOSS, data, w, seed=2,
    )  # fmt: skip
    s.run(2)
    ref = Reference(model)
    z = x0.repeat(m, 1)
    for t in range(2):
        half = []
        for i in range(m):
            y = z[i].clone()
            for xb, yb in ref.batches(data[i], 2, t, i, K, bs):
                g = ref.grad(y, xb, yb)
                y = y - lr * ref.grad(y + rho * g / (g.norm() + 1e-12), xb, yb)
            half.append(y)
        z = torch.stack(half)
        for _ in range(Q):
            z = w @ z
    got = torch.stack([n["model"] for n in s.nodes])
    torch.testing.assert_close(got, z, rtol=1e-12, atol=1e-12)


def test_dfedavg_and_dfedsam_defaults():
    assert DFedAvg().gossip_steps == 1 and DFedSAM().gossip_steps == 1
    assert DFedSAMMGS().gossip_steps == 4
    with pytest.raises(ValueError, match="gossip_steps"):
        DFedSAM(gossip_steps=0)
    with pytest.raises(ValueError, match="doubly stochastic"):
        check_mixing(torch.tensor([[0.5, 0.5], [0.2, 0.8]]), 2)
