"""A function linearized once at a point: Jv and Jᵀu without re-running it.

The heavy lifting of every autodiff and curvature operator, as plain functions on
tensors. ``out = f(x)`` is evaluated once with ``x`` requiring grad and its graph is kept:

- ``Jᵀ u = autograd.grad(out, x, u)`` (one reverse pass over the kept graph);
- ``J v`` by the double-backward trick: at build time ``g(w) = Jᵀ w`` is differentiated
  once with ``create_graph=True`` at a dummy cotangent ``w`` (zeros, requiring grad);
  ``g`` is linear in ``w``, so ``J v = autograd.grad(g, w, v)`` — a reverse pass over the
  backward graph, with no forward pass and no forward-mode AD (which not every
  operation implements).

Where an operation's backward cannot be differentiated (``hardsigmoid``, custom functions
marked ``once_differentiable``), ``J v`` falls back to forward mode (``torch.func.jvp``),
which re-runs ``f``. Hessian products (``GradientGraph``) are reverse-over-reverse on the
kept gradient graph, with forward-over-reverse as the fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Linearization",
    "GradientGraph",
    "gradient_with_graph",
    "batched_grad",
    "default_vectorize",
    "VMAP_CHUNK",
]

#: the most columns one vmapped pass takes (more are split into chunks, bounding memory)
VMAP_CHUNK = 32


def default_vectorize(device: torch.device) -> bool:
    """Whether products with k columns use one vmapped pass (``is_grads_batched``) or a
    loop of k passes by default.

    On a GPU one vmapped pass replaces k kernel launches per operation. On a CPU the
    passes are compute-bound and a loop measured as fast or faster
    (``benchmarks/profile_products.py``), with less memory.
    """
    return torch.device(device).type != "cpu"


def batched_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    k: int,
    vectorize: bool,
) -> list[torch.Tensor]:
    """``autograd.grad`` for k cotangents at once, keeping the graph.

    Args:
        outputs: tensors ``o_j``.
        inputs: tensors ``x_i``.
        grad_outputs: for each ``o_j`` a tensor of shape ``(k, *o_j.shape)``.
        k: the number of cotangents.
        vectorize: vmapped passes (``is_grads_batched=True``) over at most ``VMAP_CHUNK``
            columns each, or a loop of k passes.

    Returns:
        For each ``x_i`` a tensor ``(k, *x_i.shape)``: ``Σ_j (∂o_j/∂x_i)ᵀ grad_outputs_j``,
        zeros where ``x_i`` does not reach the outputs.
    """
    kw = dict(retain_graph=True, materialize_grads=True)
    if k == 1:
        res = torch.autograd.grad(outputs, inputs, [g[0] for g in grad_outputs], **kw)
        return [r.unsqueeze(0) for r in res]
    if vectorize:
        if k > VMAP_CHUNK:  # bound the memory of one vmapped pass
            parts = [
                batched_grad(outputs, inputs, [g[i:i + VMAP_CHUNK] for g in grad_outputs],
                             min(VMAP_CHUNK, k - i), True)
                for i in range(0, k, VMAP_CHUNK)
            ]
            return [torch.cat(p) for p in zip(*parts)]
        return list(
            torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, **kw)
        )
    cols = [
        torch.autograd.grad(outputs, inputs, [g[i] for g in grad_outputs], **kw)
        for i in range(k)
    ]
    return [torch.stack(c) for c in zip(*cols)]


class Linearization:
    """``f`` linearized at ``x``: the kept graph of ``out = f(x)``.

    Args:
        out: ``f(x)``, computed with ``leaves`` requiring grad (graph kept).
        leaves: the tensors of ``x``, leaves of the graph.
        names: their names, for error messages.
        rerun: ``rerun(tensors) -> out``, re-evaluates ``f`` (used only for the forward-mode
            fallback of ``jvp``); None disables the fallback.
        vectorize: k-column products in one vmapped pass (None: ``default_vectorize``).
        what: how error messages call the inputs ("x", "parameter").

    Cost: building runs one reverse pass with ``create_graph=True``; ``jvp`` and ``vjp`` run
    one reverse pass each over the kept graphs.

    Raises:
        ValueError: if ``out`` does not depend on some input (the message names it).
    """

    def __init__(
        self,
        out: torch.Tensor,
        leaves: Sequence[torch.Tensor],
        names: Sequence[str],
        rerun: Callable | None = None,
        vectorize: bool | None = None,
        what: str = "input",
    ):
        self.out = out
        self.leaves = list(leaves)
        self.names = list(names)
        self._rerun = rerun
        self.vectorize = default_vectorize(out.device) if vectorize is None else vectorize
        self._forward_mode = False
        self._checked = None
        if not out.requires_grad:
            raise ValueError(
                f"The output does not depend on any {what} ({_name_list(self.names)}): "
                "its value carries no gradient. Check that the function uses its argument "
                "and does not detach it or call .item()/.numpy() on it."
            )
        with torch.enable_grad():
            self._w = torch.zeros_like(out, requires_grad=True)
            g = torch.autograd.grad(out, self.leaves, self._w, create_graph=True,
                                    allow_unused=True)
        unused = [n for n, gi in zip(self.names, g) if gi is None]
        if unused:
            raise ValueError(
                f"The output does not depend on the {what}(s) {_name_list(unused)}: their "
                "derivative is structurally zero. Leave them out (pass a subset) or check "
                "that the function uses them."
            )
        # entries of g that depend on w (others have a zero derivative, e.g. through sign())
        self._g_idx = [i for i, gi in enumerate(g) if gi.requires_grad]
        self._g = [g[i] for i in self._g_idx]

    # ---------------------------------------------------------------- products
    def jvp(self, V: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """``J v`` for k tangents: ``V[i]`` has shape ``(k, *leaves[i].shape)``; returns
        ``(k, *out.shape)``."""
        if not self._forward_mode:
            if not self._g:
                return self.out.new_zeros((k, *self.out.shape))
            if self._checked is None:
                self._checked = _twice_differentiable(self._g)
                if not self._checked:
                    if self._rerun is None:
                        raise RuntimeError(
                            "J v needs the backward pass to be differentiable (double "
                            "backward), but the graph holds a function marked "
                            "once_differentiable."
                        )
                    self._forward_mode = True
                    return self._jvp_forward(V, k)
            try:
                (jv,) = batched_grad(self._g, [self._w], [V[i] for i in self._g_idx], k,
                                     self.vectorize)
                return jv
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                if self._rerun is None:
                    raise RuntimeError(
                        "J v needs the backward pass to be differentiable (double "
                        f"backward), which failed: {err}"
                    ) from err
                self._forward_mode = True
        return self._jvp_forward(V, k)

    def _jvp_forward(self, V, k):
        primals = tuple(t.detach() for t in self.leaves)

        def f(*tensors):
            return self._rerun(list(tensors))

        cols = [torch.func.jvp(f, primals, tuple(v[i] for v in V))[1] for i in range(k)]
        return torch.stack(cols)

    def vjp(self, U: torch.Tensor, k: int) -> list[torch.Tensor]:
        """``Jᵀ u`` for k cotangents ``U`` of shape ``(k, *out.shape)``; returns for each
        leaf a tensor ``(k, *leaf.shape)``."""
        return batched_grad([self.out], self.leaves, [U], k, self.vectorize)


def _twice_differentiable(tensors) -> bool:
    """False if the graph of ``tensors`` holds a node that raises when differentiated
    (the output of a ``once_differentiable`` backward). Such a node may not connect to
    the dummy cotangent, so the double backward would silently drop its contribution."""
    seen = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name().endswith("Error"):
            return False
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return True


def _name_list(names) -> str:
    names = [n if n else "x" for n in names]
    if len(names) > 8:
        return ", ".join(repr(n) for n in names[:8]) + f", ... ({len(names)} in all)"
    return ", ".join(repr(n) for n in names)


def gradient_with_graph(value: torch.Tensor, leaves) -> tuple:
    """``∇ value`` in ``leaves`` with ``create_graph=True`` (None for unused leaves).

    The unit cotangent requires grad, so that a ``once_differentiable`` backward on the
    way marks its result (instead of silently returning a constant, which would drop its
    second derivative from every Hessian product).
    """
    one = torch.ones((), dtype=value.dtype, device=value.device, requires_grad=True)
    with torch.enable_grad():
        return torch.autograd.grad(value.reshape(()), leaves, one, create_graph=True,
                                   allow_unused=True)


class GradientGraph:
    """The gradient ``∇f(x)`` kept with its graph: Hessian products without a forward pass.

    ``H v = autograd.grad(∇f, x, v)``, reverse-over-reverse on the kept graph. Where an
    operation has no double backward (or a ``once_differentiable`` backward), it falls
    back to forward-over-reverse with ``torch.func`` (``jvp`` of ``grad``), which re-runs
    ``f`` at every product.

    Args:
        grads: ``∇f`` with respect to each leaf, computed with ``create_graph=True``.
        leaves: the leaves of the graph.
        rerun: ``rerun(tensors) -> f`` (a scalar), for the fallback; None disables it.
        vectorize: k-column products in one vmapped pass.
    """

    def __init__(self, grads, leaves, rerun: Callable | None, vectorize: bool):
        self.leaves = list(leaves)
        self._idx = [i for i, g in enumerate(grads) if g.requires_grad]
        self._grads = [grads[i] for i in self._idx]
        self._rerun = rerun
        self.vectorize = vectorize
        self._forward_mode = bool(self._grads) and not _twice_differentiable(self._grads)

    def hvp(self, V: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        """``H v`` for ``V[i]`` of shape ``(k, *leaves[i].shape)``; same shapes back."""
        if not self._grads:  # f is linear (or constant) in x
            return [torch.zeros_like(v) for v in V]
        if not self._forward_mode:
            try:
                return batched_grad(self._grads, self.leaves, [V[i] for i in self._idx], k,
                                    self.vectorize)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                if self._rerun is None:
                    raise _second_order_error(err) from err
                self._forward_mode = True
        try:
            return self._hvp_forward(V, k)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            raise _second_order_error(err) from err

    def _hvp_forward(self, V, k):
        primals = tuple(t.detach() for t in self.leaves)
        grad = torch.func.grad(lambda *ts: self._rerun(list(ts)).reshape(()),
                               argnums=tuple(range(len(primals))))
        cols = [torch.func.jvp(grad, primals, tuple(v[i] for v in V))[1] for i in range(k)]
        return [torch.stack(c) for c in zip(*cols)]


def _second_order_error(err: Exception) -> RuntimeError:
    return RuntimeError(
        "Hessian products need second derivatives of every operation, and PyTorch has "
        f"neither a double backward nor a forward-mode rule for one of them: {err}. Use "
        "the GGN instead (it needs first derivatives only), or replace that operation."
    )
