"""Lightning helper: closure_step in manual optimization follows a plain loop bit for bit
(ZOSGD with no backward pass, Sophia and AdaHessian which differentiate the loss themselves) and
keeps Lightning's step count; automatic optimization with such an optimizer is refused with a
message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

from anyorder.core import make_closure  # noqa: E402
from anyorder.integrations.lightning import (  # noqa: E402
    ClosureOptimizationCheck,
    check_optimization_mode,
    closure_step,
)
from anyorder.optim import SAM, ZOSGD, AdaHessian, Sophia  # noqa: E402

MAKERS = {
    "ZOSGD": lambda ps: ZOSGD(ps, lr=0.05, mu=1e-3, seed=4),
    "Sophia": lambda ps: Sophia(ps, lr=0.01, update_every=2, seed=1),  # refresh, then backward
    "AdaHessian": lambda ps: AdaHessian(ps, lr=0.05, seed=1),
    "SAM": lambda ps: SAM(ps, "SGD", rho=0.05, lr=0.1),
}


def tiny_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def toy_data(n: int = 32) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


class Manual(pl.LightningModule):
    def __init__(self, make, automatic: bool = False) -> None:
        super().__init__()
        self.net = tiny_net()
        self.make = make
        self.automatic_optimization = automatic
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return nn.functional.cross_entropy(self.net(x), y)
        loss = closure_step(self, self.optimizers(), lambda: nn.functional.cross_entropy(self.net(x), y))
        self.losses.append(float(loss))

    def configure_optimizers(self):
        return self.make(self.parameters())


def fit(module: pl.LightningModule, steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(toy_data(), batch_size=8, shuffle=False)
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("name", ["ZOSGD", "Sophia", "AdaHessian"])
def test_closure_step_follows_the_plain_loop(name, monkeypatch):
    backwards = []
    real = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backwards.append(1) or real(*a, **k))
    steps = 4
    module = Manual(MAKERS[name])
    trainer = fit(module, steps, [ClosureOptimizationCheck()])
    assert trainer.global_step == steps  # Lightning counted the optimizer steps
    lightning_backwards = len(backwards)

    net = tiny_net()
    opt = MAKERS[name](net.parameters())
    data = toy_data()
    for k in range(steps):
        batch = (data.tensors[0][8 * k : 8 * k + 8], data.tensors[1][8 * k : 8 * k + 8])
        opt.step(make_closure(net, nn.functional.cross_entropy, batch))
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert lightning_backwards == len(backwards) - lightning_backwards  # the same passes
    if name == "ZOSGD":
        assert lightning_backwards == 0
    if name == "Sophia":  # steps 1 and 3 went through manual_backward
        assert lightning_backwards == 2


@pytest.mark.parametrize("name", ["ZOSGD", "Sophia"])
def test_automatic_optimization_with_a_contract_optimizer_is_refused(name):
    module = Manual(MAKERS[name], automatic=True)
    with pytest.raises(ValueError, match="automatic_optimization = False") as err:
        fit(module, 1, [ClosureOptimizationCheck()])
    assert "closure_step" in str(err.value) and name in str(err.value)


def test_automatic_optimization_with_sam_passes_the_check_and_closure_step_needs_manual():
    module = Manual(MAKERS["SAM"], automatic=True)
    trainer = fit(module, 1, [ClosureOptimizationCheck()])
    assert trainer.global_step == 1
    check_optimization_mode(module)  # nothing to refuse
    with pytest.raises(ValueError, match="closure_step is for manual optimization"):
        closure_step(module, trainer.optimizers[0], lambda: torch.zeros(()))


@pytest.mark.parametrize(
    ("setting", "match"),
    [({"precision": "16-mixed", "world_size": 1}, "precision='16-mixed'"),
     ({"precision": "32-true", "world_size": 2}, "world_size=2")],
)  # fmt: skip
def test_closure_step_refuses_a_grad_scaler_and_several_processes(setting, match):
    """On a CPU Lightning turns 16-mixed into bf16-mixed, so the trainer is a stand-in here."""
    from types import SimpleNamespace

    module = Manual(MAKERS["ZOSGD"])
    module.trainer = SimpleNamespace(**setting)
    opt = MAKERS["ZOSGD"](module.parameters())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=match):
        closure_step(module, opt, lambda: module.net(torch.zeros(1, 6)).sum())
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))
