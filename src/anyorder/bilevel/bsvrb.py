"""BSVRB v1 and v2: Hu, Qiu, Guo, Zhang & Yang, "Blockwise Stochastic Variance-Reduced Methods
with Parallel Speedup for Multi-Block Bilevel Optimization" (ICML 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from anyorder.bilevel._base import (
    BilevelOptimizer,
    MixedHessian,
    _check_closure,
    check_int,
    check_positive,
)

__all__ = ["BSVRB"]

BlockLoss = Callable[[int], torch.Tensor]


class BSVRB(BilevelOptimizer):
    """Multi-block bilevel: ``min_x (1/m) sum_i f_i(x, y_i*(x))``, ``y_i*(x) = argmin g_i(x, y)``.

    ``inner`` holds the ``m`` blocks ``y_1..y_m`` (one tensor each). The closures take the block
    index: ``inner_loss(i)`` is ``g_i(x, y_i)``, ``outer_loss(i)`` is ``f_i(x, y_i)``; within one
    :meth:`step` a block's closure must use the same sample each time it is called (capture the
    step's minibatch before calling ``step``): the variance-reduced corrections evaluate it at the
    current and at the previous iterate.

    One step ``t`` (``e_t = (x_t, y_t)`` and, for v2, ``v_t``; ``e_{-1} = e_0`` at the first
    step). The blocks ``I_t`` (``blocks`` of them, without replacement) are drawn with the
    optimizer's own ``torch.Generator`` (seeded by ``seed``, saved in the state dict). For
    ``i`` in ``I_t``, the MSVR estimator ``u <- (1 - alpha) u + (alpha + gamma) h(e_t) - gamma
    h(e_{t-1})`` (same sample at both points) tracks

        s_i ~ grad_y g_i                                          (both versions)
        H_i ~ d^2_yy g_i, then H_i <- Proj_{>= mu}(H_i)            (v1: eigenvalues clipped to
                                                                   >= ``mu``)
        u_i ~ d^2_yy g_i v_i - grad_y f_i                          (v2: the linear-system
                                                                   residual)

    and the hypergradient estimate of the block at a point is

        G_i(e) = grad_x f_i - d^2_xy g_i H_i^{-1} grad_y f_i           (v1, the tracker H_i from
                                                                     before this step's update)
        G_i(e) = grad_x f_i - d^2_xy g_i v_i                           (v2)

    Then, with ``G(e) = (1/I) sum_{i in I_t} G_i(e)`` (same samples at ``e_t`` and ``e_{t-1}``,
    each with its own iterate's ``H`` / ``v``):

        z_t     = (1 - beta) (z_{t-1} - G(e_{t-1})) + G(e_t)           (STORM)
        x_{t+1} = x_t - eta z_t
        y_i    <- y_i - tau s_i                                         for every block
        v_i    <- Proj_{||v|| <= v_max}(v_i - tau_v u_i)                for every block (v2)

    Starts: ``s = u = 0``, ``v = 0``, ``z = 0``, ``H_i = h0 I``.

    Departures from the reference code (github.com/quanqihu/BSVRB_ICML2023), which are bugs or
    shortcuts there: its ``proj_mat`` scales ``H`` UP to the bound whenever its norm is below it
    (here: the projection onto ``{H : H >= mu I}`` by eigenvalue clipping, which keeps ``H``
    invertible with ``||H^{-1}|| <= 1/mu``); its v2 updates an unsampled block lazily by
    ``delay x`` the block's newest tracker when it is next sampled (here every block moves every
    step with its current tracker, as in v1); it starts all variables at random values (here
    zeros / ``h0 I``, with ``e_{-1} = e_0``); its validation set is drawn from the training set
    (the problems in :mod:`anyorder.bilevel.problems` keep them disjoint).

    Args:
        lr: ``eta`` (per group); version: ``"v1"`` or ``"v2"``; blocks: ``I``; inner_lr:
        ``tau``; v_lr: ``tau_v`` (default ``inner_lr``); alpha, gamma: MSVR parameters
        (``gamma=None``: ``(m - I) / (I (1 - alpha)) + (1 - alpha)``, the MSVR choice of Jiang et
        al., 2022, ``1 - alpha`` when every block is sampled, where the estimator is STORM's
        and its tracking error shrinks by exactly ``1 - alpha`` per step; the reference code's
        ``--auto_gamma`` leaves the ``+ (1 - alpha)`` out, which makes it a plain moving
        average when every block is sampled, and its run scripts pass ``--gamma 1``); beta:
        STORM parameter; mu: the
        eigenvalue floor of ``H`` (v1); h0: ``H``'s start; v_max: the bound of ``v`` (v2); seed:
        the block sampler's seed; init_steps, init_lr: the inner warm-up of the first step
        (``init_steps`` gradient steps ``y_i <- y_i - init_lr grad_y g_i(x_0, y_i)`` on every
        block, ``init_lr`` default ``tau``, before the first update; default none; see
        :mod:`anyorder.bilevel._base`).

    State: ``s``, ``H`` (v1) or ``u``, ``v``, ``v_prev`` (v2), ``H_prev`` (v1), ``x_prev``,
    ``y_prev``, ``z``, the sampler's generator state.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        inner: Iterable[torch.Tensor],
        *,
        lr: float,
        inner_lr: float,
        version: str = "v2",
        blocks: int | None = None,
        v_lr: float | None = None,
        alpha: float = 0.9,
        gamma: float | None = None,
        beta: float = 0.9,
        mu: float = 1e-3,
        h0: float = 1.0,
        v_max: float = float("inf"),
        seed: int = 0,
        init_steps: int = 0,
        init_lr: float | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, inner, {"lr": lr}, on_nonfinite=on_nonfinite)
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        self.version = version
        m = len(self.inner)
        self.blocks = m if blocks is None else check_int("blocks", blocks, minimum=1)
        if self.blocks > m:
            raise ValueError(f"blocks must be in 1..{m} (the number of inner blocks), got {blocks}")
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.v_lr = self.inner_lr if v_lr is None else check_positive("v_lr", v_lr)
        self.set_inner_warmup(init_steps, init_lr, self.inner_lr)
        self.alpha = check_positive("alpha", alpha)
        if not self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if gamma is None:
            gamma = (m - self.blocks) / (self.blocks * (1 - self.alpha)) if self.blocks < m else 0.0
            gamma += 1 - self.alpha
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.beta = check_positive("beta", beta)
        if not self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        self.mu = check_positive("mu", mu)
        self.h0 = check_positive("h0", h0)
        if not v_max > 0:
            raise ValueError(f"v_max must be > 0, got {v_max!r}")
        self.v_max = float(v_max)
        self.seed = check_int("seed", seed, minimum=0)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.bstate["sampler"] = self._gen.get_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._gen.set_state(self.bstate["sampler"])

    def _restore(self, snap: Any) -> None:
        super()._restore(snap)
        self._gen.set_state(self.bstate["sampler"])

    # -- per-block derivatives ------------------------------------------------------------------
    def _block(
        self, i: int, inner_loss: BlockLoss, outer_loss: BlockLoss, H: torch.Tensor | None,
        v: torch.Tensor | None,
    ) -> dict[str, Any]:
        """At the current point: grad_y g_i, (v1) d^2_yy g_i, (v2) d^2_yy g_i v - grad_y f_i, and
        G_i."""
        x, yi = self.outer, self.inner[i]
        nx = len(x)
        f, fgrad = self.grad(lambda: outer_loss(i), x + [yi], f"outer_loss({i})")
        fx, fy = fgrad[:nx], fgrad[nx]
        hess = MixedHessian(lambda: inner_loss(i), x, [yi], name=f"inner_loss({i})")
        try:
            self.check_finite([hess.loss, *hess.grad_y])
            out: dict[str, Any] = {"gy": hess.grad_y[0], "f": f}
            if self.version == "v1":
                n = yi.numel()
                eye = torch.eye(n, dtype=yi.dtype, device=yi.device)
                rows = [hess.hyy([e.view_as(yi)])[0].reshape(-1) for e in eye]
                out["hyy"] = torch.stack(rows)
                w = torch.linalg.solve(H, fy.reshape(-1)).view_as(yi)
            else:
                out["res"] = hess.hyy([v])[0] - fy
                w = v
            hxw, _ = hess.products([w], retain=False)
        finally:
            hess.release()
        out["G"] = [a - b for a, b in zip(fx, hxw)]
        self.check_finite(out["G"] + [out.get("hyy", f), out.get("res", f)])
        return out

    def _msvr(self, old: torch.Tensor, new: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * old + (self.alpha + self.gamma) * new - self.gamma * prev

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, inner_loss: BlockLoss, outer_loss: BlockLoss
    ) -> torch.Tensor | None:
        """One BSVRB iteration; the closures take the block index ``i``. Returns the mean outer
        loss over the sampled blocks at the current point (before the update)."""
        _check_closure("inner_loss", inner_loss)
        _check_closure("outer_loss", outer_loss)
        with torch.enable_grad():
            return self._guarded(lambda: self._warm_then_step(inner_loss, outer_loss))

    def _warmup_loss(self, inner_loss: BlockLoss) -> Callable[[], torch.Tensor]:
        # the blocks are disjoint: the sum's gradient is every block's own (one call per block)
        return lambda: sum(inner_loss(i) for i in range(len(self.inner)))

    def _step(self, inner_loss: BlockLoss, outer_loss: BlockLoss) -> torch.Tensor:
        st = self.bstate
        x, y = self.outer, self.inner
        m = len(y)
        v1 = self.version == "v1"
        if "z" not in st:
            st["z"] = [torch.zeros_like(p) for p in x]
            st["s"] = [torch.zeros_like(t) for t in y]
            st["x_prev"] = [p.detach().clone() for p in x]
            st["y_prev"] = [t.detach().clone() for t in y]
            if v1:
                st["H"] = [
                    self.h0 * torch.eye(t.numel(), dtype=t.dtype, device=t.device) for t in y
                ]
                st["H_prev"] = [h.clone() for h in st["H"]]
            else:
                st["u"] = [torch.zeros_like(t) for t in y]
                st["v"] = [torch.zeros_like(t) for t in y]
                st["v_prev"] = [torch.zeros_like(t) for t in y]
        self._gen.set_state(st["sampler"])
        chosen = torch.randperm(m, generator=self._gen)[: self.blocks].tolist()
        st["sampler"] = self._gen.get_state()

        g_new = [torch.zeros_like(p) for p in x]
        g_old = [torch.zeros_like(p) for p in x]
        s, z = st["s"], st["z"]
        H_next = list(st["H"]) if v1 else None
        f_sum = 0.0
        for i in chosen:
            cur = self._block(i, inner_loss, outer_loss, st["H"][i] if v1 else None,
                              None if v1 else st["v"][i])
            with self.at(x + [y[i]], st["x_prev"] + [st["y_prev"][i]]):
                old = self._block(i, inner_loss, outer_loss, st["H_prev"][i] if v1 else None,
                                  None if v1 else st["v_prev"][i])
            f_sum += float(cur["f"])
            s[i] = self._msvr(s[i], cur["gy"], old["gy"])
            if v1:
                H_next[i] = _clip_eigenvalues(self._msvr(st["H"][i], cur["hyy"], old["hyy"]),
                                              self.mu)
            else:
                st["u"][i] = self._msvr(st["u"][i], cur["res"], old["res"])
            torch._foreach_add_(g_new, cur["G"])
            torch._foreach_add_(g_old, old["G"])
        k = float(len(chosen))
        new_z = [
            (1 - self.beta) * (zi - go / k) + gn / k for zi, go, gn in zip(z, g_old, g_new)
        ]
        self.check_finite(new_z + s)
        with torch.no_grad():
            st["x_prev"] = [p.detach().clone() for p in x]
            st["y_prev"] = [t.detach().clone() for t in y]
            for p, zi, lr in zip(x, new_z, self._lr_per_outer()):
                p.add_(zi, alpha=-lr)
            torch._foreach_add_(y, s, alpha=-self.inner_lr)
            if v1:
                st["H_prev"], st["H"] = st["H"], H_next
            else:
                st["v_prev"] = [t.clone() for t in st["v"]]
                new_v = []
                for vi, ui in zip(st["v"], st["u"]):
                    vi = vi - self.v_lr * ui
                    norm = float(vi.norm())
                    if norm > self.v_max:
                        vi = vi * (self.v_max / norm)
                    new_v.append(vi)
                st["v"] = new_v
        st["z"] = new_z
        self.check_finite(x + y)
        return torch.tensor(f_sum / k)


def _clip_eigenvalues(h: torch.Tensor, floor: float) -> torch.Tensor:
    """The projection of ``(h + h^T) / 2`` onto ``{H : H >= floor I}`` (Frobenius norm)."""
    sym = 0.5 * (h + h.T)
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp(min=floor)) @ evecs.T
