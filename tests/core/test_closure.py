"""The closure contract and make_closure's dropout / batch-norm policy."""

import pytest
import torch
from torch import nn

from anyorder.core.closure import accepts_backward, call_closure, has_active_dropout, make_closure


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def test_backward_zeroes_grads_before_accumulating():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    batch = _batch()
    closure = make_closure(model, nn.functional.mse_loss, batch)
    closure()
    first = model.weight.grad.clone()
    closure()  # a second call must not double the gradient
    assert torch.equal(model.weight.grad, first)
    expected = torch.autograd.grad(nn.functional.mse_loss(model(batch[0]), batch[1]), model.weight)[
        0
    ]
    assert torch.allclose(first, expected)


def test_backward_false_leaves_grads_alone():
    model = nn.Linear(4, 1)
    closure = make_closure(model, nn.functional.mse_loss, _batch())
    loss = closure(backward=False)
    assert model.weight.grad is None
    assert loss.ndim == 0


def test_dropout_masks_repeat_within_a_closure_and_rng_advances_once():
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    batch = _batch()
    state = torch.get_rng_state()
    closure = make_closure(model, nn.functional.mse_loss, batch)
    with torch.no_grad():
        losses = [float(closure(backward=False)) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    after_closure = torch.get_rng_state()
    # One plain forward from the same state draws the same mask and leaves the same state.
    torch.set_rng_state(state)
    with torch.no_grad():
        plain = float(nn.functional.mse_loss(model(batch[0]), batch[1]))
    assert plain == losses[0]
    assert torch.equal(after_closure, torch.get_rng_state())
    # The next batch's closure sees a fresh mask.
    with torch.no_grad():
        fresh = float(make_closure(model, nn.functional.mse_loss, batch)(backward=False))
    assert fresh != losses[0]


def test_batchnorm_running_stats_update_once_per_closure():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    bn = model[1]
    batch = _batch()
    closure = make_closure(model, nn.functional.mse_loss, batch)
    closure(backward=False)
    mean_once = bn.running_mean.clone()
    count_once = int(bn.num_batches_tracked)
    closure(backward=False)
    closure(backward=True)
    assert torch.equal(bn.running_mean, mean_once)
    assert int(bn.num_batches_tracked) == count_once == 1


def test_call_closure_accepts_plain_closures():
    calls = []

    def plain():
        calls.append("plain")
        return torch.tensor(1.0)

    def contract(backward=True):
        calls.append(backward)
        return torch.tensor(2.0)

    assert not accepts_backward(plain) and accepts_backward(contract)
    assert float(call_closure(plain, backward=False)) == 1.0
    assert float(call_closure(contract, backward=False)) == 2.0
    assert calls == ["plain", False]


def test_bad_input():
    with pytest.raises(ValueError, match="needs a closure"):
        call_closure(None, backward=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        make_closure(lambda x: x, nn.functional.mse_loss, _batch())
    closure = make_closure(nn.Linear(4, 1), nn.functional.mse_loss, torch.zeros(3))
    with pytest.raises(TypeError, match=r"\(inputs, target\) pair"):
        closure()


def test_models_without_dropout_skip_the_rng_replay_and_custom_randomness_can_ask_for_it():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x) + torch.randn(x.shape[0], 1)

    model = Noisy()
    batch = _batch()
    auto = make_closure(model, nn.functional.mse_loss, batch)
    with torch.no_grad():
        assert float(auto(backward=False)) != float(auto(backward=False))
    replay = make_closure(model, nn.functional.mse_loss, batch, replay_rng=True)
    with torch.no_grad():
        assert float(replay(backward=False)) == float(replay(backward=False))
    dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    assert has_active_dropout(dropout) and not has_active_dropout(dropout.eval())


def test_accepts_backward_answers_by_signature_also_from_its_cache():
    import functools

    from anyorder.core.closure import accepts_backward

    def make(with_arg):
        if with_arg:

            def closure(backward=True):
                return backward

        else:

            def closure():
                return None

        return closure

    for _ in range(3):  # same code objects, cached answers stay right
        assert accepts_backward(make(True)) and not accepts_backward(make(False))

    def target(backward=True):
        return backward

    def plain():
        return None

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            return fn(*args)

        return wrapper

    # one wrapper code, two targets: the answer follows the target, never a cached guess
    assert accepts_backward(decorate(target)) and not accepts_backward(decorate(plain))
    assert accepts_backward(lambda **kw: None) and not accepts_backward(lambda: None)
