"""One detector of a missing double derivative, used by HVPEngine and hessian.operators."""

import warnings

import torch
from torch.autograd.function import once_differentiable

from anyorder.curvature import CurvatureFallbackWarning, HVPEngine, double_backward_unavailable
from anyorder.hessian import operators


class _Square(torch.autograd.Function):
    """x^2 whose backward cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_the_detector_reads_the_graph_and_errors_and_both_users_share_it():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((_Square.apply(w) ** 2).sum(), [w], create_graph=True)
    assert "Error node" in double_backward_unavailable([g])
    (plain,) = torch.autograd.grad((w**4).sum(), [w], create_graph=True)
    assert double_backward_unavailable([plain]) is None
    err = RuntimeError("derivative for aten::foo is not implemented")
    assert double_backward_unavailable(err=err).startswith("derivative for")
    assert double_backward_unavailable(err=RuntimeError("CUDA out of memory")) is None
    assert operators.double_backward_unavailable is double_backward_unavailable


def test_hvp_engine_falls_back_where_the_graph_shows_a_product_would_be_silently_wrong():
    # L = sum(w^4) through a once-differentiable square: H = diag(12 w^2). The engine sees the
    # blocking node in the gradient's graph (double backward does not raise there: it drops the
    # once-differentiable part: H v came out 0 instead of 12) and goes to finite differences.
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    engine = HVPEngine("auto", owner="test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, products = engine.gradient_and_hvps(
            lambda backward=False: (_Square.apply(w) ** 2).sum(),
            [w],
            [[torch.tensor([1.0, 0.0], dtype=torch.float64)]],
        )
    assert engine.resolved == "finite_difference"
    messages = [str(c.message) for c in caught if issubclass(c.category, CurvatureFallbackWarning)]
    assert len(messages) == 1 and "Error node" in messages[0]
    assert abs(float(products[0][0][0]) - 12.0) < 1e-5 and float(products[0][0][1]) == 0.0
