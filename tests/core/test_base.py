"""AnyOrderOptimizer: global state in the state dict, closure checks, non-finite policy.

A minimal concrete subclass (gradient descent, computed with torch.autograd.grad) exercises the
base the way every anyorder optimizer will.
"""

import io
import math

import pytest
import torch

from anyorder.core.base import AnyOrderOptimizer, NonFiniteLossError


class PlainGD(AnyOrderOptimizer):
    """x <- x - lr * grad, evaluating the closure with backward=False and differentiating itself."""

    def __init__(self, params, lr=0.1, on_nonfinite="skip"):
        super().__init__(params, {"lr": lr}, on_nonfinite=on_nonfinite)

    def step(self, closure=None):
        with torch.enable_grad():
            loss = self.evaluate(closure, backward=True)
        if not self.loss_is_finite(float(loss.detach())):
            return loss
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                torch._foreach_add_(params, grads, alpha=-group["lr"])
        self.global_state["step"] += 1
        return loss


def _quadratic():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    target = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)

    def closure(backward=True):
        loss = ((w - target) ** 2).sum()
        if backward:
            w.grad = None
            loss.backward()
        return loss

    return w, target, closure


def test_gradient_descent_trajectory_matches_closed_form():
    w, target, closure = _quadratic()
    opt = PlainGD([w], lr=0.1)
    x0 = w.detach().clone()
    for _ in range(20):
        opt.step(closure)
    # w_k - t = (1 - 2 lr)^k (w_0 - t)
    expected = target + (1 - 0.2) ** 20 * (x0 - target)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-14)
    assert opt.global_state["step"] == 20


def test_state_dict_round_trip_through_torch_save():
    w, _, closure = _quadratic()
    opt = PlainGD([w], lr=0.1)
    for _ in range(3):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = PlainGD([w], lr=0.5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.global_state == opt.global_state
    assert fresh.param_groups[0]["lr"] == 0.1
    assert "anyorder" not in fresh.state  # global state never hangs on a parameter


def test_lr_scheduler_changes_the_step():
    w, _, closure = _quadratic()
    opt = PlainGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = w.detach().clone()
    opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    grad = 2 * (w.detach() - 0.5)
    mid = w.detach().clone()
    opt.step(closure)
    assert torch.allclose(w.detach(), mid - 0.05 * grad)
    assert not torch.equal(before, mid)


def test_nonfinite_loss_is_skipped_or_raised_and_never_reaches_the_weights():
    w = torch.nn.Parameter(torch.ones(3))

    def bad(backward=True):
        loss = (w * float("nan")).sum()
        if backward:
            w.grad = None
            loss.backward()
        return loss

    opt = PlainGD([w], lr=0.1)
    loss = opt.step(bad)
    assert math.isnan(float(loss.detach()))
    assert torch.equal(w.detach(), torch.ones(3))
    assert opt.global_state["skipped_steps"] == 1
    strict = PlainGD([w], lr=0.1, on_nonfinite="raise")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        strict.step(bad)
    assert torch.equal(w.detach(), torch.ones(3))


def test_bad_input():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="invalid learning rate lr=-1"):
        PlainGD([w], lr=-1)
    with pytest.raises(ValueError, match="on_nonfinite must be one of skip, raise"):
        PlainGD([w], on_nonfinite="ignore")
    opt = PlainGD([w])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar loss.*shape \\(3,\\)"):
        opt.step(lambda backward=True: w * 2)
    with pytest.raises(TypeError, match="scalar loss tensor or float, got str"):
        opt.step(lambda backward=True: "loss")
