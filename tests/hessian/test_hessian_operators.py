"""Curvature operators against their definitions: dense Hessian, J^T H_L J, mean g g^T."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_hessian, make_data, make_mlp
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

from anyorder.hessian import GGN, Fisher, Hessian, MatrixOperator


def test_hessian_operator_equals_dense_hessian(mlp_problem):
    model, batch, exact, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    assert op.size == exact.shape[0] == 2203
    dense = op.to_dense()
    assert torch.allclose(dense, exact, atol=1e-12, rtol=1e-9)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(op.matvec(v), exact @ v, atol=1e-12)
    assert torch.allclose(op @ v, exact @ v, atol=1e-12)


def test_restricted_to_one_layer_is_the_diagonal_block(mlp_problem):
    model, batch, exact, _ = mlp_problem
    layer = model[2]
    op = Hessian(model, F.cross_entropy, batch, params=layer)
    by_name = Hessian(model, F.cross_entropy, batch, params="2")
    start = sum(p.numel() for p in model[0].parameters())
    stop = start + sum(p.numel() for p in layer.parameters())
    block = exact[start:stop, start:stop]
    assert op.size == stop - start == 1640
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(op.matvec(v), block @ v, atol=1e-12)
    assert torch.allclose(by_name.matvec(v), block @ v, atol=1e-12)


def _jacobian_and_output_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in base]
    flat = torch.cat([p.reshape(-1) for p in base])

    def out(w):
        parts = torch.split(w, sizes)
        return functional_call(
            model, {n: q.view_as(p) for n, q, p in zip(names, parts, base)}, (batch[0],)
        )

    z = out(flat)
    jac = jacrev(out)(flat).reshape(z.numel(), -1)  # (B*C, P)
    h_out = hessian(lambda zz: F.cross_entropy(zz.reshape(z.shape), batch[1]))(z.reshape(-1))
    return jac, h_out


def test_ggn_equals_its_definition_and_is_psd():
    model, batch = make_mlp(seed=4), make_data(n=25, seed=5)
    jac, h_out = _jacobian_and_output_hessian(model, batch)
    expected = jac.T @ h_out @ jac
    dense = GGN(model, F.cross_entropy, batch).to_dense()
    assert torch.allclose(dense, expected, atol=1e-12)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() > -1e-10 * evals.max()  # cross-entropy is convex in the logits


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    model = nn.Linear(10, 3).double()  # logistic regression: Hessian == GGN exactly
    batch = make_data(n=40)
    assert torch.allclose(
        GGN(model, F.cross_entropy, batch).to_dense(),
        Hessian(model, F.cross_entropy, batch).to_dense(),
        atol=1e-13,
    )


def test_empirical_fisher_equals_mean_outer_product_of_per_sample_gradients():
    model, (x, y) = make_mlp(seed=6), make_data(n=20, seed=7)
    grads = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    g = torch.stack(grads)
    expected = g.T @ g / g.shape[0]
    op = Fisher(model, F.cross_entropy, (x, y))
    assert torch.allclose(op.to_dense(), expected, atol=1e-13)
    # rank at most the number of samples
    assert int((torch.linalg.eigvalsh(expected) > 1e-10).sum()) <= x.shape[0]


@pytest.mark.parametrize("cls", [Hessian, GGN, Fisher])
def test_dataloader_average_equals_the_full_batch_operator(cls):
    model, (x, y) = make_mlp(seed=8), make_data(n=30, seed=9)
    full = cls(model, F.cross_entropy, (x, y))
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # uneven last batch of 2
    averaged = cls(model, F.cross_entropy, loader)
    assert not averaged.single and len(list(averaged.batches())) == 5
    vs = torch.randn(3, full.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(averaged.matmat(vs), full.matmat(vs), atol=1e-12)
    # a one-shot generator of batches is kept, not exhausted by the first product
    gen_op = cls(model, F.cross_entropy, ((x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)))
    assert torch.allclose(gen_op.matvec(vs[0]), full.matvec(vs[0]), atol=1e-12)
    assert torch.allclose(gen_op.matvec(vs[1]), full.matvec(vs[1]), atol=1e-12)


def test_matmat_equals_matvec_rows_and_counts_products(mlp_problem):
    model, batch, _, _ = mlp_problem
    op = Hessian(model, F.cross_entropy, batch)
    vs = torch.randn(4, op.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    block = op.matmat(vs)
    rows = torch.stack([op.matvec(v) for v in vs])
    assert torch.allclose(block, rows, atol=1e-12)
    assert op.matvecs == 8


def test_eval_mode_during_analysis_and_modes_restored():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Dropout(0.5), nn.Tanh(), nn.Linear(12, 2)
    )
    model.double()
    model[4].eval()  # a module in its own mode must come back that way
    x, y = (
        torch.randn(16, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (16,), generator=g),
    )
    bn_mean = model[1].running_mean.clone()
    op = Hessian(model, F.cross_entropy, (x, y))
    dense = op.to_dense()
    assert model.training and model[1].training and not model[4].training
    assert torch.equal(model[1].running_mean, bn_mean)  # no statistics updated
    model.eval()
    expected = dense_hessian(model, F.cross_entropy, (x, y))
    assert torch.allclose(dense, expected, atol=1e-12)  # deterministic: dropout was off


def test_cached_graph_follows_in_place_parameter_changes():
    model, batch = make_mlp(seed=2), make_data(n=20)
    op = Hessian(model, F.cross_entropy, batch)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = op.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = op.matvec(v)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, dense_hessian(model, F.cross_entropy, batch) @ v, atol=1e-12)


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _OnceModel(nn.Module):
    def __init__(self, ref: nn.Sequential):
        super().__init__()
        self.a, self.b = ref[0], ref[2]

    def forward(self, x):
        return self.b(_OnceTanh.apply(self.a(x)))


def test_finite_difference_fallback_warns_once_and_is_accurate():
    g = torch.Generator().manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = (
        torch.randn(30, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (30,), generator=g),
    )
    expected = dense_hessian(ref, F.cross_entropy, (x, y))
    model = _OnceModel(ref)
    weights = [p.detach().clone() for p in model.parameters()]
    op = Hessian(model, F.cross_entropy, (x, y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = op.to_dense(chunk=16)  # several products
    fallback = [w for w in caught if "finite-difference" in str(w.message)]
    assert len(fallback) == 1 and op.finite_difference
    assert torch.allclose(dense, expected, atol=1e-7 * float(expected.abs().max()))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))  # restored


def test_bad_input_names_the_value():
    model, batch = make_mlp(), make_data(n=5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Hessian("model", F.cross_entropy, batch)
    with pytest.raises(ValueError, match="not a submodule.*'0', '2', '4'"):
        Hessian(model, F.cross_entropy, batch, params="nope")
    with pytest.raises(ValueError, match="foreign"):
        Hessian(model, F.cross_entropy, batch, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Hessian(model, None, batch)
    with pytest.raises(TypeError, match="iterable of batches"):
        Hessian(model, F.cross_entropy, 3.5)
    op = Hessian(model, F.cross_entropy, batch)
    with pytest.raises(ValueError, match=r"shape \(2203,\)"):
        op.matvec(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="square matrix"):
        MatrixOperator(torch.zeros(2, 3))
