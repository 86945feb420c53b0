"""Ridge hypergradient with per-feature L2 penalties: the implicit layer against the closed form
(autograd through ``torch.linalg.solve``) and torchopt's ``custom_root``, side by side.

Data: n=2,000 training and 1,000 validation rows, d=500 Gaussian features with column scales
0.3..1.7, per-feature lambda log-uniform in [0.1, 1] (condition number of the inner Hessian about
24). Outer loss: half the mean squared validation error; hypergradient d loss / d lambda.

Two regimes are timed, interleaved, median of ``--repeats``: "from data" (each evaluation forms
the Gram matrix X^T X / n, as a closed form evaluated from scratch does) and "Gram cached" (X^T X
formed once; only the lambda-dependent work is timed). Errors are relative to the explicit
formula -w* (H^-1 grad_w L) in float64. Also counts the Hessian-vector products of one adjoint
CG solve at rtol=1e-5 (anyorder and torchopt, products counted by wrapping the matvec).

    flock /work/bench.lock env PYTHONPATH=src python benchmarks/implicit_ridge.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from anyorder.implicit import custom_root, solve_cg


def make_data(n: int = 2000, n_val: int = 1000, d: int = 500, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 1.7, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(d, generator=g, dtype=torch.float64) / d**0.5
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    xv = torch.randn(n_val, d, generator=g, dtype=torch.float64) * scale
    yv = xv @ w + 0.5 * torch.randn(n_val, generator=g, dtype=torch.float64)
    lam = 0.1 * 10 ** torch.rand(d, generator=g, dtype=torch.float64)
    return x, y, xv, yv, lam


def val_loss(w, xv, yv):
    r = xv @ w - yv
    return 0.5 * (r @ r) / xv.shape[0]


def reference(x, y, xv, yv, lam):
    n = x.shape[0]
    h = x.T @ x / n + torch.diag(lam)
    chol = torch.linalg.cholesky(h)
    w = torch.cholesky_solve((x.T @ y / n)[:, None], chol)[:, 0]
    gw = xv.T @ (xv @ w - yv) / xv.shape[0]
    return -w * torch.cholesky_solve(gw[:, None], chol)[:, 0], h


def methods(x, y, xv, yv, rtol: float, cached: bool):
    n = x.shape[0]
    pre = (x.T @ x / n, x.T @ y / n) if cached else None

    def gram():
        return pre if cached else (x.T @ x / n, x.T @ y / n)

    def closed(lam):
        lam = lam.detach().requires_grad_()
        g, c = gram()
        w = torch.linalg.solve(g + torch.diag(lam), c)
        return torch.autograd.grad(val_loss(w, xv, yv), lam)[0]

    def ours(rtol, jacobi=False):
        def run(lam):
            g, c = gram()
            options = {"rtol": rtol}
            if jacobi:  # the diagonal of the Hessian G + diag(lam), as a preconditioner
                diag = torch.diagonal(g) + lam
                options["M"] = lambda r: r / diag

            @custom_root(lambda w, lam: g @ w - c + lam * w, solve_options=options)
            def inner(lam):
                return torch.linalg.solve(g + torch.diag(lam), c)

            lam = lam.detach().requires_grad_()
            return torch.autograd.grad(val_loss(inner(lam), xv, yv), lam)[0]

        return run

    out = {
        "closed form (autograd through linalg.solve)": closed,
        f"anyorder custom_root, CG rtol={rtol:g}": ours(rtol),
        f"anyorder custom_root, Jacobi-preconditioned CG rtol={rtol:g}": ours(rtol, True),
        "anyorder custom_root, CG rtol=1e-8": ours(1e-8),
        "anyorder custom_root, CG rtol=1e-5 (torchopt's)": ours(1e-5),
    }
    try:
        import torchopt
    except ImportError:
        return out

    def torchopt_fn(solve):
        def run(lam):
            g, c = gram()

            def f(w, lam):
                return g @ w - c + lam * w

            @torchopt.diff.implicit.custom_root(f, argnums=1, solve=solve)
            def inner(w0, lam):
                return torch.linalg.solve(g + torch.diag(lam), c)

            lam = lam.detach().requires_grad_()
            w = inner(torch.zeros_like(c), lam)
            return torch.autograd.grad(val_loss(w, xv, yv), lam)[0]

        return run

    out["torchopt custom_root + solve_cg (defaults)"] = torchopt_fn(
        torchopt.linear_solve.solve_cg()
    )
    out["torchopt custom_root (default solve_normal_cg)"] = torchopt_fn(None)
    return out


def trajectory(x, y, xv, yv, lam, steps: int, lr: float):
    """``steps`` values of lambda along exponentiated-gradient descent on the validation loss
    (exact hypergradients): the points a hyperparameter loop visits, each close to the last."""
    out = [lam]
    for _ in range(steps - 1):
        g, _ = reference(x, y, xv, yv, out[-1])
        out.append(out[-1] * torch.exp(-lr * out[-1] * g / g.abs().max()))
    return out


def loop_methods(x, y, xv, yv, rtol: float):
    """The "hyperparameter loop" regime: one implicit function reused along a trajectory, so
    its adjoint CG starts from the previous solution (``warm_start=True``); the Gram matrix is
    formed once, as a loop would."""
    n = x.shape[0]
    g, c = x.T @ x / n, x.T @ y / n

    def closed(lams):
        out = []
        for lam in lams:
            lam = lam.detach().requires_grad_()
            w = torch.linalg.solve(g + torch.diag(lam), c)
            out.append(torch.autograd.grad(val_loss(w, xv, yv), lam)[0])
        return out

    def ours(warm: bool):
        @custom_root(lambda w, lam: g @ w - c + lam * w, solve_options={"rtol": rtol},
                     warm_start=warm)
        def inner(lam):
            return torch.linalg.solve(g + torch.diag(lam), c)

        def run(lams):
            inner.reset()
            out, products = [], 0
            for lam in lams:
                lam = lam.detach().requires_grad_()
                out.append(torch.autograd.grad(val_loss(inner(lam), xv, yv), lam)[0])
                products += inner.last_solve.iterations
            run.products = products
            return out

        return run

    return {
        "closed form (autograd through linalg.solve)": closed,
        f"anyorder custom_root, CG rtol={rtol:g}, cold start": ours(False),
        f"anyorder custom_root, CG rtol={rtol:g}, warm start": ours(True),
    }


def count_products(x, y, lam, rtol: float = 1e-5) -> dict[str, int]:
    n = x.shape[0]
    g, c = x.T @ x / n, x.T @ y / n
    v = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    counts: dict[str, int] = {}

    def counting(key, mv):
        def wrapped(u):
            counts[key] = counts.get(key, 0) + 1
            return mv(u)

        return wrapped

    @custom_root(
        lambda w, lam: g @ w - c + lam * w,
        solve=lambda mv, b, x0=None, **kw: solve_cg(counting("anyorder", mv), b, x0, **kw),
        solve_options={"rtol": rtol},
    )
    def inner(lam):
        return torch.linalg.solve(g + torch.diag(lam), c)

    _, pull = torch.func.vjp(inner, lam)
    pull(v)
    try:
        import torchopt

        solve = torchopt.linear_solve.solve_cg(rtol=rtol)

        @torchopt.diff.implicit.custom_root(
            lambda w, lam: g @ w - c + lam * w,
            argnums=1,
            solve=lambda mv, b: solve(counting("torchopt", mv), b),
        )
        def inner_t(w0, lam):
            return torch.linalg.solve(g + torch.diag(lam), c)

        lam_t = lam.detach().requires_grad_()
        w = inner_t(torch.zeros_like(c), lam_t)
        torch.autograd.grad(w, lam_t, v)
    except ImportError:
        pass
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rtol", type=float, default=3e-10)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--loop-steps", type=int, default=10, help="points of the loop regime")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, xv, yv, lam = make_data()
    exact, h = reference(x, y, xv, yv, lam)
    eig = torch.linalg.eigvalsh(h)
    report = {
        "load": os.getloadavg(),
        "load_end": None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "condition_number": float(eig[-1] / eig[0]),
        "regimes": {},
    }
    print(
        f"load {report['load']}, torch threads {report['torch_threads']}, "
        f"condition number {report['condition_number']:.1f}"
    )
    for cached in (False, True):
        fns = methods(x, y, xv, yv, args.rtol, cached)
        times = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        errors = {}
        for k, fn in fns.items():  # warm-up, and the error
            got = fn(lam)
            errors[k] = float((got - exact).norm() / exact.norm())
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(lam)
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        base = statistics.median(times[next(iter(fns))])
        cpu_base = statistics.median(cpu[next(iter(fns))])
        regime = "Gram cached" if cached else "from data"
        rows = {}
        print(f"\n{regime}:")
        for k in fns:
            med, cmed = statistics.median(times[k]), statistics.median(cpu[k])
            rows[k] = {
                "median_s": med,
                "ratio": med / base,
                "cpu_median_s": cmed,
                "cpu_ratio": cmed / cpu_base,
                "rel_error": errors[k],
            }
            print(
                f"  {k:50s} wall {1e3 * med:7.2f} ms {med / base:5.2f}x | "
                f"CPU {1e3 * cmed:7.2f} ms {cmed / cpu_base:5.2f}x | rel. error {errors[k]:.1e}"
            )
        report["regimes"][regime] = rows
    lams = trajectory(x, y, xv, yv, lam, args.loop_steps, 0.05)
    exact_loop = [reference(x, y, xv, yv, lm)[0] for lm in lams]
    fns = loop_methods(x, y, xv, yv, args.rtol)
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    errors, products = {}, {}
    for k, fn in fns.items():
        got = fn(lams)
        errors[k] = max(float((a - b).norm() / b.norm()) for a, b in zip(got, exact_loop))
        products[k] = getattr(fn, "products", None)
    for _ in range(max(3, args.repeats // 3)):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(lams)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    base = statistics.median(times[next(iter(fns))])
    cpu_base = statistics.median(cpu[next(iter(fns))])
    regime = f"hyperparameter loop ({args.loop_steps} points, Gram cached)"
    print(f"\n{regime}:")
    rows = {}
    for k in fns:
        med, cmed = statistics.median(times[k]), statistics.median(cpu[k])
        rows[k] = {"median_s": med, "ratio": med / base, "cpu_median_s": cmed,
                   "cpu_ratio": cmed / cpu_base, "max_rel_error": errors[k],
                   "products": products[k]}
        print(
            f"  {k:50s} wall {1e3 * med:7.2f} ms {med / base:5.2f}x | "
            f"CPU {1e3 * cmed:7.2f} ms {cmed / cpu_base:5.2f}x | max rel. error "
            f"{errors[k]:.1e} | products {products[k]}"
        )
    report["regimes"][regime] = rows
    counts = count_products(x, y, lam)
    report["hvps_per_adjoint_solve_rtol_1e-5"] = counts
    print(f"\nHessian-vector products per adjoint solve at rtol=1e-5: {counts}")
    report["load_end"] = os.getloadavg()
    print(f"load at the end {report['load_end']}")
    if args.json:
        from anyorder.core.files import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2).encode())


if __name__ == "__main__":
    main()
