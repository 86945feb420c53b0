"""Curvature operators: the Hessian, the generalised Gauss-Newton matrix and the empirical Fisher of
a model's loss, as matrix-free linear operators over the flattened parameters (PyHessian, Yao et
al. 2020, computes its spectra from such Hessian-vector products).

Data is one batch or an iterable of batches (a ``DataLoader``); over several batches the operator
is the exact average, each batch weighted by its number of samples (the loss must be a mean over
the batch). The model is put in eval mode for every forward pass the products run (building the
gradient's graph, finite differences) and its modes are restored afterwards.

Products are differentiated inside the library: reverse-over-reverse
``torch.autograd.grad(..., create_graph=True)``. Where double backward is unavailable (fused
attention kernels, ``once_differentiable`` functions) the Hessian falls back to a central
finite-difference product of two gradients, with one warning. For a single batch the gradient graph
is built once and reused (``cache``); it is rebuilt if a parameter changes in place.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from anyorder.curvature.hvp import double_backward_unavailable

__all__ = [
    "CurvatureOperator",
    "MatrixOperator",
    "ModelOperator",
    "Hessian",
    "GGN",
    "Fisher",
    "flatten",
    "unflatten",
    "resolve_params",
]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (like ``parameters_to_vector``, for any
    tensors)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``vec`` (shape ``(n,)`` or ``(b, n)``) shaped like ``like`` (with the batch
    dimension kept in front)."""
    sizes = [t.numel() for t in like]
    lead = vec.shape[:-1]
    return [part.reshape(*lead, *t.shape) for part, t in zip(torch.split(vec, sizes, dim=-1), like)]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def resolve_params(
    model: nn.Module, params: nn.Module | str | Iterable[torch.Tensor] | None
) -> list[nn.Parameter]:
    """The parameters an operator acts on: all trainable ones (``None``), those of a submodule (a
    module or its dotted name) or an explicit list of the model's parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    elif isinstance(params, str):
        try:
            sub = model.get_submodule(params)
        except AttributeError:
            names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
            raise ValueError(
                f"params={params!r} is not a submodule of the model; modules with parameters: "
                f"{', '.join(repr(n) for n in names)}"
            ) from None
        chosen = [p for p in sub.parameters() if p.requires_grad]
    elif isinstance(params, nn.Module):
        chosen = [p for p in params.parameters() if p.requires_grad]
    else:
        chosen = list(params)
        for p in chosen:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must hold tensors, got {type(p).__name__}")
    if not chosen:
        raise ValueError(f"params={params!r} selects no trainable parameter of the model")
    own = {id(p) for p in model.parameters()}
    for p in chosen:
        if id(p) not in own:
            raise ValueError("params must be parameters of the model; got a foreign tensor")
        if not p.requires_grad:
            raise ValueError("params must require gradients; got a frozen parameter")
    seen: set[int] = set()
    unique = [p for p in chosen if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]
    return unique


class CurvatureOperator(ABC):
    """A symmetric linear operator of size ``size`` given by products: ``matvec(v)`` for one vector
    of shape ``(size,)`` and ``matmat(V)`` for a block of rows ``(b, size)``. ``matvecs`` counts
    the products computed so far."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self.matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(size,)``."""
        self._check(v, 1)
        self.matvecs += 1
        return self._matmat(v.unsqueeze(0)).squeeze(0)

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``(A @ vs.T).T`` for a block ``vs`` of shape ``(b, size)``: ``b`` products at once."""
        self._check(vs, 2)
        self.matvecs += vs.shape[0]
        return self._matmat(vs)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v.T).T

    @abstractmethod
    def _matmat(self, vs: torch.Tensor) -> torch.Tensor: ...

    def _check(self, v: torch.Tensor, dim: int) -> None:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(v).__name__}")
        if v.dim() != dim or v.shape[-1] != self.size:
            shape = f"({self.size},)" if dim == 1 else f"(b, {self.size})"
            raise ValueError(f"expected a tensor of shape {shape}, got {tuple(v.shape)}")

    def block_labels(self) -> torch.Tensor:
        """A block index per coordinate, shape ``(size,)``: the diagonal blocks that
        :func:`anyorder.hessian.trace` stratifies over (here one block)."""
        return torch.zeros(self.size, dtype=torch.long, device=self.device)

    def to_dense(self, chunk: int = 256) -> torch.Tensor:
        """The full ``size x size`` matrix, column block by column block (small operators only)."""
        cols = []
        for start in range(0, self.size, chunk):
            stop = min(start + chunk, self.size)
            eye = torch.zeros(stop - start, self.size, dtype=self.dtype, device=self.device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append(self.matmat(eye))
        return torch.cat(cols).T


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator (tests, and curvature matrices already formed)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(f"expected a square matrix, got {getattr(matrix, 'shape', matrix)}")
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, vs: torch.Tensor) -> torch.Tensor:
        return vs @ self.matrix.T


Batch = Any


def _is_single_batch(data: Any) -> bool:
    if data is None or isinstance(data, (torch.Tensor, dict)):
        return True
    if isinstance(data, (tuple, list)):
        return all(x is None or isinstance(x, (torch.Tensor, int, float)) for x in data)
    return False


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for x in batch:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


def default_batch_weight(batch: Any) -> float:
    """Number of samples in ``batch``: the leading dimension of its first tensor (1 without one,
    or for a 0-d tensor)."""
    t = _first_tensor(batch)
    return float(t.shape[0]) if t is not None and t.dim() > 0 else 1.0


class ModelOperator(CurvatureOperator):
    """Common plumbing of the model operators: parameters, data, the loss and eval mode.

    ``loss_fn(output, target)`` is applied to ``model(inputs)`` for ``(inputs, target)`` batches;
    with ``forward(model, batch) -> output`` it is called as ``loss_fn(output, batch)``, as in
    :func:`anyorder.core.closure.make_closure`. ``batch_weight(batch)`` gives each batch's weight in
    the average (default: its number of samples).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: nn.Module | str | Iterable[torch.Tensor] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        cache: bool | None = None,
        batch_weight: Callable[[Any], float] | None = None,
    ) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable, got {type(forward).__name__}")
        self.model = model
        self.params = resolve_params(model, params)
        self.loss_fn = loss_fn
        self.forward = forward
        self.single = _is_single_batch(data)
        if self.single:
            self.data: Any = data
        else:
            if not isinstance(data, Iterable):
                raise TypeError(
                    "data must be one batch (a tensor or a tuple of tensors) or an iterable of "
                    f"batches (e.g. a DataLoader), got {type(data).__name__}"
                )
            # A one-shot iterator would be exhausted after the first product: keep its batches.
            self.data = list(data) if iter(data) is data else data
        self.cache = self.single if cache is None else bool(cache)
        self.batch_weight = batch_weight or default_batch_weight
        self.size = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self._cached: list[tuple[float, Any]] | None = None
        self._versions: list[int] = []
        self._total_weight: float | None = None

    def block_labels(self) -> torch.Tensor:
        """A block index per coordinate: the module that owns each parameter (its layer), in the
        order of first appearance among ``params``."""
        owner: dict[int, int] = {}
        for i, module in enumerate(self.model.modules()):
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), i)
        ids = [owner.get(id(p), -1) for p in self.params]
        rank = {m: r for r, m in enumerate(dict.fromkeys(ids))}
        counts = torch.tensor([p.numel() for p in self.params], device=self.device)
        per_param = torch.tensor([rank[m] for m in ids], device=self.device)
        return torch.repeat_interleave(per_param, counts)

    # data ---------------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """The batches the operator averages over."""
        if self.single:
            yield self.data
        else:
            yield from self.data

    def _output(self, batch: Batch) -> Any:
        if self.forward is not None:
            return self.forward(self.model, batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return self.model(batch[0])
        raise TypeError(
            "batch must be an (inputs, target) pair unless forward(model, batch) is given; "
            f"got {type(batch).__name__}"
        )

    def _loss_of(self, output: Any, batch: Batch) -> torch.Tensor:
        target = batch if self.forward is not None else batch[1]
        loss = self.loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                f"of shape {tuple(getattr(loss, 'shape', ()))}"
            )
        return loss.reshape(())

    def loss(self, batch: Batch) -> torch.Tensor:
        """The loss on one batch, with a graph to the parameters."""
        with torch.enable_grad():
            return self._loss_of(self._output(batch), batch)

    def _gradient(self, batch: Batch) -> list[torch.Tensor]:
        loss = self.loss(batch)
        return list(
            torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        )

    def gradient(self) -> torch.Tensor:
        """The gradient of the (batch-averaged) loss over the chosen parameters, flattened
        (shape ``(size,)``), computed in eval mode like the products; :func:`eigenvalues` starts
        Lanczos from it."""
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        weight_sum = 0.0
        with eval_mode(self.model):
            for weight, grads in self._batch_gradients():
                total.add_(flatten(grads), alpha=weight)
                weight_sum += weight
        if weight_sum <= 0:
            raise ValueError("data holds no samples: the batch weights sum to zero")
        return total.div_(weight_sum)

    def _batch_gradients(self) -> Iterator[tuple[float, list[torch.Tensor]]]:
        for b in self.batches():
            yield self.batch_weight(b), self._gradient(b)

    # caching ------------------------------------------------------------------------------------
    def _state(self) -> list[tuple[float, Any]]:
        """Per-batch (weight, prepared state), built in eval mode (the only forward passes a
        product needs, apart from finite differences) once when caching; rebuilt if a parameter
        was changed in place since."""
        versions = [p._version for p in self.params]
        if self._cached is not None and versions == self._versions:
            return self._cached
        with eval_mode(self.model):
            states = [(self.batch_weight(b), self._prepare(b)) for b in self.batches()]
        if self.cache:
            self._cached, self._versions = states, versions
        return states

    def _iter_states(self) -> Iterator[tuple[float, Any]]:
        if self.cache:
            yield from self._state()
        else:
            for b in self.batches():
                with eval_mode(self.model):
                    state = self._prepare(b)
                yield self.batch_weight(b), state

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product)."""
        self._cached = None

    @abstractmethod
    def _prepare(self, batch: Batch) -> Any:
        """Per-batch state for products (e.g. the gradient with its graph)."""

    @abstractmethod
    def _batch_product(self, state: Any, vs: torch.Tensor) -> torch.Tensor:
        """Products ``(b, size)`` on one batch for the block of vectors ``vs`` ``(b, size)``."""

    def _matmat(self, vs: torch.Tensor) -> torch.Tensor:
        vs = vs.to(self.dtype)
        if self.single:  # one batch: its product, unweighted (no rounding from the average)
            ((weight, state),) = self._state()
            if weight <= 0:
                raise ValueError("data holds no samples: the batch weights sum to zero")
            return self._batch_product(state, vs)
        total = torch.zeros_like(vs)
        weight_sum = 0.0
        for weight, state in self._iter_states():
            total.add_(self._batch_product(state, vs), alpha=weight)
            weight_sum += weight
        if weight_sum <= 0:
            raise ValueError("data holds no samples: the batch weights sum to zero")
        return total.div_(weight_sum)


def flatten_batched(tensors: Sequence[torch.Tensor], b: int) -> torch.Tensor:
    """Concatenate per-parameter blocks of shape ``(b, *shape)`` into ``(b, n)``."""
    return torch.cat([t.reshape(b, -1) for t in tensors], dim=1)


def _grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    *,
    batched: bool,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``autograd.grad`` with zeros for unused inputs; over a leading batch dimension of the
    ``grad_outputs`` when ``batched`` (a vmapped backward, one row at a time if that fails)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        lead = grad_outputs[0].shape[:1] if batched else ()
        return [torch.zeros(*lead, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    outs, gouts = zip(*pairs)
    kwargs = dict(retain_graph=True, create_graph=create_graph, allow_unused=True)
    if batched and gouts[0].shape[0] > 1:
        try:
            res = torch.autograd.grad(outs, inputs, gouts, is_grads_batched=True, **kwargs)
        except RuntimeError:
            rows = [
                _grad(outs, inputs, [g[i] for g in gouts], batched=False, create_graph=create_graph)
                for i in range(gouts[0].shape[0])
            ]
            return [torch.stack(r) for r in zip(*rows)]
        lead = gouts[0].shape[:1]
    else:
        if batched:
            gouts = tuple(g[0] for g in gouts)
        res = torch.autograd.grad(outs, inputs, gouts, **kwargs)
        lead = ()
        if batched:
            res = tuple(r.unsqueeze(0) if r is not None else None for r in res)
            lead = (1,)
    return [
        r if r is not None else torch.zeros(*lead, *x.shape, dtype=x.dtype, device=x.device)
        for r, x in zip(res, inputs)
    ]


class _FiniteDifferenceState:
    """A batch whose products are taken by finite differences of gradients."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch


