"""Client partitions of a map-style dataset: IID, Dirichlet(α) over labels, pathological (k
classes per client); every draw from an explicit ``torch.Generator``.

A partition is a list of index tensors, one per client: together they hold every example exactly
once. :func:`summarize` counts examples per client and class.

Dirichlet: for every class c, the shares of its examples that go to the m clients are drawn from
Dir(α, ..., α) (the per-class convention of Yurochkin et al. 2019 / Wang et al. "FedMA", and Li
et al.'s NIID-Bench), so client sizes vary with α. FL-Simulator draws instead a label prior per
client, Dir(α), and fills equal-sized clients from it; that convention is not implemented here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anyorder.federated.algorithm import ClientData

__all__ = [
    "iid",
    "dirichlet",
    "pathological",
    "labels_of",
    "summarize",
    "PartitionSummary",
    "client_datasets",
    "check_partition",
]


def _check_clients(num_clients: Any, n: int) -> int:
    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} is more than the {n} examples")
    return num_clients


def _labels(labels: Any) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError("labels must be a 1-D tensor of integer class labels")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    return labels.long()


def iid(num_examples: int, num_clients: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation cut into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(num_clients, num_examples)
    perm = torch.randperm(num_examples, generator=generator)
    return [part.clone() for part in torch.tensor_split(perm, num_clients)]


def dirichlet(
    labels: Any,
    num_clients: int,
    alpha: float,
    generator: torch.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[torch.Tensor]:
    """Per class c: shares q_c ~ Dir(α·1_m) over the clients, and class c's shuffled examples cut
    at ⌊n_c · cumsum(q_c)⌋ (so nothing is lost or duplicated). The whole draw is repeated until
    every client has at least ``min_size`` examples (``ValueError`` after ``max_tries``)."""
    labels = _labels(labels)
    _check_clients(num_clients, len(labels))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if min_size * num_clients > len(labels):
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs more than {len(labels)} examples"
        )
    concentration = torch.full((num_clients,), float(alpha), dtype=torch.float64)
    classes = torch.unique(labels)
    for _ in range(max_tries):
        parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
        for c in classes.tolist():
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)]
            shares = _dirichlet_sample(concentration, generator)
            cuts = torch.floor(torch.cumsum(shares, 0) * len(idx)).long()
            cuts[-1] = len(idx)
            start = 0
            for i, end in enumerate(cuts.tolist()):
                parts[i].append(idx[start:end])
                start = end
        out = [torch.cat(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return [p[torch.argsort(p)] for p in out]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {num_clients} "
        f"clients at least {min_size} examples; raise alpha or lower min_size"
    )


def _dirichlet_sample(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dir(concentration) from Gamma draws with ``generator`` (torch's Dirichlet sampler takes no
    generator): Marsaglia–Tsang for shape ≥ 1, boosted by U^(1/a) for shape < 1."""
    gammas = torch.stack([_gamma(float(a), generator) for a in concentration])
    total = gammas.sum()
    if total <= 0:  # every gamma underflowed (tiny alpha): all mass on one client
        gammas = torch.zeros_like(gammas)
        gammas[int(torch.randint(len(gammas), (1,), generator=generator))] = 1.0
        total = gammas.sum()
    return gammas / total


def _gamma(shape: float, generator: torch.Generator) -> torch.Tensor:
    boost = 1.0
    if shape < 1.0:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        boost = u ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    while True:
        x = float(torch.randn((), generator=generator, dtype=torch.float64))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u < 1 - 0.0331 * x**4 or torch.log(torch.tensor(u)) < 0.5 * x * x + d * (
            1 - v + torch.log(torch.tensor(v))
        ):
            return torch.tensor(d * v * boost, dtype=torch.float64)


