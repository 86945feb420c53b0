"""anyorder.hessian against PyHessian and hessian-eigenthings, side by side in one run.

Same model, same data (the whole digits training set as one batch, float32), same thread count:
top-1 eigenvalue, top-5 eigenvalues, trace and SLQ density; errors against a float64 reference
(Lanczos to 1e-10 for eigenvalues; the exact trace of a ReLU network from per-sample Jacobians),
ratios of expected wall time: eigenvalues over 5 (top-1) and 3 (top-5) start seeds, each seed's
median of ``--repeats`` runs, averaged over seeds (PyHessian's product count varies with the
seed); traces averaged over ``--trace-seeds`` seeds, with root-mean-square relative errors. Then
the cost of ``HessianMonitor`` at its default interval as a fraction of training time
(digits-mlp task, SGD).

    python benchmarks/hessian_vs_pyhessian.py [--models mlp cnn] [--no-monitor] [--repeats 3]
        [--trace-seeds 10] [--trace99-seeds 10] [--threads 2] [--json out.json]

    # the top-1 eigenvalue only, at several tolerances, on all four models (issue 13)
    python benchmarks/hessian_vs_pyhessian.py --models mlp cnn gelu tanh \
        --top1-tols 1e-4 1e-3 1e-2 3e-2 1e-1 --seeds 5 --repeats 3

Peers are benchmark-only: ``pip install --no-deps pyhessian hessian-eigenthings``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyorder.hessian import Hessian, HessianMonitor, density, eigenvalues, trace


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from anyorder.bench.tasks.digits_mlp import load_digits_split

    x, y, _, _ = load_digits_split()
    return x, y


def mlp() -> nn.Module:
    torch.manual_seed(0)  # benchmark script: fixed initial weights
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(x.flatten(1))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def gelu_mlp() -> nn.Module:
    """A third model (issue 13), not one the stop rule was tuned on: deeper, GELU, 47,114
    parameters; its top eigenvalues form a tight cluster (the second is 0.985 of the first)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 160), nn.GELU(), nn.Linear(160, 160), nn.GELU(), nn.Linear(160, 64),
        nn.GELU(), nn.Linear(64, 10),
    )  # fmt: skip


def tanh_mlp() -> nn.Module:
    """A fourth model (issue 13): 64-200-150-10, tanh, 44,660 parameters."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 150), nn.Tanh(), nn.Linear(150, 10)
    )


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.na, self.nb = nn.BatchNorm2d(c, momentum=None), nn.BatchNorm2d(c, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.nb(self.b(F.relu(self.na(self.a(x))))))


class ResBNCNN(nn.Module):
    """A residual CNN with BatchNorm: conv 1-16, BN, one residual block of two 16-channel convs
    with BN, max-pool, linear; 7,466 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None)
        self.block = _ResBlock(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.stem(x.view(-1, 1, 8, 8))))
        return self.fc(F.max_pool2d(self.block(x), 2).flatten(1))


def resbn_cnn() -> nn.Module:
    """A fifth model (issue 13), not one the stop rule was chosen on: :class:`ResBNCNN` at
    initialisation, its BatchNorm running statistics taken over the digits training split (one
    pass in train mode, cumulative average); analysed in eval mode, as PyHessian does."""
    torch.manual_seed(2)
    model = ResBNCNN()
    x, _ = digits()
    model.train()
    with torch.no_grad():
        model(x)
    return model


