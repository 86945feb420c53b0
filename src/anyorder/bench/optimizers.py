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
from anyorder.optim import (
    CBO,
    MFAC,
    SAM,
    ZOSGD,
    AdaHessian,
    DiffGrad,
    HybridZO,
    Lion,
    Sophia,
    ZOAdam,
)

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
        "text-finetune": {"lr": 3e-5},  # from the task-aligned start (issue 14), see below
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

# Consensus-based optimization (issue 6): a swarm of parameter vectors, so only on tasks where
# evaluating a population is affordable ("population"). Hyperparameters from a small hand grid per
# task (alpha in 1e3..1e6, sigma in 0.8..1.6, init_std in 0.1..3; 300-500 steps, seed 0): a large
# alpha on the classifiers, whose particles' losses differ by little; sigma just under sqrt(2 lam),
# where the anisotropic swarm neither explodes nor collapses early; the function-minimisation
# settings of anyorder.cbo.minimize on Rastrigin.
register_optimizer(
    "cbo",
    CBO,
    requires={"values", "population"},
    defaults={"lr": 0.1, "n_particles": 32, "alpha": 1e5, "sigma": 1.4, "init_std": 0.1},
    task_defaults={
        "rastrigin": {
            "n_particles": 100,
            "batch_size": 5,
            "alpha": 10.0,
            "alpha_factor": 1.005,
            "sigma": 0.8,
            "init_std": 3.0,
        },
        "rosenbrock": {"n_particles": 100, "sigma": 1.0, "init_std": 0.5},
    },  # fmt: skip
    description="Consensus-based optimization: particles drift to a softmin-weighted consensus",
)

# ---------------------------------------------------------------------------------------------
# Curvature- and sharpness-aware optimizers (issue 4). Learning rates per task: on digits-mlp and
# breast-cancer-logreg the winners of the grid of powers of ten 1e-5 ... 1 by final training
# objective after the quick suite's steps (benchmarks/curvature_lr_grid.py: the tune_lr.py
# protocol without the runner's measurements); on char-lm the best of a half-decade grid of four
# or more values after 100 steps, extended until the winner was inside it
# (benchmarks/curvature_lr_grid.py --tasks char-lm --steps 100 --grid ...); on rosenbrock and
# rastrigin the winners of the full grid (benchmarks/tune_lr.py --optimizers sophia,adahessian,
# sam,lion,diffgrad,mfac --tasks rosenbrock,rastrigin). See BENCHMARKS.md. sophia-g on
# text-finetune: the best of {1e-5, 3e-5, 1e-4, 3e-4} after 100 steps.
# "sophia" uses the Hutchinson estimator; on char-lm its Hessian-vector products fall back to
# finite differences (the default attention has no double backward on the CPU) with a warning.
# "sophia-g" uses the Gauss-Newton-Bartlett estimator, which needs the logits: it runs on the
# tasks that provide "logits" (the classifiers; the runner's closure then returns (loss, logits))
# and is skipped on the function tasks. It needs no double backward, so it runs on every model.

