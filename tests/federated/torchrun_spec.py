"""The federation the torchrun test runs (imported by every rank through --spec)."""

from torch import nn

from anyorder.federated import FedAvg
from anyorder.federated.multiprocess import FederationSpec


def make_spec() -> FederationSpec:
    from fed_reference import make_problem

    data, model = make_problem(num_clients=5)
    alg = FedAvg(local_steps=3, batch_size=4, lr=0.2)
    return FederationSpec(alg, model, nn.functional.cross_entropy, data, seed=4,
                          participation=0.8, dropout=0.25)  # fmt: skip