class ResMLP(nn.Module):
    """64-128, one residual block of two 128-128 linear layers with SiLU, 128-10; 42,634
    parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(x))
        h = F.silu(h + self.b(F.silu(self.a(h))))
        return self.out(h)


def trained_resmlp() -> nn.Module:
    """A sixth model (issue 13), not one the stop rule was chosen on, and trained (the other
    five are at initialisation): :class:`ResMLP` after 300 SGD steps (lr 0.05, momentum 0.9,
    batches of 64 drawn from a fixed generator) on the digits training split."""
    torch.manual_seed(3)
    model = ResMLP()
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model


def hvp_costs(model: nn.Module, batch: Any, repeats: int) -> dict[str, float]:
    """Milliseconds per Hessian-vector product on the whole batch, the ways interleaved, each the
    median of ``repeats`` rounds of 5 products: anyorder's ``Hessian.matvec`` (reverse over
    reverse on a cached gradient graph), PyHessian's ``hessian_vector_product`` on its own
    ``backward(create_graph=True)`` graph, forward over reverse by ``torch.func.jvp`` of
    ``torch.func.grad`` and by ``torch.autograd.forward_ad`` (no graph to reuse: a forward and a
    backward pass with tangents per product); also the one-off graph building of the first two."""
    import torch.autograd.forward_ad as fwAD
    from pyhessian.utils import hessian_vector_product
    from torch.func import functional_call, grad, jvp

    model.eval()
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    detached = {n: p.detach() for n, p in zip(names, params)}
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    flat = torch.cat([t.reshape(-1) for t in v])

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grad_fn = grad(loss_of)

    def forward_ad() -> list[torch.Tensor]:
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(detached[n], t).requires_grad_() for n, t in zip(names, v)}
            g = torch.autograd.grad(loss_of(dual), list(dual.values()))
            return [fwAD.unpack_dual(t).tangent for t in g]

    def build_ours() -> Any:
        op = Hessian(model, F.cross_entropy, batch)
        op.gradient()  # builds and caches the graph, as eigenvalues' start does
        return op

    def build_pyhessian() -> Any:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward(create_graph=True)
        return [p.grad for p in params]

    op, grads_h = build_ours(), build_pyhessian()
    reference = torch.cat([t.reshape(-1) for t in hessian_vector_product(grads_h, params, v)])
    ways: dict[str, Callable[[], Any]] = {
        "anyorder matvec": lambda: op.matvec(flat),
        "pyhessian hvp": lambda: hessian_vector_product(grads_h, params, v),
        "torch.func jvp(grad)": lambda: jvp(grad_fn, (detached,), (dict(zip(names, v)),)),
        "forward_ad over backward": forward_ad,
    }
    try:
        check = torch.cat([t.reshape(-1) for t in forward_ad()])
        agree: float | None = float((check - reference).norm() / reference.norm())
    except NotImplementedError as err:  # e.g. silu_backward has no forward derivative
        print(f"forward_ad: {str(err).splitlines()[0]}")
        del ways["forward_ad over backward"]
        agree = None
    times: dict[str, list[float]] = {k: [] for k in ways}
    setup: dict[str, list[float]] = {"anyorder graph": [], "pyhessian graph": []}
    for _ in range(repeats):
        for label, run in ways.items():
            t0 = time.perf_counter()
            for _ in range(5):
                run()
            times[label].append((time.perf_counter() - t0) / 5)
        for label, build in (("anyorder graph", build_ours), ("pyhessian graph", build_pyhessian)):
            t0 = time.perf_counter()
            built = build()
            setup[label].append(time.perf_counter() - t0)
            if label == "anyorder graph":
                op = built
            else:
                grads_h = built
    for p in params:
        p.grad = None
    model.train()
    out = {k: 1e3 * statistics.median(t) for k, t in {**times, **setup}.items()}
    base = out["pyhessian hvp"]
    print("   ".join(f"{k} {ms:.1f} ms ({ms / base:.2f}x)" for k, ms in out.items()), flush=True)
    if agree is not None:
        print(f"forward_ad vs reverse over reverse: rel. difference {agree:.1e}", flush=True)
    return {**out, "forward_ad_rel_diff": agree}


def top1_sweep(
    model: nn.Module, batch: Any, tols: list[float], seeds: int, repeats: int
) -> list[dict[str, Any]]:
    """Top-1 eigenvalue only: PyHessian (its defaults) against ``eigenvalues(op, 1, tol=t)`` for
    every ``t`` in ``tols`` with the default start, interleaved seed by seed; expected times
    (mean over seeds of each seed's median), errors against a float64 reference (Lanczos to
    1e-11), products."""
    import importlib

    from pyhessian import hessian as PyHessian

    m64 = copy.deepcopy(model).double()
    truth = eigenvalues(
        Hessian(m64, F.cross_entropy, (batch[0].double(), batch[1])), 1, tol=1e-11, max_iter=400
    ).eigenvalues[0]
    module = importlib.import_module("pyhessian.hessian")
    original, calls = module.hessian_vector_product, [0]

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    def pyhessian(seed: int) -> tuple[float, int]:
        for p in model.parameters():
            p.grad = None
        calls[0] = 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            values = PyHessian(model, F.cross_entropy, data=batch, cuda=False).eigenvalues(top_n=1)
        model.train()
        return float(values[0][0]), calls[0]

    def ours(seed: int, tol: float) -> tuple[float, int]:
        spec = eigenvalues(Hessian(model, F.cross_entropy, batch), 1, tol=tol, seed=seed)
        return spec.eigenvalues[0], spec.matvecs

    configs: dict[str, Callable[[int], tuple[float, int]]] = {"pyhessian": pyhessian}
    for tol in tols:
        configs[f"anyorder tol={tol:g}"] = lambda s, tol=tol: ours(s, tol)
    times = {c: [] for c in configs}
    errors = {c: [] for c in configs}
    products = {c: [] for c in configs}
    module.hessian_vector_product = counted
    try:
        for seed in range(seeds):
            per = {c: [] for c in configs}
            for r in range(repeats):
                for label, run in configs.items():
                    t0 = time.perf_counter()
                    value, used = run(seed)
                    per[label].append(time.perf_counter() - t0)
                    if r == 0:
                        errors[label].append(rel(value, truth))
                        products[label].append(used)
            for label in configs:
                times[label].append(statistics.median(per[label]))
    finally:
        module.hessian_vector_product = original
    base = statistics.mean(times["pyhessian"])
    rows = []
    for label in configs:
        s = statistics.mean(times[label])
        rows.append({
            "library": label, "s": s, "vs_pyhessian": s / base, "truth": truth,
            "rel_err": statistics.median(errors[label]), "max_rel_err": max(errors[label]),
            "matvecs": products[label],
        })  # fmt: skip
        print(
            f"{label:24s} {s:7.3f} s  x{s / base:.2f}  rel err {rows[-1]['rel_err']:.1e} / "
            f"{rows[-1]['max_rel_err']:.1e}  products {products[label]}",
            flush=True,
        )
    return rows


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def reference(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    m64 = copy.deepcopy(model).double()
    b64 = (batch[0].double(), batch[1])
    op = Hessian(m64, F.cross_entropy, b64)
    top = eigenvalues(op, 5, tol=1e-10, max_iter=1000)
    tr = relu_net_trace(m64, b64)
    return {"top": list(top.eigenvalues), "trace": tr, "converged": top.converged}


def relu_net_trace(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The exact Hessian trace of a ReLU/max-pool network under cross-entropy.

    The network output is piecewise linear in each single parameter, so the Hessian's diagonal
    equals the Gauss-Newton diagonal: ``tr H = (1/N) sum_n tr(H_L,n J_n J_n^T)`` with per-sample
    Jacobians ``J_n`` (``C x P``) and ``H_L,n = diag(p_n) - p_n p_n^T``.
    """
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = batch

    def out(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi[None],))[0]

    total = 0.0
    for start in range(0, x.shape[0], 64):
        xs = x[start : start + 64]
        jac = vmap(jacrev(out), in_dims=(None, 0))(params, xs)
        j = torch.cat([t.reshape(xs.shape[0], t.shape[1], -1) for t in jac.values()], dim=2)
        gram = j @ j.transpose(1, 2)  # (n, C, C)
        prob = torch.softmax(model(xs), dim=1).detach()
        h_l = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        total += float((h_l * gram).sum())
    return total / x.shape[0]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def rms_rel(values: list[float], truth: float) -> float:
    """Root-mean-square relative error of estimates over seeds."""
    return (sum(rel(v, truth) ** 2 for v in values) / len(values)) ** 0.5