register_optimizer(
    "sophia",
    Sophia,
    requires={"gradients"},
    defaults={"lr": 1e-3, "rho": 0.04, "weight_decay": 0.01, "update_every": 10},
    task_defaults={
        "digits-mlp": {"lr": 1e-2},
        "breast-cancer-logreg": {"lr": 1e-2},
        "char-lm": {"lr": 3e-4},
        "rosenbrock": {"lr": 0.1},
        "rastrigin": {"lr": 0.1},
    },
    description="Sophia-H (Liu et al., 2023): clipped gradient EMA over Hutchinson Hessian EMA",
)
register_optimizer(
    "sophia-g",
    Sophia,
    requires={"gradients", "logits"},
    defaults={
        "lr": 1e-3,
        "rho": 0.04,
        "weight_decay": 0.01,
        "update_every": 10,
        "estimator": "gnb",
    },
    task_defaults={
        "digits-mlp": {"lr": 1e-2},
        "breast-cancer-logreg": {"lr": 1e-2},
        "char-lm": {"lr": 1e-3},
        "text-finetune": {"lr": 3e-5},
    },
    description="Sophia-G (Liu et al., 2023): Sophia with the Gauss-Newton-Bartlett estimator",
)
register_optimizer(
    "adahessian",
    AdaHessian,
    requires={"gradients"},
    defaults={"lr": 0.15},
    task_defaults={
        "digits-mlp": {"lr": 0.1},
        "breast-cancer-logreg": {"lr": 0.1},
        "char-lm": {"lr": 0.1},
        "rosenbrock": {"lr": 1.0},
        "rastrigin": {"lr": 1.0},
    },
    description="AdaHessian (Yao et al., 2021): Adam with a Hutchinson Hessian diagonal",
)
register_optimizer(
    "sam",
    SAM,
    requires={"gradients"},
    defaults={"base_optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "rho": 0.05},
    task_defaults={
        "digits-mlp": {"lr": 0.1},
        "breast-cancer-logreg": {"lr": 0.1},
        "char-lm": {"lr": 0.1},
        "rosenbrock": {"lr": 1e-3},
        "rastrigin": {"lr": 1e-5},
    },
    description="SAM (Foret et al., 2021) around SGD with momentum 0.9",
)
register_optimizer(
    "lion",
    Lion,
    requires={"gradients"},
    defaults={"lr": 1e-4, "weight_decay": 0.1},
    task_defaults={
        "digits-mlp": {"lr": 1e-2},
        "breast-cancer-logreg": {"lr": 1e-2},
        "char-lm": {"lr": 1e-3},
        "rosenbrock": {"lr": 1e-2},
        "rastrigin": {"lr": 1e-2},
    },
    description="Lion (Chen et al., 2023): sign of interpolated momentum",
)
register_optimizer(
    "diffgrad",
    DiffGrad,
    requires={"gradients"},
    defaults={"lr": 1e-3},
    task_defaults={
        "digits-mlp": {"lr": 0.1},
        "breast-cancer-logreg": {"lr": 0.1},
        "char-lm": {"lr": 3e-3},
        "rosenbrock": {"lr": 1.0},
        "rastrigin": {"lr": 0.1},
    },
    description="diffGrad (Dubey et al., 2019): Adam with a gradient-change friction term",
)
register_optimizer(
    "mfac",
    MFAC,
    requires={"gradients"},
    defaults={"lr": 1e-3, "m": 32, "damping": 1e-4},
    task_defaults={
        "digits-mlp": {"lr": 1e-2},
        "breast-cancer-logreg": {"lr": 1e-2},
        "char-lm": {"lr": 1e-2},
        "rosenbrock": {"lr": 1e-5},
        "rastrigin": {"lr": 0.1},
    },
    description="M-FAC (Frantar et al., 2021): inverse empirical Fisher of the last m gradients",
)

# ---------------------------------------------------------------------------------------------
# Zeroth-order fine-tuning from a task-aligned start (issue 14), on tasks whose model is an
# encoder plus a head (they provide "encoder-head": text-finetune). "zo-lora" injects LoRA adapters
# (r 8, alpha 16, on the attention's query and value; anyorder.integrations.add_lora, needs peft)
# into the model and trains them and the head with ZO-SGD (eps 1e-2, MeZO's LoRA setting);
# "hybrid-zo" trains the encoder with ZO-SGD and the head with its exact gradient (HybridZO).
# Learning rates (BENCHMARKS.md, "Zeroth-order fine-tuning from a task-aligned start"), chosen on
# the task's validation reviews with benchmarks/text_finetune_zo.py, never on the held-out ones:
# zo-sgd 3e-5 with eps 1e-3 (the setting; 1e-4 was behind it on validation after 100
# steps); hybrid-zo 3e-5 for the encoder, 3e-3 for the head; zo-lora 1e-4 with eps 1e-2 is MeZO's
# LoRA setting, not tuned here (1e-3 lowered the validation accuracy in 100 steps).


def _lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from anyorder.integrations import add_lora

    return add_lora(model, target_modules=["query", "value"], r=8, alpha=16.0, also_train=["head"])


def _hybrid_groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": model.encoder.parameters()},
        {"params": model.head.parameters(), "order": 1},
    ]


register_optimizer(
    "zo-lora",
    ZOSGD,
    requires={"values", "encoder-head"},
    defaults={"lr": 1e-4, "mu": 1e-2},
    params=_lora_params,
    description="ZO-SGD on LoRA adapters (peft) and the head; every other weight frozen",
)
register_optimizer(
    "hybrid-zo",
    HybridZO,
    requires={"values", "gradients", "encoder-head"},
    defaults={"lr": 3e-5, "mu": 1e-3, "exact_lr": 3e-3},
    params=_hybrid_groups,
    description="ZO-SGD on the encoder + the head's exact gradient, in one step (HybridZO)",
)
