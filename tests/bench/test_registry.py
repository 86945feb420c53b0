"""Registries: built-ins, one-line registration, applicability, unknown names."""

import pytest
import torch

from anyorder.bench import registry
from anyorder.bench.registry import (
    UnknownNameError,
    all_optimizers,
    all_tasks,
    get_optimizer,
    get_task,
    register_optimizer,
)
from anyorder.bench.runner import plan_suite


@pytest.fixture
def scratch_registry(monkeypatch):
    all_optimizers()
    monkeypatch.setattr(registry, "OPTIMIZERS", dict(registry.OPTIMIZERS))
    return registry.OPTIMIZERS


def test_builtins_are_registered():
    assert {"sgd", "adam", "adamw"} <= set(all_optimizers())
    assert {"digits-mlp", "breast-cancer-logreg", "char-lm", "rosenbrock", "rastrigin"} <= set(
        all_tasks()
    )


def test_one_line_registration_puts_an_optimizer_in_the_bench(scratch_registry):
    register_optimizer("rmsprop", torch.optim.RMSprop, defaults={"lr": 1e-3})
    plan = plan_suite(tasks=["rosenbrock"], optimizers=["rmsprop"], steps=2)
    assert [(r.task.name, r.spec.name) for r in plan] == [("rosenbrock", "rmsprop")]
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("rmsprop", torch.optim.RMSprop)


def test_requirements_decide_which_tasks_an_optimizer_applies_to(scratch_registry):
    register_optimizer("vector-only", torch.optim.SGD, requires={"vector"}, defaults={"lr": 1e-3})
    plan = plan_suite(tasks=["digits-mlp", "rastrigin"], optimizers=["vector-only", "sgd"], steps=1)
    pairs = {(r.task.name, r.spec.name) for r in plan}
    assert pairs == {("digits-mlp", "sgd"), ("rastrigin", "sgd"), ("rastrigin", "vector-only")}


def test_hyperparameter_precedence():
    spec = get_optimizer("sgd")
    assert spec.hyperparameters("digits-mlp")["lr"] == spec.defaults["lr"]
    assert spec.hyperparameters("rosenbrock")["lr"] == spec.task_defaults["rosenbrock"]["lr"]
    assert spec.hyperparameters("rosenbrock", {"lr": 0.5})["lr"] == 0.5


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        get_task("mnist")
    assert str(err.value).startswith("unknown task 'mnist'; valid tasks: ")
    assert "digits-mlp" in str(err.value)
    with pytest.raises(
        UnknownNameError, match="unknown optimizer 'sgdd'; valid optimizers: .*adam"
    ):
        get_optimizer("sgdd")
