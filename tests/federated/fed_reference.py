"""Shared float64 fixtures: a tiny classification problem split over clients, a small MLP, and a
plain reference of minibatch order and gradients written without anyorder.federated."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

from anyorder.federated.algorithm import ClientContext, ClientData, client_generator


def make_problem(num_clients: int = 4, seed: int = 0, dim: int = 5, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    sizes = [7 + 5 * i for i in range(num_clients)]
    data = []
    for n in sizes:
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        y = torch.randint(0, classes, (n,), generator=gen)
        data.append(ClientData(x, y))
    model = nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Linear(6, classes)).double()
    torch.manual_seed(seed)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return data, model


def contexts(data, model, seed: int, round_index: int):
    return [
        ClientContext(
            i, d, model, nn.functional.cross_entropy, client_generator(seed, round_index, i)
        )
        for i, d in enumerate(data)
    ]


class Reference:
    """Plain reference pieces: the model as a function of a dict of tensors, its minibatch
    gradient, and the minibatch order of ClientContext.batches written out again."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]

    def unflat(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for name, shape in zip(self.names, self.shapes):
            k = shape.numel()
            out[name] = w[pos : pos + k].view(shape)
            pos += k
        return out

    def loss(self, w, x, y):
        return nn.functional.cross_entropy(functional_call(self.model, self.unflat(w), (x,)), y)

    def grad(self, w, x, y):
        return grad(self.loss)(w, x, y)

    @staticmethod
    def batches(data: ClientData, seed: int, round_index: int, cid: int, steps: int, bs: int):
        gen = client_generator(seed, round_index, cid)
        n = len(data)
        size = min(bs, n)
        order = torch.randperm(n, generator=gen)
        pos = 0
        out = []
        for _ in range(steps):
            if pos + size > n:
                order = torch.randperm(n, generator=gen)
                pos = 0
            idx = order[pos : pos + size]
            pos += size
            out.append((data.inputs[idx], data.targets[idx]))
        return out