def pathological(
    labels: Any, num_clients: int, classes_per_client: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Every client gets exactly ``classes_per_client`` distinct classes (a random permutation of
    the classes, dealt round-robin: client i holds perm[(i·k + j) mod C], j < k), and each class's
    shuffled examples are split evenly among the clients holding it (McMahan et al. 2017's
    "pathological non-IID", with exact class counts instead of label-sorted shards)."""
    labels = _labels(labels)
    _check_clients(num_clients, len(labels))
    classes = torch.unique(labels)
    k = classes_per_client
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(classes):
        raise ValueError(
            f"classes_per_client must be an integer in [1, {len(classes)}], got {k!r}"
        )
    if num_clients * k < len(classes):
        raise ValueError(
            f"{num_clients} clients x {k} classes cannot cover all {len(classes)} classes"
        )
    perm = classes[torch.randperm(len(classes), generator=generator)]
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for i in range(num_clients):
        for j in range(k):
            holders[int(perm[(i * k + j) % len(classes)])].append(i)
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for owner, chunk in zip(owners, torch.tensor_split(idx, len(owners))):
            parts[owner].append(chunk)
    out = [torch.cat(p) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise ValueError(f"clients {empty} got no examples: too few examples per class")
    return [p[torch.argsort(p)] for p in out]


def labels_of(dataset: Any) -> torch.Tensor:
    """The labels of a map-style dataset: its ``targets`` attribute when there is one, otherwise
    ``dataset[i][1]`` for every i."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _labels(targets)
    return _labels([int(dataset[i][1]) for i in range(len(dataset))])


def check_partition(parts: Sequence[torch.Tensor], num_examples: int) -> None:
    """``ValueError`` unless ``parts`` hold every index in ``range(num_examples)`` exactly once."""
    allidx = torch.cat([torch.as_tensor(p).long() for p in parts]) if parts else torch.tensor([])
    counts = torch.bincount(allidx, minlength=num_examples) if len(allidx) else None
    if counts is None or len(counts) != num_examples or not bool((counts == 1).all()):
        raise ValueError(
            "the partition must hold every example exactly once (some index is missing, "
            "repeated or out of range)"
        )


def client_datasets(dataset: Any, parts: Sequence[torch.Tensor]) -> list[ClientData]:
    """Materialise each client's examples from a map-style dataset of (input, label) pairs, or
    from an ``(inputs, targets)`` pair of tensors."""
    if isinstance(dataset, tuple) and len(dataset) == 2:
        inputs, targets = dataset
        return [ClientData(inputs[p], targets[p]) for p in parts]
    out = []
    for p in parts:
        items = [dataset[int(i)] for i in p]
        out.append(
            ClientData(
                torch.stack([torch.as_tensor(x) for x, _ in items]),
                torch.as_tensor([int(y) for _, y in items]),
            )
        )
    return out


@dataclass(frozen=True)
class PartitionSummary:
    """Examples per client and class (``counts[i][c]``), with the client sizes."""

    counts: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sum(row) for row in self.counts)

    @property
    def classes_per_client(self) -> tuple[int, ...]:
        return tuple(sum(1 for v in row if v) for row in self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": [list(r) for r in self.counts],
            "sizes": list(self.sizes),
            "classes_per_client": list(self.classes_per_client),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format(self) -> str:
        """A plain-text table: one row per client, one column per class, then the size."""
        num_classes = len(self.counts[0]) if self.counts else 0
        head = ["client"] + [str(c) for c in range(num_classes)] + ["total"]
        rows = [[str(i), *map(str, r), str(sum(r))] for i, r in enumerate(self.counts)]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        return "\n".join(
            " ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [head, *rows]
        )


def summarize(
    parts: Sequence[torch.Tensor], labels: Any, num_classes: int | None = None
) -> PartitionSummary:
    """Counts per client and class of the partition ``parts`` of examples labelled ``labels``."""
    labels = _labels(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = tuple(
        tuple(torch.bincount(labels[torch.as_tensor(p).long()], minlength=num_classes).tolist())
        for p in parts
    )
    return PartitionSummary(counts)