class Hessian(ModelOperator):
    """The Hessian of the (batch-averaged) loss with respect to the chosen parameters, by
    Hessian-vector products as in PyHessian (Yao et al., "PyHessian: Neural Networks Through the
    Lens of the Hessian", 2020).

    ``Hessian(model, loss_fn, data, params=None, forward=None, cache=None, fd_eps=None)``: see
    :class:`ModelOperator` for ``loss_fn``/``forward``/``data`` and the module docstring for the
    double-backward fallback (finite differences with step ``fd_eps`` relative to the weights'
    scale; default: the cube root of the dtype's machine epsilon).
    """

    def __init__(self, *args: Any, fd_eps: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if fd_eps is not None and not (isinstance(fd_eps, (int, float)) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a number > 0, got {fd_eps!r}")
        self.fd_eps = fd_eps
        self.finite_difference = False

    def _prepare(self, batch: Batch) -> Any:
        if self.finite_difference:
            return _FiniteDifferenceState(batch)
        loss = self.loss(batch)
        grads = torch.autograd.grad(
            loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        blocked = double_backward_unavailable(grads)
        if blocked is not None:
            self._fall_back(blocked)
            return _FiniteDifferenceState(batch)
        return batch, grads

    def _fall_back(self, reason: str) -> None:
        warnings.warn(
            f"double backward is unavailable for this model ({reason}); anyorder.hessian falls "
            "back to finite-difference Hessian-vector products from two gradients",
            RuntimeWarning,
            stacklevel=5,
        )
        self.finite_difference = True
        self.clear_cache()

    def _batch_product(self, state: Any, vs: torch.Tensor) -> torch.Tensor:
        parts = unflatten(vs, self.params)
        if isinstance(state, _FiniteDifferenceState):
            return flatten_batched(self._fd_blocks(state.batch, parts), vs.shape[0])
        batch, grads = state
        try:
            blocks = _grad(grads, self.params, parts, batched=True)
        except RuntimeError as err:
            reason = double_backward_unavailable(err=err)
            if reason is None:  # e.g. out of memory: not a reason to fall back
                raise
            self._fall_back(reason)
            blocks = self._fd_blocks(batch, parts)
        return flatten_batched(blocks, vs.shape[0])

    def _batch_gradients(self) -> Iterator[tuple[float, list[torch.Tensor]]]:
        """Per-batch gradients, taken from the cached graphs when there are (no extra pass)."""
        if not self.cache or self.finite_difference:
            yield from super()._batch_gradients()
            return
        for weight, state in self._state():
            if isinstance(state, _FiniteDifferenceState):
                yield weight, self._gradient(state.batch)
            else:
                yield weight, [g.detach() for g in state[1]]

    def _fd_blocks(self, batch: Batch, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        with eval_mode(self.model):  # these products run forward passes
            return self._fd_rows(batch, vs)

    def _fd_rows(self, batch: Batch, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        b = vs[0].shape[0]
        saved = [p.detach().clone() for p in self.params]
        base = self.fd_eps or float(torch.finfo(self.dtype).eps) ** (1 / 3)
        scale = max(1.0, float(torch.linalg.vector_norm(flatten(saved))) / math.sqrt(self.size))
        rows = []
        try:
            for i in range(b):
                v = [x[i] for x in vs]
                vnorm = float(torch.linalg.vector_norm(flatten(v)))
                if vnorm == 0:
                    rows.append([torch.zeros_like(p) for p in self.params])
                    continue
                eps = base * scale / vnorm
                with torch.no_grad():
                    torch._foreach_add_([p.data for p in self.params], v, alpha=eps)
                g_plus = self._gradient(batch)
                with torch.no_grad():
                    torch._foreach_add_([p.data for p in self.params], v, alpha=-2 * eps)
                g_minus = self._gradient(batch)
                with torch.no_grad():
                    for p, s in zip(self.params, saved):
                        p.data.copy_(s)
                diff = torch._foreach_sub(g_plus, g_minus)
                torch._foreach_div_(diff, 2 * eps)
                rows.append(diff)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
        return [torch.stack(r) for r in zip(*rows)]


class GGN(ModelOperator):
    """The generalised Gauss-Newton matrix ``G = J^T H_L J`` (Schraudolph 2002), with ``J`` the
    Jacobian of the model output (``forward``'s result) with respect to the parameters and ``H_L``
    the Hessian of the loss with respect to that output; positive semi-definite for convex losses.
    PyHessian-style analyses use it as the Hessian's PSD part.

    Products are three backward passes on a cached graph: ``J v`` by the double-vjp trick, then
    ``H_L (J v)`` and ``J^T (H_L J v)``.
    """

    def _prepare(self, batch: Batch) -> Any:
        with torch.enable_grad():
            output = self._output(batch)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"GGN needs the model output as one tensor, got {type(output).__name__}"
                )
            if not output.requires_grad:
                raise ValueError("the model output does not depend on the chosen parameters")
            loss = self._loss_of(output, batch)
            (g_out,) = torch.autograd.grad(loss, output, create_graph=True)
            dummy = torch.zeros_like(output, requires_grad=True)
            jtu = torch.autograd.grad(
                output,
                self.params,
                dummy,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        return output, g_out, dummy, jtu

    def _batch_product(self, state: Any, vs: torch.Tensor) -> torch.Tensor:
        output, g_out, dummy, jtu = state
        (jv,) = _grad(jtu, [dummy], unflatten(vs, self.params), batched=True)
        (hjv,) = _grad([g_out], [output], [jv], batched=True)
        return flatten_batched(_grad([output], self.params, [hjv], batched=True), vs.shape[0])


class Fisher(ModelOperator):
    """The empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` of per-sample loss gradients ``g_i``
    (the outer-product form used by K-FAC-style and M-FAC methods; Kunstner et al., "Limitations
    of the Empirical Fisher Approximation", discuss when it differs from the Fisher).

    Per-sample gradients come from ``torch.func.vmap(grad(...))`` over the samples of each batch,
    each sample evaluated as a batch of one; every tensor in a batch must have the samples along
    its first dimension. With ``cache`` the ``N x size`` matrix of gradients is kept and products
    are two matrix multiplications.
    """

    def __init__(self, *args: Any, chunk_size: int | None = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def _prepare(self, batch: Batch) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        names = {id(p): n for n, p in self.model.named_parameters()}
        chosen = {"model." + names[id(p)]: p.detach() for p in self.params}
        frozen = {
            "model." + n: t.detach()
            for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if "model." + n not in chosen
        }
        wrapper = _SampleLoss(self)

        def sample_loss(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
            one = torch.utils._pytree.tree_map(
                lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample
            )
            return functional_call(wrapper, {**frozen, **p}, (one,), tie_weights=False)

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0), chunk_size=self.chunk_size)(
            chosen, batch
        )
        n = int(default_batch_weight(batch))
        return torch.cat(
            [per_sample["model." + names[id(p)]].reshape(n, -1) for p in self.params], 1
        )

    def _batch_product(self, state: Any, vs: torch.Tensor) -> torch.Tensor:
        return (vs @ state.T) @ state / state.shape[0]


class _SampleLoss(nn.Module):
    """The loss of a batch as a module call, so ``functional_call`` can swap the parameters."""

    def __init__(self, op: ModelOperator) -> None:
        super().__init__()
        self.model = op.model
        self.op = [op]  # a list: not registered as a submodule

    def forward(self, batch: Batch) -> torch.Tensor:
        op = self.op[0]
        return op._loss_of(op._output(batch), batch)
