import pytest
import torch

from anyorder.federated.partition import (
    check_partition,
    client_datasets,
    dirichlet,
    iid,
    labels_of,
    pathological,
    summarize,
)


def _labels(n=1000, classes=10, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_no_example_lost_or_duplicated(kind):
    labels = _labels()
    gen = torch.Generator().manual_seed(1)
    if kind == "iid":
        parts = iid(len(labels), 7, gen)
    elif kind == "dirichlet":
        parts = dirichlet(labels, 7, 0.1, gen)
    else:
        parts = pathological(labels, 7, 2, gen)
    check_partition(parts, len(labels))
    assert len(parts) == 7 and all(len(p) >= 1 for p in parts)
    s = summarize(parts, labels)
    assert sum(s.sizes) == len(labels)
    assert torch.equal(torch.tensor(s.counts).sum(0), torch.bincount(labels, minlength=10))
    if kind == "pathological":
        assert set(s.classes_per_client) == {2}


def test_check_partition_rejects_duplicates_and_gaps():
    with pytest.raises(ValueError, match="exactly once"):
        check_partition([torch.tensor([0, 1]), torch.tensor([1, 2])], 4)


@pytest.mark.parametrize("alpha", [0.3, 3.0])
def test_dirichlet_share_has_the_dirichlet_mean_and_variance(alpha):
    # share of class c on client i: Beta(alpha, (m-1) alpha), mean 1/m and
    # variance (1/m)(1-1/m)/(m alpha + 1); flooring adds at most 1/n_c
    m, classes, n = 5, 4, 4000
    labels = torch.arange(n) % classes
    shares = []
    for seed in range(60):
        parts = dirichlet(labels, m, alpha, torch.Generator().manual_seed(seed), min_size=0)
        counts = torch.tensor(summarize(parts, labels).counts, dtype=torch.float64)
        shares.append(counts / (n / classes))
    shares = torch.stack(shares).flatten()  # 60 * 5 * 4 samples
    var = (1 / m) * (1 - 1 / m) / (m * alpha + 1)
    se = (var / len(shares)) ** 0.5 * 2.0  # samples of one draw are correlated (sum to 1)
    assert abs(float(shares.mean()) - 1 / m) < 4 * se + 1e-3
    assert abs(float(shares.var()) / var - 1) < 0.25


def test_dirichlet_is_seeded():
    labels = _labels()
    a = dirichlet(labels, 5, 0.5, torch.Generator().manual_seed(3))
    b = dirichlet(labels, 5, 0.5, torch.Generator().manual_seed(3))
    c = dirichlet(labels, 5, 0.5, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_map_style_dataset_and_bad_input():
    data = [(torch.full((2,), float(i)), i % 3) for i in range(12)]
    labels = labels_of(data)
    parts = pathological(labels, 3, 1, torch.Generator().manual_seed(0))
    clients = client_datasets(data, parts)
    for c in clients:
        assert torch.equal(c.inputs[:, 0].long() % 3, c.targets)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(labels, 3, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="num_clients"):
        iid(5, 6, torch.Generator())
    with pytest.raises(ValueError, match="classes_per_client"):
        pathological(labels, 3, 4, torch.Generator())
    print(summarize(parts, labels).format())
