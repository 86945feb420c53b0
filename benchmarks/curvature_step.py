"""Time per step of the curvature- and sharpness-aware optimizers against AdamW and against
pytorch-optimizer's implementations of the same methods, side by side in one run.

Usage: python benchmarks/curvature_step.py [--models digits-mlp,char-lm,char-lm-eager]
                                           [--rounds 15] [--threads 2] [--no-peers]
                                           [--clock wall|cpu]

Every method trains its own copy of the same model on the same batches, driven by the same
hand-written closure (``closure(backward=True)``: zero the gradients, loss, backward; for
Sophia-G it returns ``(loss, logits)``, which pytorch-optimizer has no counterpart for), so that
the figures compare optimizers, not closure helpers (``adamw-helper`` times AdamW through
:func:`anyorder.core.make_closure`, as ``anyorder bench`` drives it). Methods are timed
interleaved round-robin (each round runs ``--block`` = 10 consecutive steps of every method, so
Sophia's one Hessian refresh per 10 steps is included in every block) and the figure is the
median over rounds of the mean step time in the block, reported as a ratio to
``torch.optim.AdamW(foreach=True)`` timed the same way. Our optimizers (and AdamW) are
driven through ``opt.step(closure)``; pytorch-optimizer's through their documented loops
(``loss.backward(create_graph=True); opt.step()`` for SophiaH and AdaHessian, ``closure();
opt.step(closure)`` for SAM, ``loss.backward(); opt.step()`` for Lion and DiffGrad).

Models: the bench's ``digits-mlp`` MLP (batch 64) and ``char-lm`` GPT-2 (batch 16 x 64) with
``transformers``' default attention (SDPA, no double backward on the CPU: our Sophia and
AdaHessian fall back to finite-difference Hessian-vector products; pytorch-optimizer's SophiaH
and AdaHessian cannot run there), and ``char-lm-eager``, the same GPT-2 with eager attention,
where both run. Hyperparameters are equal across implementations: Sophia k=10, Hutchinson with
one Rademacher probe; AdaHessian k=1; SAM rho=0.05 around SGD(momentum 0.9); Lion and DiffGrad
with their defaults.

``--clock cpu`` measures the process's CPU time (``time.process_time``) instead of wall time:
on a machine shared with other jobs, wall times of a few milliseconds swing by 10x with the
others' load, while CPU time with ``--threads 1`` counts only this process's work.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from anyorder.bench.registry import get_task
from anyorder.core import make_closure
from anyorder.curvature import CurvatureFallbackWarning
from anyorder.optim import SAM, AdaHessian, DiffGrad, Lion, Sophia


def build(name: str):
    """(task, model factory, batches)."""
    task_name = "char-lm" if name.startswith("char-lm") else name
    task = get_task(task_name)()
    stream = task.batches(torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(4)]

    def model_factory():
        model = task.init_model(0)
        if name == "char-lm-eager":
            model.config._attn_implementation = "eager"
            for module in model.modules():
                if hasattr(module, "config") and module is not model:
                    module.config._attn_implementation = "eager"
        return model

    return task, model_factory, batches


def contract_closure(task, model, batch, with_logits: bool = False):
    """A hand-written contract closure: what a user writes, and what the peers' loops do.
    With ``with_logits`` it returns ``(loss, logits)`` (for Sophia-G)."""

    def closure(backward: bool = True):
        loss, logits = task.loss_and_logits(model, batch)
        if backward:
            model.zero_grad(set_to_none=True)
            loss.backward()
        return (loss, logits) if with_logits else loss

    return closure


def ours(cls, helper: bool = False, with_logits: bool = False, **kw) -> Callable:
    def make(task, model):
        opt = cls(model.parameters(), **kw)

        def step(batch):
            if helper:
                opt.step(make_closure(model, lambda out, b: out, batch, forward=task.loss))
            else:
                opt.step(contract_closure(task, model, batch, with_logits))

        return step

    return make


def peer_plain(cls_name: str, create_graph: bool = False, **kw) -> Callable:
    def make(task, model):
        import pytorch_optimizer as po

        opt = getattr(po, cls_name)(model.parameters(), **kw)

        def step(batch):
            opt.zero_grad(set_to_none=True)
            loss = task.loss_and_logits(model, batch)[0]
            loss.backward(create_graph=create_graph)
            opt.step()
            if create_graph:
                opt.zero_grad(set_to_none=True)  # drop the graph the gradients hold

        return step

    return make


def peer_sam(**kw) -> Callable:
    def make(task, model):
        import pytorch_optimizer as po

        opt = po.SAM(model.parameters(), torch.optim.SGD, **kw)

        def step(batch):
            def closure():
                opt.zero_grad()
                loss = task.loss_and_logits(model, batch)[0]
                loss.backward()
                return loss

            closure()
            opt.step(closure)

        return step

    return make


def methods(peers: bool, model_name: str) -> dict[str, Callable]:
    lr = 1e-4
    out = {
        "adamw": ours(torch.optim.AdamW, lr=lr, foreach=True),
        "adamw-helper": ours(torch.optim.AdamW, helper=True, lr=lr, foreach=True),
        "sophia": ours(Sophia, lr=lr, update_every=10, weight_decay=0.0),
        "sophia-g": ours(
            Sophia, with_logits=True, lr=lr, update_every=10, weight_decay=0.0, estimator="gnb"
        ),
        "adahessian": ours(AdaHessian, lr=lr),
        "sam": ours(SAM, base_optimizer=torch.optim.SGD, lr=lr, momentum=0.9, rho=0.05),
        "lion": ours(Lion, lr=lr),
        "diffgrad": ours(DiffGrad, lr=lr),
    }
    if peers:
        hessian_ok = model_name != "char-lm"
        if hessian_ok:
            out["po-sophiah"] = peer_plain(
                "SophiaH",
                create_graph=True,
                lr=lr,
                update_period=10,
                hessian_distribution="rademacher",
            )
            out["po-adahessian"] = peer_plain("AdaHessian", create_graph=True, lr=lr)
        out["po-sam"] = peer_sam(lr=lr, momentum=0.9, rho=0.05)
        out["po-lion"] = peer_plain("Lion", lr=lr)
        out["po-diffgrad"] = peer_plain("DiffGrad", lr=lr)
    return out


def measure(
    model_name: str, rounds: int, block: int, peers: bool, clock: Callable[[], float]
) -> dict[str, float]:
    task, model_factory, batches = build(model_name)
    runners = {}
    for name, make in methods(peers, model_name).items():
        runners[name] = make(task, model_factory())
    times: dict[str, list[float]] = {name: [] for name in runners}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureFallbackWarning)
        for step in runners.values():  # warm-up: first refresh, allocations, fallback
            for b in batches[:2]:
                step(b)
        for _ in range(rounds):
            for name, step in runners.items():
                t0 = clock()
                for k in range(block):
                    step(batches[k % len(batches)])
                times[name].append((clock() - t0) / block)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-mlp,char-lm,char-lm-eager")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = not args.no_peers
    if peers:
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            print("pytorch-optimizer not installed: pip install --no-deps pytorch-optimizer")
            peers = False
    pairs = {
        "sophia": "po-sophiah",
        "adahessian": "po-adahessian",
        "sam": "po-sam",
        "lion": "po-lion",
        "diffgrad": "po-diffgrad",
    }
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of "
        f"{args.block} steps, {args.clock} clock"
    )
    for model_name in args.models.split(","):
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        result = measure(model_name, args.rounds, args.block, peers, clock)
        base = result["adamw"]
        print(
            f"\n{model_name}: AdamW(foreach) {base * 1e3:.2f} ms/step "
            f"({result['adamw-helper'] / base:.2f}x through make_closure)"
        )
        print(
            f"{'method':12s} {'ms/step':>9s} {'x AdamW':>8s} {'peer x AdamW':>13s} "
            f"{'ours / peer':>12s}"
        )
        for name in ("sophia", "sophia-g", "adahessian", "sam", "lion", "diffgrad"):
            peer = result.get(pairs.get(name, ""))
            peer_ratio = f"{peer / base:13.2f}" if peer is not None else f"{'n/a':>13s}"
            ours_vs = f"{result[name] / peer:12.2f}" if peer is not None else f"{'n/a':>12s}"
            print(
                f"{name:12s} {result[name] * 1e3:9.2f} {result[name] / base:8.2f} "
                f"{peer_ratio} {ours_vs}"
            )


if __name__ == "__main__":
    main()
