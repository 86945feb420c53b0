"""The optimizers ``anyorder bench`` knows. One ``register_optimizer`` call each.

Baselines from ``torch.optim``, driven through the closure contract (the runner passes a closure
and they call ``closure()``, i.e. ``backward=True``). Learning rates are the winners of a grid of
powers of ten (1e-5 ... 1) per task on the quick suite, by final training objective, made with
``python benchmarks/tune_lr.py`` (see BENCHMARKS.md); the other hyperparameters are torch's
defaults, with momentum 0.9 for SGD and weight decay 0.01 for AdamW. On ``text-finetune`` (too
slow for the grid) Adam/AdamW use 3e-5 (best of 2e-5, 3e-5, 5e-5, 1e-4 after 200 steps), SGD 1e-3
(better than 1e-2 after 100 steps), and the zeroth-order methods a middle value from a grid on
which none moved in 100 steps (see BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from anyorder.bench.registry import register_optimizer
from anyorder.optim import ZOSGD, ZOAdam

register_optimizer(
    "sgd",
    torch.optim.SGD,
    requires={"gradients"},
    defaults={"lr": 0.1, "momentum": 0.9},
    task_defaults={
        "rosenbrock": {"lr": 1e-3},
        "rastrigin": {"lr": 1e-3},
        "text-finetune": {"lr": 1e-3},
    },
    description="torch.optim.SGD with heavy-ball momentum 0.9",
)
register_optimizer(
    "adam",
    torch.optim.Adam,
    requires={"gradients"},
    defaults={"lr": 1e-2, "foreach": True},
    task_defaults={
        "char-lm": {"lr": 1e-3},
        "rastrigin": {"lr": 1e-2},
        "rosenbrock": {"lr": 1.0},
        "text-finetune": {"lr": 3e-5},
    },
    description="torch.optim.Adam (Kingma & Ba, 2015)",
)
register_optimizer(
    "adamw",
    torch.optim.AdamW,
    requires={"gradients"},
    defaults={"lr": 1e-2, "weight_decay": 0.01, "foreach": True},
    task_defaults={
        "char-lm": {"lr": 1e-3},
        "rastrigin": {"lr": 0.1},
        "rosenbrock": {"lr": 0.1},
        "text-finetune": {"lr": 3e-5},
    },
    description="torch.optim.AdamW, decoupled weight decay (Loshchilov & Hutter, 2019)",
)

# Zeroth-order (issue 3): value-only, so they also run on every task. Learning rates from the same
# grid (benchmarks/tune_lr.py --optimizers zo-sgd,zo-adam).
register_optimizer(
    "zo-sgd",
    ZOSGD,
    requires={"values"},
    defaults={"lr": 1e-2, "mu": 1e-3},
    task_defaults={
        "breast-cancer-logreg": {"lr": 0.1},
        "char-lm": {"lr": 1e-3},
        "rastrigin": {"lr": 1e-3},
        "rosenbrock": {"lr": 1e-4},
        "text-finetune": {"lr": 1e-4},
    },
    description="MeZO / ZO-SGD: SGD on the two-point SPSA estimate (anyorder.optim.ZOSGD)",
)
register_optimizer(
    "zo-adam",
    ZOAdam,
    requires={"values"},
    defaults={"lr": 1e-2, "mu": 1e-3},
    task_defaults={
        "breast-cancer-logreg": {"lr": 0.1},
        "rosenbrock": {"lr": 0.1},
        "text-finetune": {"lr": 1e-5},
    },
    description="ZO-Adam: the Adam rule on the SPSA estimate (anyorder.optim.ZOAdam)",
)