def pyhessian_runs(model, batch, repeats, trace_seeds, trace99_seeds):
    from pyhessian import hessian as PyHessian

    def fresh() -> Any:
        for p in model.parameters():
            p.grad = None
        return PyHessian(model, F.cross_entropy, data=batch, cuda=False)

    out: dict[str, Any] = {}
    traces, times, counts = [], [], []
    for seed in range(trace_seeds):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            samples = fresh().trace()
            times.append(time.perf_counter() - t0)
        traces.append(sum(samples) / len(samples))
        counts.append(len(samples))
    out["trace_s"], out["trace_estimates"], out["trace_matvecs"] = (
        statistics.mean(times),
        traces,
        counts,
    )
    traces99, times99 = [], []
    for seed in range(trace99_seeds):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            # -inf: never stops early (with tol=-1 a negative running mean still stops it)
            samples = fresh().trace(maxIter=99, tol=float("-inf"))
            times99.append(time.perf_counter() - t0)
        traces99.append(sum(samples) / len(samples))
        assert len(samples) == 99, len(samples)
    out["trace99_s"], out["trace99_estimates"] = statistics.mean(times99), traces99

    def dens() -> Any:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return fresh().density(iter=100, n_v=1)

    try:
        out["density_s"], _ = timed(dens, repeats)
    except RuntimeError as err:  # PyHessian 0.1 calls torch.eig, removed in torch 1.9+
        out["density_s"], out["density_error"] = None, str(err).splitlines()[0]
    for p in model.parameters():
        p.grad = None
    model.train()  # PyHessian leaves the model in eval mode
    return out


