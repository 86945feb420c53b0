"""One protocol for evaluations a counter around the loss cannot see (issue 13)."""

import torch
import torch.nn.functional as F

from anyorder.bench.measure import EvalCounter
from anyorder.bench.runner import _backward_count, _forward_count
from anyorder.core import make_closure
from anyorder.optim import CBO, ZOSGD, Sophia


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])
    return model, x, y


def test_every_optimizer_reports_uncounted_evaluations_the_same_way():
    model, x, y = _setup()
    for opt, per_step in (
        (CBO(model.parameters(), n_particles=4), (5, 0)),  # 4 particles + the current point
        (ZOSGD(model.parameters(), lr=0.1), (2, 0)),
        (Sophia(model.parameters(), update_every=1), (1, 2)),  # + 1 double-backward product
    ):
        counter = EvalCounter()
        loss_fn = counter.wrap(F.cross_entropy)
        for _ in range(3):
            opt.step(make_closure(model, loss_fn, (x, y)))
        assert set(opt.uncounted_evaluations) == {"forward", "backward"}
        assert _forward_count(opt, counter) == 3 * per_step[0], type(opt).__name__
        assert _backward_count(opt, counter) == 3 * per_step[1], type(opt).__name__
