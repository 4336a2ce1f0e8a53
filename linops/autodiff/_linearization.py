"""A function linearized once at a point: Jv and Jᵀu without re-running it.

The heavy lifting of every autodiff and curvature operator, as plain functions on
tensors. ``out = f(x)`` is evaluated once with ``x`` requiring grad and its graph is kept:

- ``Jᵀ u = autograd.grad(out, x, u)`` (one reverse pass over the kept graph);
- ``J v`` by one of three routes (``Linearization``): forward mode (dual tensors, re-running
  ``f`` without a graph; k columns share one primal pass), the double-backward trick (at
  the first product ``g(w) = Jᵀ w`` is differentiated once with ``create_graph=True`` at a
  dummy cotangent ``w``; ``g`` is linear in ``w``, so ``J v = autograd.grad(g, w, v)`` — a
  reverse pass over the backward graph, with no forward pass and no forward-mode AD), or
  ``torch.func.linearize`` (traced once, then the tangent pass alone).

Where an operation's backward cannot be differentiated (``hardsigmoid``, custom functions
marked ``once_differentiable``), the double backward falls back to forward mode, and
forward mode falls back to the double backward where an operation has no forward-mode
rule. Hessian products (``GradientGraph``) are reverse-over-reverse on the kept gradient
graph, with forward-over-reverse as the fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Linearization",
    "GradientGraph",
    "JVP_ROUTES",
    "HVP_ROUTES",
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
    reduce: Sequence | None = None,
) -> list[torch.Tensor]:
    """``autograd.grad`` for k cotangents at once, keeping the graph.

    Args:
        outputs: tensors ``o_j``.
        inputs: tensors ``x_i``.
        grad_outputs: for each ``o_j`` a tensor of shape ``(k, *o_j.shape)``.
        k: the number of cotangents.
        vectorize: vmapped passes (``is_grads_batched=True``) over at most ``VMAP_CHUNK``
            columns each, or a loop of k passes.
        reduce: for each ``x_i`` None or a function applied to each column's gradient
            (``(*x_i.shape)`` → any tensor) before the columns are stacked: in the loop,
            right after its pass, so the k full gradients never coexist (a convolution's
            output cotangents summed over positions: a tenth of their size or less).

    Returns:
        For each ``x_i`` a tensor ``(k, *x_i.shape)``: ``Σ_j (∂o_j/∂x_i)ᵀ grad_outputs_j``,
        zeros where ``x_i`` does not reach the outputs (reduced column by column where
        ``reduce`` says so).
    """
    if reduce is not None and not any(f is not None for f in reduce):
        reduce = None
    if reduce is not None and (vectorize or k == 1):  # the full columns, then reduced
        full = batched_grad(outputs, inputs, grad_outputs, k, vectorize)
        return [g if f is None else torch.stack([f(c) for c in g])
                for g, f in zip(full, reduce)]
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
    red = reduce or [None] * len(inputs)
    cols = [
        [c if f is None else f(c) for c, f in zip(
            torch.autograd.grad(outputs, inputs, [g[i] for g in grad_outputs], **kw), red)]
        for i in range(k)
    ]
    return [torch.stack(c) for c in zip(*cols)]


#: how ``Linearization.jvp`` may compute ``J v``
JVP_ROUTES = ("auto", "forward mode", "double backward", "linearize")


class Linearization:
    """``f`` linearized at ``x``: the kept graph of ``out = f(x)``.

    ``Jᵀ u`` is one reverse pass over the kept graph. ``J v`` takes one of three routes
    (``route``):

    - ``"double backward"``: differentiate ``g(w) = Jᵀ w`` (built once, lazily, with
      ``create_graph=True``) in the dummy cotangent ``w``: a reverse pass over the backward
      graph, no forward pass;
    - ``"forward mode"``: re-run ``f`` with dual tensors (``torch.autograd.forward_ad``),
      no graph; k columns in one ``vmap`` of ``torch.func.jvp``, so the primal forward
      runs once for all of them;
    - ``"linearize"``: ``torch.func.linearize`` traces the tangent computation once (about
      a hundred gradients' cost, paid at the first product) and then runs the tangent pass
      alone, without the primal: the cheapest ``J v`` once its tracing is amortized over
      many products;
    - ``"auto"``: ``prefer`` (forward mode unless told otherwise), and the other route where
      an operation has no rule for it (the choice is made at the first product and kept;
      ``route_used`` says which).

    Args:
        out: ``f(x)``, computed with ``leaves`` requiring grad (graph kept).
        leaves: the tensors of ``x``, leaves of the graph.
        names: their names, for error messages.
        rerun: ``rerun(tensors) -> out``, re-evaluates ``f`` (forward mode and linearize);
            None allows only the double backward.
        vectorize: k-column reverse passes in one vmapped pass (None: ``default_vectorize``).
        what: how error messages call the inputs ("x", "parameter").
        route: one of ``JVP_ROUTES``; ``"double backward"`` (falling back to forward
            mode where a backward is not differentiable) is the default of the function-level
            operators.
        diagnose: ``diagnose() -> str``, a phrase naming what cannot be differentiated,
            called only when every route failed.
        prefer: the route ``"auto"`` tries first (``"forward mode"`` or
            ``"double backward"``).
        prefer_columns: with ``"auto"`` and ``prefer="double backward"``, products of
            k > 1 columns by forward mode's one vmapped pass instead (its primal pass shared
            by the k columns) where that works: on the attention models of
            ``benchmarks/architectures_bench.py`` the double backward is the cheaper single
            column and the vmapped forward mode the cheaper block.

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
        route: str = "double backward",
        diagnose: Callable[[], str] | None = None,
        prefer: str = "forward mode",
        prefer_columns: bool = False,
    ):
        if route not in JVP_ROUTES:
            raise ValueError(f"route must be one of {JVP_ROUTES}; got {route!r}.")
        if route in ("forward mode", "linearize") and rerun is None:
            raise ValueError(f"route={route!r} needs rerun (it re-evaluates f).")
        self.out = out
        self.leaves = list(leaves)
        self.names = list(names)
        self._rerun = rerun
        self._diagnose = diagnose
        self.vectorize = default_vectorize(out.device) if vectorize is None else vectorize
        self.route = route
        self.prefer = prefer
        self.prefer_columns = prefer_columns
        self._columns_ok = True  # whether forward mode's block still works (prefer_columns)
        #: ``"forward mode"`` once a block of columns took it (``prefer_columns``)
        self.columns_route_used = None
        #: the route ``jvp`` took (None before the first product of ``"auto"``)
        self.route_used = None if route == "auto" else route
        self._g = None  # the double-backward graph, built on first use
        self._linear_fn = None
        self._checked = None
        self._vmap_ok = True
        if not out.requires_grad:
            raise ValueError(
                f"The output does not depend on any {what} ({_name_list(self.names)}): "
                "its value carries no gradient. Check that the function uses its argument "
                "and does not detach it or call .item()/.numpy() on it."
            )
        if route == "double backward":
            self._build_double_backward(what)
        else:
            reached = _reached_leaves(out)
            unused = [n for n, t in zip(self.names, self.leaves) if t not in reached]
            if unused:
                raise ValueError(_unused_message(what, unused))

    def _build_double_backward(self, what="input"):
        with torch.enable_grad():
            self._w = torch.zeros_like(self.out, requires_grad=True)
            g = torch.autograd.grad(self.out, self.leaves, self._w, create_graph=True,
                                    allow_unused=True)
        unused = [n for n, gi in zip(self.names, g) if gi is None]
        if unused:
            raise ValueError(_unused_message(what, unused))
        # entries of g that depend on w (others have a zero derivative, e.g. through sign())
        self._g_idx = [i for i, gi in enumerate(g) if gi.requires_grad]
        self._g = [g[i] for i in self._g_idx]

    # ---------------------------------------------------------------- products
    def jvp(self, V: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """``J v`` for k tangents: ``V[i]`` has shape ``(k, *leaves[i].shape)``; returns
        ``(k, *out.shape)``."""
        route = self.route_used
        if (k > 1 and self.prefer_columns and self._columns_ok and self.route == "auto"
                and self._rerun is not None and self._vmap_ok):
            try:
                jv = self._jvp_vmapped(self._primals(), V, k)
                self.columns_route_used = "forward mode"
                return jv
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - no forward-mode rule or no batching rule:
                self._columns_ok = False  # the single-column route, column by column
        if route == "forward mode":
            return self._jvp_forward(V, k)
        if route == "linearize":
            return self._jvp_linearize(V, k)
        if route == "double backward":
            return self._jvp_double_backward(V, k)
        # auto: the preferred route, else the other; the first product decides
        if self.prefer == "double backward" or self._rerun is None:
            try:
                jv = self._jvp_double_backward(V, k, fallback=False)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as backward_err:
                if self._rerun is None:
                    raise
                try:
                    jv = self._jvp_forward(V, k)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001
                    raise self._no_route_error(err, backward_err) from err
                self.route_used = "forward mode"
                return jv
            self.route_used = "double backward"
            return jv
        try:
            jv = self._jvp_forward(V, k)
        except torch.OutOfMemoryError:
            raise
        except Exception as forward_err:  # noqa: BLE001 - the build's forward pass ran, so
            # what fails here is forward mode itself (a missing rule, dual tensors in an
            # operation that does not take them): the double backward is tried instead
            try:
                jv = self._jvp_double_backward(V, k, fallback=False)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                raise self._no_route_error(forward_err, err) from err
            self.route_used = "double backward"
            return jv
        self.route_used = "forward mode"
        return jv

    def _no_route_error(self, forward_err, backward_err) -> RuntimeError:
        where = self._diagnose() if self._diagnose is not None else ""
        where = f"{where} of the model" if where else "an operation of the model"
        return RuntimeError(
            f"J v cannot be computed: {where} can be differentiated neither in forward "
            f"mode ({_first_line(forward_err)}) nor twice in reverse mode "
            f"({_first_line(backward_err)}). Write it with differentiable torch operations, "
            "or give its torch.autograd.Function a jvp (forward-mode) rule or a "
            "differentiable backward (not @once_differentiable)."
        )

    def _jvp_double_backward(self, V, k, fallback=True):
        if self._g is None:
            self._build_double_backward()
        if not self._g:
            return self.out.new_zeros((k, *self.out.shape))
        if self._checked is None:
            self._checked = _twice_differentiable(self._g)
        if not self._checked:
            if not fallback or self._rerun is None:
                raise RuntimeError(
                    "J v needs the backward pass to be differentiable (double "
                    "backward), but the graph holds a function marked "
                    "once_differentiable."
                )
            self.route_used = "forward mode"
            return self._jvp_forward(V, k)
        try:
            (jv,) = batched_grad(self._g, [self._w], [V[i] for i in self._g_idx], k,
                                 self.vectorize)
            return jv
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            if not fallback or self._rerun is None:
                raise RuntimeError(
                    "J v needs the backward pass to be differentiable (double "
                    f"backward), which failed: {err}"
                ) from err
            self.route_used = "forward mode"
            return self._jvp_forward(V, k)

    def _primals(self):
        return [t.detach() for t in self.leaves]

    def _jvp_forward(self, V, k):
        """Forward mode: k = 1 with dual tensors, k > 1 in one vmap of ``torch.func.jvp``
        (chunks of ``VMAP_CHUNK``), the primal forward once per chunk."""
        if self._rerun is None:
            raise RuntimeError("J v in forward mode needs to re-run the function (rerun).")
        primals = self._primals()
        if k > 1 and self._vmap_ok:
            try:
                return self._jvp_vmapped(primals, V, k)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - an operation vmap cannot batch: loop instead
                self._vmap_ok = False
        return torch.stack([self._jvp_dual(primals, [v[i] for v in V]) for i in range(k)])

    def _jvp_dual(self, primals, tangents):
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            with torch.no_grad():
                out = self._rerun(duals)
            tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:
            return self.out.new_zeros(self.out.shape)
        return tangent

    def _jvp_vmapped(self, primals, V, k):
        rerun = self._rerun

        def f(*tensors):
            return rerun(list(tensors))

        def column(*tangents):
            return torch.func.jvp(f, tuple(primals), tangents)[1]

        parts = []
        for i in range(0, k, VMAP_CHUNK):
            with torch.no_grad(), warnings.catch_warnings():
                # an operation without a batching rule runs in PyTorch's loop: correct, and
                # still one primal pass; its performance warning is not the user's business
                warnings.filterwarnings("ignore", message="There is a performance drop")
                parts.append(torch.func.vmap(column)(*[v[i:i + VMAP_CHUNK] for v in V]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _jvp_linearize(self, V, k):
        if self._linear_fn is None:
            rerun = self._rerun

            def f(*tensors):
                return rerun(list(tensors))

            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr")
                _, self._linear_fn = torch.func.linearize(f, *self._primals())
        lin = self._linear_fn
        with torch.no_grad():
            if k == 1:
                return lin(*[v[0] for v in V]).unsqueeze(0)
            return torch.stack([lin(*[v[i] for v in V]) for i in range(k)])

    def vjp(self, U: torch.Tensor, k: int) -> list[torch.Tensor]:
        """``Jᵀ u`` for k cotangents ``U`` of shape ``(k, *out.shape)``; returns for each
        leaf a tensor ``(k, *leaf.shape)``."""
        return batched_grad([self.out], self.leaves, [U], k, self.vectorize)


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unused_message(what, unused) -> str:
    return (
        f"The output does not depend on the {what}(s) {_name_list(unused)}: their "
        "derivative is structurally zero. Leave them out (pass a subset) or check "
        "that the function uses them."
    )


def _reached_leaves(out: torch.Tensor) -> set:
    """The leaf tensors the graph of ``out`` reaches (one walk over its nodes)."""
    reached, seen = set(), set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            reached.add(var)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return reached


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
        name = node.name()
        if name.endswith("Error") or name.endswith("NotImplemented"):
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


#: how ``GradientGraph.hvp`` may compute ``H v``
HVP_ROUTES = ("auto", "reverse-over-reverse", "forward-over-reverse")


class GradientGraph:
    """The gradient ``∇f(x)`` kept with its graph: Hessian products without a forward pass.

    ``H v = autograd.grad(∇f, x, v)``, reverse-over-reverse on the kept graph. Where an
    operation has no double backward (or a ``once_differentiable`` backward), ``"auto"``
    falls back to forward-over-reverse with ``torch.func`` (``jvp`` of ``grad``), which
    re-runs ``f`` at every product.

    Args:
        grads: ``∇f`` with respect to each leaf, computed with ``create_graph=True``.
        leaves: the leaves of the graph.
        rerun: ``rerun(tensors) -> f`` (a scalar), for the fallback; None disables it.
        vectorize: k-column products in one vmapped pass.
        route: one of ``HVP_ROUTES``.
        diagnose: ``diagnose() -> str`` naming what has no second derivative, called only
            when every route failed.
    """

    def __init__(self, grads, leaves, rerun: Callable | None, vectorize: bool,
                 route: str = "auto", diagnose: Callable[[], str] | None = None):
        if route not in HVP_ROUTES:
            raise ValueError(f"route must be one of {HVP_ROUTES}; got {route!r}.")
        if route == "forward-over-reverse" and rerun is None:
            raise ValueError("route='forward-over-reverse' needs rerun (it re-evaluates f).")
        self.leaves = list(leaves)
        self._idx = [i for i, g in enumerate(grads) if g.requires_grad]
        self._grads = [grads[i] for i in self._idx]
        self._rerun = rerun
        self._diagnose = diagnose
        self.vectorize = vectorize
        self.route = route
        if route == "forward-over-reverse":
            self._forward_mode = True
        elif route == "reverse-over-reverse":
            self._forward_mode = False
        else:
            self._forward_mode = bool(self._grads) and not _twice_differentiable(self._grads)

    @property
    def route_used(self) -> str:
        """The route of the products (``"forward-over-reverse"`` once ``"auto"`` fell back)."""
        return "forward-over-reverse" if self._forward_mode else "reverse-over-reverse"

    def hvp(self, V: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        """``H v`` for ``V[i]`` of shape ``(k, *leaves[i].shape)``; same shapes back."""
        if not self._grads:  # f is linear (or constant) in x
            return [torch.zeros_like(v) for v in V]
        if not self._forward_mode:
            if self.route == "reverse-over-reverse" and not _twice_differentiable(self._grads):
                raise self._error(RuntimeError(
                    "the graph holds a backward marked once_differentiable (or without a "
                    "derivative)"))
            try:
                return batched_grad(self._grads, self.leaves, [V[i] for i in self._idx], k,
                                    self.vectorize)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                if self._rerun is None or self.route != "auto":
                    raise self._error(err) from err
                self._forward_mode = True
        try:
            return self._hvp_forward(V, k)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            raise self._error(err) from err

    def _error(self, err):
        where = self._diagnose() if self._diagnose is not None else ""
        return _second_order_error(err, where)

    def _hvp_forward(self, V, k):
        primals = tuple(t.detach() for t in self.leaves)
        rerun = self._rerun
        grad = torch.func.grad(lambda *ts: rerun(list(ts)).reshape(()),
                               argnums=tuple(range(len(primals))))
        cols = [torch.func.jvp(grad, primals, tuple(v[i] for v in V))[1] for i in range(k)]
        return [torch.stack(c) for c in zip(*cols)]


def _second_order_error(err: Exception, where: str = "") -> RuntimeError:
    at = f" ({where})" if where else ""
    return RuntimeError(
        "Hessian products need second derivatives of every operation, and PyTorch has "
        f"neither a double backward nor a forward-mode rule for one of them{at}: {err}. Use "
        "the GGN instead (it needs first derivatives only), or replace that operation."
    )