def anyorder_runs(model, batch, repeats, trace_seeds, trace99_seeds, budget):
    """The default trace (Hutchinson over layer blocks with Neyman
    allocation) at PyHessian's product count, at a half and a third of it, and at 99 products;
    the equal-allocation blocks at PyHessian's product count and at half of it."""
    out: dict[str, Any] = {}

    budgets = (
        ("neyman", "trace", budget),
        ("neyman", "trace_half", max(2, budget // 2)),
        ("neyman", "trace_third", max(2, budget // 3)),
        ("neyman", "trace99", 99),
        ("blocks", "blocks", budget),
        ("blocks", "blocks_half", max(2, budget // 2)),
    )
    for method, key, m in budgets:
        traces, times, used = [], [], []
        for seed in range(trace99_seeds if m == 99 else trace_seeds):
            t0 = time.perf_counter()
            op = Hessian(model, F.cross_entropy, batch)
            est = trace(op, method=method, matvecs=m, seed=seed)
            times.append(time.perf_counter() - t0)
            traces.append(est.estimate)
            used.append(est.matvecs)
        out[f"{key}_s"], out[f"{key}_estimates"] = statistics.mean(times), traces
        out[f"{key}_matvecs"] = used[0]
    out["density_s"], _ = timed(
        lambda: density(Hessian(model, F.cross_entropy, batch), n_vectors=1, steps=100), repeats
    )
    return out


def eigenthings_runs(model, batch, repeats, trace_seeds, trace_matvecs):
    import hessian_eigenthings as he

    def op() -> Any:
        return he.HessianOperator(model, [batch], he.supervised_loss(F.cross_entropy))

    out: dict[str, Any] = {}
    traces, times = [], []
    for seed in range(trace_seeds):
        t0 = time.perf_counter()
        res = he.trace(op(), num_matvecs=trace_matvecs, method="hutch++", seed=seed)
        times.append(time.perf_counter() - t0)
        traces.append(float(res.estimate))
    out["trace_s"], out["trace_estimates"] = statistics.mean(times), traces
    return out


def eigen_runs(
    model: nn.Module, batch: Any, ref_top: list[float], seeds: dict[int, int], repeats: int
) -> list[dict[str, Any]]:
    """Top-1 and top-5 eigenvalues from every library over ``seeds[k]`` start seeds, each timed
    ``repeats`` times, libraries interleaved: the expected time (mean over seeds of each seed's
    median), median and largest error over seeds, median products. PyHessian's power iteration starts from its global RNG (seeded here);
    anyorder's seed draws the noise mixed into the gradient start (``start="auto"``, the default)
    or the whole start (``start="random"``)."""
    import importlib

    import hessian_eigenthings as he
    from pyhessian import hessian as PyHessian

    module = importlib.import_module("pyhessian.hessian")
    original, calls = module.hessian_vector_product, [0]

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    def pyhessian(k: int, seed: int) -> tuple[list[float], int]:
        for p in model.parameters():
            p.grad = None
        calls[0] = 0
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # PyHessian draws from the global RNG
            values = PyHessian(model, F.cross_entropy, data=batch, cuda=False).eigenvalues(top_n=k)
        return sorted(values[0], reverse=True), calls[0]

    def ours(k: int, seed: int, tol: float, start: str) -> tuple[list[float], int]:
        op = Hessian(model, F.cross_entropy, batch)
        spec = eigenvalues(op, k, tol=tol, seed=seed, start=start)
        return list(spec.eigenvalues), spec.matvecs

    def eigenthings(k: int, seed: int) -> tuple[list[float], int | None]:
        op = he.HessianOperator(model, [batch], he.supervised_loss(F.cross_entropy))
        res = he.lanczos(
            op, k=k, which="LA", tol=1e-4, max_iter=80, reorthogonalize=True, seed=seed
        )
        return sorted((float(v) for v in res.eigenvalues), reverse=True)[:k], None

    rows = []
    module.hessian_vector_product = counted
    try:
        for k, n_seeds in seeds.items():
            configs: dict[str, Callable[[int], tuple[list[float], Any]]] = {
                "pyhessian": lambda s, k=k: pyhessian(k, s),
                "anyorder tol=1e-4 (default start)": lambda s, k=k: ours(k, s, 1e-4, "auto"),
                "anyorder tol=1e-2 (default start)": lambda s, k=k: ours(k, s, 1e-2, "auto"),
                "anyorder tol=1e-2, start=random": lambda s, k=k: ours(k, s, 1e-2, "random"),
                "hessian-eigenthings": lambda s, k=k: eigenthings(k, s),
            }
            times: dict[str, list[list[float]]] = {c: [] for c in configs}
            errors: dict[str, list[float]] = {c: [] for c in configs}
            products: dict[str, list[int]] = {c: [] for c in configs}
            for seed in range(n_seeds):
                for label in configs:
                    times[label].append([])
                for r in range(repeats):
                    for label, run in configs.items():
                        t0 = time.perf_counter()
                        values, used = run(seed)
                        times[label][-1].append(time.perf_counter() - t0)
                        if r == 0:
                            errors[label].append(
                                max(rel(a, b) for a, b in zip(values[:k], ref_top[:k]))
                            )
                            if used is not None:
                                products[label].append(used)
                model.train()  # PyHessian leaves the model in eval mode
            for label in configs:
                rows.append(
                    {
                        "library": label,
                        "what": f"top{k}",
                        "seeds": n_seeds,
                        # expected cost: the mean over seeds of each seed's median time
                        "s": statistics.mean(statistics.median(t) for t in times[label]),
                        "rel_err": statistics.median(errors[label]),
                        "max_rel_err": max(errors[label]),
                        "matvecs": statistics.median(products[label]) if products[label] else None,
                        "matvecs_per_seed": products[label],
                    }
                )
    finally:
        module.hessian_vector_product = original
    for p in model.parameters():
        p.grad = None
    return rows


def compare(
    name: str, model: nn.Module, batch, repeats: int, trace_seeds: int, trace99_seeds: int
) -> dict[str, Any]:
    n = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: {n} parameters, {batch[0].shape[0]} samples ==", flush=True)
    t0 = time.perf_counter()
    ref = reference(model, batch)
    print(f"float64 reference: {time.perf_counter() - t0:.1f} s", flush=True)
    ph = pyhessian_runs(model, batch, repeats, trace_seeds, trace99_seeds)
    budget = round(statistics.mean(ph["trace_matvecs"]))
    ours = anyorder_runs(model, batch, repeats, trace_seeds, trace99_seeds, max(2, budget))
    eig = eigenthings_runs(model, batch, repeats, trace_seeds, max(5, budget))
    truth = ref["trace"]
    print(f"reference: top-5 {[f'{v:.6g}' for v in ref['top']]}, trace {truth:.6g}")
    print(
        f"trace budget: {budget} products (PyHessian's own stopping rule, mean over seeds; per "
        f"seed {ph['trace_matvecs']})"
    )

    def trace_row(label: str, r: dict[str, Any], key: str, matvecs: Any) -> dict[str, Any]:
        return {
            "library": label,
            "what": key,
            "s": r[f"{key}_s"],
            "matvecs": matvecs,
            "rms_rel_err": rms_rel(r[f"{key}_estimates"], truth),
        }

    eig_rows = eigen_runs(model, batch, ref["top"], {1: 5, 5: 3}, repeats)
    trace_rows = [
        trace_row("anyorder neyman (default)", ours, "trace", ours["trace_matvecs"]),
        trace_row("anyorder neyman (default)", ours, "trace_half", ours["trace_half_matvecs"]),
        trace_row("anyorder neyman (default)", ours, "trace_third", ours["trace_third_matvecs"]),
        trace_row("anyorder blocks", ours, "blocks", ours["blocks_matvecs"]),
        trace_row("anyorder blocks", ours, "blocks_half", ours["blocks_half_matvecs"]),
        trace_row("pyhessian (own rule)", ph, "trace", budget),
        trace_row("hessian-eigenthings hutch++", eig, "trace", max(5, budget)),
        trace_row("anyorder neyman (default)", ours, "trace99", ours["trace99_matvecs"]),
        trace_row("pyhessian", ph, "trace99", 99),
    ]
    print("eigenvalues (seeds)                 what       mean s  rel err med / max  products")
    for r in eig_rows:
        mv = r["matvecs"] if r["matvecs"] is not None else "-"
        print(
            f"{r['library']:35s} {r['what']:5s} ({r['seeds']})  {r['s']:7.3f}  "
            f"{r['rel_err']:.1e} / {r['max_rel_err']:.1e}  {mv}"
        )
    eig_s = {(r["library"], r["what"]): r["s"] for r in eig_rows}
    print(f"trace ({trace_seeds} seeds)              products    mean s  rms rel err")
    for r in trace_rows:
        print(f"{r['library']:32s} {r['matvecs']:4d}  {r['s']:8.3f}  {r['rms_rel_err']:.1e}")
    ratios = {
        "top1 (tol=1e-4)": eig_s[("anyorder tol=1e-4 (default start)", "top1")]
        / eig_s[("pyhessian", "top1")],
        "top1 (tol=1e-2)": eig_s[("anyorder tol=1e-2 (default start)", "top1")]
        / eig_s[("pyhessian", "top1")],
        "top1 (tol=1e-2, random start)": eig_s[("anyorder tol=1e-2, start=random", "top1")]
        / eig_s[("pyhessian", "top1")],
        "top5 (tol=1e-4)": eig_s[("anyorder tol=1e-4 (default start)", "top5")]
        / eig_s[("pyhessian", "top5")],
        "top5 (tol=1e-2)": eig_s[("anyorder tol=1e-2 (default start)", "top5")]
        / eig_s[("pyhessian", "top5")],
        "trace (equal products)": ours["trace_s"] / ph["trace_s"],
        "trace (half products)": ours["trace_half_s"] / ph["trace_s"],
        "trace (third of products)": ours["trace_third_s"] / ph["trace_s"],
        "trace 99": ours["trace99_s"] / ph["trace99_s"],
    }
    if ph.get("density_s"):
        ratios["density"] = ours["density_s"] / ph["density_s"]
    print("anyorder / PyHessian time: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"anyorder density (SLQ, 1 vector, 100 steps): {ours['density_s']:.3f} s")
    if ph.get("density_error"):
        print(f"PyHessian density failed: {ph['density_error']}")
    return {
        "model": name,
        "params": n,
        "reference": ref,
        "eigenvalue_rows": eig_rows,
        "trace_rows": trace_rows,
        "ratios": ratios,
        "anyorder_density_s": ours["density_s"],
        "pyhessian_density_error": ph.get("density_error"),
        "pyhessian_trace_products": ph["trace_matvecs"],
    }


def monitor_cost(steps: int = 1000) -> dict[str, Any]:
    from anyorder.bench.registry import get_task

    task = get_task("digits-mlp")()

    def train(with_monitor: bool) -> tuple[float, float]:
        model = task.init_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = None
        if with_monitor:
            fixed = next(task.batches(torch.Generator().manual_seed(1)))
            mon = HessianMonitor(model, lambda o, _b: o, fixed, forward=task.loss, optimizer=opt)
        batches = task.batches(torch.Generator().manual_seed(0))
        t_train = 0.0
        for _ in range(steps):
            batch = next(batches)
            t0 = time.perf_counter()
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
            t_train += time.perf_counter() - t0
            if mon is not None:
                mon.step()
        return t_train, mon.seconds if mon is not None else 0.0

    train(False)
    plain, _ = train(False)
    t_train, t_mon = train(True)
    out = {"steps": steps, "train_s": plain, "monitor_s": t_mon, "fraction": t_mon / plain}
    print(
        f"\n== monitor (digits-mlp, SGD, {steps} steps, every 100) ==\n"
        f"training {plain:.3f} s, monitor {t_mon:.3f} s: {100 * t_mon / plain:.1f}% of training"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace-seeds", type=int, default=10)
    parser.add_argument(
        "--trace99-seeds", type=int, default=10, help="seeds of the 99-product trace rows"
    )
    parser.add_argument(
        "--models", nargs="+", choices=("mlp", "cnn", "gelu", "tanh", "resbn", "resmlp"),
        default=["mlp", "cnn"],
    )
    parser.add_argument(
        "--hvp", action="store_true", help="only the cost of one Hessian-vector product, per way"
    )
    parser.add_argument(
        "--top1-tols", type=float, nargs="+",
        help="only the top-1 eigenvalue: PyHessian against anyorder at these tolerances",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5, help="start seeds of --top1-tols")
    parser.add_argument("--no-monitor", action="store_true", help="skip the monitor's cost")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = digits()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    models = {
        "mlp": ("MLP 64-256-128-10", mlp),
        "cnn": ("CNN 16-32 conv", cnn),
        "gelu": ("MLP 64-160-160-64-10 GELU", gelu_mlp),
        "tanh": ("MLP 64-200-150-10 tanh", tanh_mlp),
        "resbn": ("residual CNN with BatchNorm (eval)", resbn_cnn),
        "resmlp": ("residual SiLU MLP, trained 300 steps", trained_resmlp),
    }
    if args.hvp:
        for key in args.models:
            label, make = models[key]
            model = make()
            n = sum(p.numel() for p in model.parameters())
            print(f"\n== {label}: {n} parameters, one product ==", flush=True)
            results[key] = hvp_costs(model, (x, y), args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.top1_tols:
        for key in args.models:
            label, make = models[key]
            model = make()
            n = sum(p.numel() for p in model.parameters())
            print(f"\n== {label}: {n} parameters, top-1 ==", flush=True)
            results[key] = top1_sweep(model, (x, y), args.top1_tols, args.seeds, args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    for key in args.models:
        label, make = models[key]
        results[key] = compare(
            label, make(), (x, y), args.repeats, args.trace_seeds, args.trace99_seeds
        )
    if not args.no_monitor:
        results["monitor"] = monitor_cost()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
