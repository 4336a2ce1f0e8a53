"""Curvature products of a multilayer perceptron with raw tensor operations (no autograd).

A model that is a chain of ``nn.Linear`` layers and elementwise activations (an
``nn.Sequential``, nested ones flattened) has a Jacobian whose products can be written
out by hand. With ``a_l`` the input of Linear layer ``l`` (``h_l = a_l W_lᵀ + b_l``) and
``σ'``, ``σ''`` the activations' derivatives at their inputs, all cached by one forward
pass (``mlp_linearize``):

- ``J v`` (tangent forward): ``dh_l = a_l dW_lᵀ + db_l + da_l W_lᵀ``, through an activation
  ``da ← σ' ⊙ da``; the ``da`` term is skipped where it is zero (before the first layer
  holding a differentiated parameter);
- ``Jᵀ u`` (backward): ``g ← g ⊙ σ'`` through an activation; at a Linear layer
  ``∇W_l = gᵀ a_l``, ``∇b_l = Σ_n g``, ``g ← g W_l`` (skipped at the first differentiated
  layer);
- ``H v`` (Pearlmutter's R-operator): the tangent forward above, then the backward of the
  tangent ``ρ = ∇²_o ℓ · (J v)``: through an activation
  ``ρ ← ρ ⊙ σ' + (g ⊙ σ'') ⊙ da``, at a Linear layer ``R∇W_l = ρᵀ a_l + gᵀ da_l``,
  ``R∇b_l = Σ_n ρ``, ``ρ ← ρ W_l + g dW_l``, with ``g`` the gradient's backward pass cached
  when the operator is built (``mlp_gradient``).

Every product takes k columns at once (tensors ``(k, N, width)``: one batched GEMM per
term, no loop over columns), in at most 2 (GGN) or 3 (Hessian) GEMMs of the size of a
layer per direction. A gradient through autograd costs 3 such GEMMs plus autograd's
bookkeeping, which dominates at small batch sizes.

These are pure functions on tensors; ``linops.curvature`` operators call them when
``mlp_spec`` accepts the model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> names = ("0.weight", "2.weight")
    >>> spec = mlp_spec(model, names, torch.float32, order=1)
    >>> lin = mlp_linearize(spec, dict(model.named_parameters()), torch.randn(8, 3))
    >>> V = [torch.randn(5, 4, 3), torch.randn(5, 2, 4)]  # k = 5 tangents
    >>> mlp_jvp(lin, V, 5).shape
    torch.Size([5, 8, 2])
    >>> [g.shape for g in mlp_vjp(lin, torch.randn(5, 8, 2), 5)]
    [torch.Size([5, 4, 3]), torch.Size([5, 2, 4])]
    >>> conv = nn.Sequential(nn.Conv1d(1, 1, 3))
    >>> print(mlp_spec(conv, ("0.weight",), torch.float32, 1))  # doctest: +ELLIPSIS
    module '0' (Conv1d) is neither nn.Linear nor an elementwise activation, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MLPSpec",
    "MLPLinearization",
    "mlp_spec",
    "mlp_input_problem",
    "mlp_linearize",
    "mlp_jvp",
    "mlp_vjp",
    "mlp_gradient",
    "mlp_hvp",
    "mlp_layer_cotangents",
]

#: at most this many entries (k × N × width) in one product's largest tensor; more
#: columns are split into chunks, bounding the memory of a product with many columns
COLUMN_BUDGET = 2**24

# -------------------------------------------------------------------------- activations
# closed forms: h -> (σ(h), σ'(h), σ''(h) or None); None marks a zero derivative.


def _silu(m, h, order):
    s = torch.sigmoid(h)
    d1 = s * (1 + h * (1 - s))
    d2 = s * (1 - s) * (2 + h * (1 - 2 * s)) if order > 1 else None
    return h * s, d1, d2


def _tanh(m, h, order):
    t = torch.tanh(h)
    d1 = 1 - t * t
    return t, d1, (-2 * t * d1 if order > 1 else None)


def _sigmoid(m, h, order):
    s = torch.sigmoid(h)
    d1 = s * (1 - s)
    return s, d1, (d1 * (1 - 2 * s) if order > 1 else None)


def _relu(m, h, order):
    # PyTorch's derivative at 0 is 0 (threshold_backward keeps h > 0)
    return torch.relu(h), (h > 0).to(h.dtype), None


def _leaky_relu(m, h, order):
    slope = m.negative_slope
    d1 = (h > 0).to(h.dtype).mul_(1 - slope).add_(slope)  # 1 where h > 0, else the slope
    return torch.nn.functional.leaky_relu(h, slope), d1, None


def _hardsigmoid(m, h, order):
    # relu6(h + 3) / 6: slope 1/6 on (-3, 3) (PyTorch's convention at the kinks), σ'' = 0;
    # a closed form because PyTorch has no second derivative rule for hardsigmoid_backward
    d1 = ((h > -3) & (h < 3)).to(h.dtype) / 6
    return torch.nn.functional.hardsigmoid(h), d1, None


_CLOSED_FORMS = {
    nn.SiLU: _silu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.ReLU: _relu,
    nn.LeakyReLU: _leaky_relu,
    nn.Hardsigmoid: _hardsigmoid,
}

#: elementwise activations whose derivatives come from one autograd call on the
#: activation (``σ'`` = the gradient of ``Σ σ(h)``; ``σ''`` = that of ``Σ σ'(h)``)
_AUTOGRAD_ELEMENTWISE = (
    nn.GELU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.ReLU6, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink,
)


def _autograd_derivatives(m, h, order):
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        a = m(x.clone())  # clone: an in-place activation must not write into the leaf
        (d1,) = torch.autograd.grad(a, x, torch.ones_like(a), create_graph=order > 1)
        d2 = None
        if order > 1 and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1, x, torch.ones_like(d1), allow_unused=True)
    return a.detach(), d1.detach(), (None if d2 is None else d2.detach())


def _activation(m, h, order):
    fn = _CLOSED_FORMS.get(type(m), _autograd_derivatives)
    return fn(m, h, order)


# -------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class _Linear:
    weight: str  # parameter names in model.named_parameters()
    bias: str | None
    in_features: int


@dataclass(frozen=True)
class _Act:
    module: nn.Module


@dataclass(frozen=True)
class MLPSpec:
    """A model recognized as a multilayer perceptron.

    Attributes:
        layers: the chain, in order: Linear layers (by parameter name) and activations
            (identities and inactive dropout removed).
        flatten_input: whether an ``nn.Flatten`` before the first layer flattens the input
            to ``(N, d)``.
        in_features: ``d``, what the first Linear layer takes.
        start: index in ``layers`` of the first Linear layer holding a differentiated
            parameter (the layers before it are constant in the parameters).
        param_names: the differentiated parameters, in the operator's order.
        order: 1 (Jacobian products) or 2 (Hessian products as well).
    """

    layers: tuple
    flatten_input: bool
    in_features: int
    start: int
    param_names: tuple
    order: int


def _flatten_sequential(module: nn.Module, prefix: str, out: list) -> str | None:
    """Append ``(name, module)`` of the chain to ``out``; a reason string if not a chain."""
    if type(module) is nn.Sequential:
        if _has_hooks(module):
            return f"module {prefix or 'model'!r} has forward hooks"
        for name, child in module._modules.items():  # named_children() skips repeats
            if child is None:
                continue
            reason = _flatten_sequential(child, f"{prefix}.{name}" if prefix else name, out)
            if reason is not None:
                return reason
        return None
    out.append((prefix, module))
    return None


def _chain_modules(model: nn.Module) -> list | str:
    """``[(name, module, label)]`` of the chain ``model`` (nested ``nn.Sequential``
    flattened), or why it is not one (hooks on a module or registered globally)."""
    chain: list = []
    reason = _flatten_sequential(model, "", chain)
    if reason is not None:
        return reason
    if _global_hooks():
        return "global module hooks are registered (torch.nn.modules.module)"
    out = []
    for name, m in chain:
        label = f"module {name or 'model'!r} ({type(m).__name__})"
        if _has_hooks(m):
            return f"{label} has forward or backward hooks"
        out.append((name, m, label))
    return out


def _own_params(name: str, m: nn.Module, params: Mapping, label: str,
                dtype: torch.dtype | None = None) -> tuple | str:
    """``(weight name, bias name or None)`` of a layer whose ``weight`` and ``bias`` are
    its own (``params``: ``dict(model.named_parameters())``) and, where given, of
    ``dtype``; or why not (shared with another module: ``named_parameters`` names a
    shared tensor once)."""
    wname = f"{name}.weight" if name else "weight"
    bname = (f"{name}.bias" if name else "bias") if m.bias is not None else None
    if params.get(wname) is not m.weight or (bname and params.get(bname) is not m.bias):
        return f"{label} shares its parameters with another module"
    if dtype is not None and m.weight.dtype != dtype:
        return f"{label} has dtype {m.weight.dtype}, the parameters {dtype}"
    return wname, bname


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return any(bool(getattr(mod, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _second_derivative_missing(m: nn.Module, dtype) -> str | None:
    """Why PyTorch cannot give ``σ''`` of ``m`` (None if it can)."""
    if type(m) in _CLOSED_FORMS:
        return None
    try:
        _autograd_derivatives(m, torch.linspace(-2, 2, 7, dtype=dtype), 2)
    except RuntimeError as err:
        return f"PyTorch has no second derivative of {type(m).__name__} ({err})"
    return None


def mlp_spec(model: nn.Module, param_names: Sequence[str], dtype: torch.dtype,
             order: int, named=None) -> MLPSpec | str:
    """Recognize a multilayer perceptron, or say why ``model`` is not one.

    Accepted: an ``nn.Sequential`` (nested ones flattened) or a single layer, made of
    ``nn.Linear`` (with or without bias), elementwise activations (ReLU, LeakyReLU, SiLU,
    Tanh, Sigmoid, GELU, Softplus, ELU, CELU, SELU, Mish, Hardswish, Hardtanh, ReLU6,
    LogSigmoid, Softsign, Tanhshrink, Softshrink, Hardshrink, Hardsigmoid; for
    ``order=2`` only those PyTorch can differentiate twice), ``nn.Identity``, dropout in
    eval mode (or with ``p=0``) and ``nn.Flatten()``. Exact types only (a subclass may
    change ``forward``), no forward or backward hooks, no parameter other than the Linear
    layers' among ``param_names``, every Linear layer of ``dtype``.

    Args:
        model: the module.
        param_names: the differentiated parameters, names of ``model.named_parameters()``.
        dtype: the parameters' dtype.
        order: 1 for Jacobian products, 2 for Hessian products too.
        named: ``dict(model.named_parameters())`` where the caller has it.

    Returns:
        The ``MLPSpec``, or a sentence naming what does not qualify.
    """
    chain = _chain_modules(model)
    if isinstance(chain, str):
        return chain
    layers, flatten_input, in_features = [], False, None
    params = dict(model.named_parameters()) if named is None else named
    for name, m, label in chain:
        if type(m) is nn.Linear:
            owned = _own_params(name, m, params, label, dtype)
            if isinstance(owned, str):
                return owned
            wname, bname = owned
            if in_features is None:
                in_features = m.in_features
            layers.append(_Linear(wname, bname, m.in_features))
        elif type(m) is nn.Flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                return f"{label} is not nn.Flatten(start_dim=1, end_dim=-1)"
            if in_features is None:
                flatten_input = True
        elif type(m) is nn.Identity:
            continue
        elif type(m) in (nn.Dropout, nn.AlphaDropout):
            if m.training and m.p > 0:
                return f"{label} is active (training mode)"
        elif type(m) in _CLOSED_FORMS or type(m) in _AUTOGRAD_ELEMENTWISE:
            if any(True for _ in m.parameters()):
                return f"{label} has parameters"
            if order > 1:
                missing = _second_derivative_missing(m, dtype)
                if missing is not None:
                    return missing
            layers.append(_Act(m))
        else:
            return (f"{label} is neither nn.Linear nor an elementwise activation, "
                    "nn.Identity, nn.Flatten or inactive dropout")
    if in_features is None:
        return "the model has no nn.Linear layer"
    owned = {n for layer in layers if isinstance(layer, _Linear)
             for n in (layer.weight, layer.bias) if n is not None}
    other = [n for n in param_names if n not in owned]
    if other:
        return f"the parameter(s) {other[:4]} do not belong to an nn.Linear layer"
    start = next(i for i, layer in enumerate(layers) if isinstance(layer, _Linear)
                 and (layer.weight in param_names or layer.bias in param_names))
    return MLPSpec(tuple(layers), flatten_input, in_features, start, tuple(param_names), order)


def mlp_input_problem(spec: MLPSpec, X, dtype: torch.dtype) -> str | None:
    """Why the batch input ``X`` does not fit the fast path (None if it does)."""
    if not isinstance(X, torch.Tensor):
        return f"the input is a {type(X).__name__}, not a tensor"
    if X.dtype != dtype:
        return f"the input has dtype {X.dtype}, the parameters {dtype}"
    ndim_ok = X.ndim >= 2 if spec.flatten_input else X.ndim == 2
    if not ndim_ok:
        return f"the input has shape {tuple(X.shape)}; the fast path takes (N, d)"
    d = math.prod(X.shape[1:])
    if d != spec.in_features:
        return (f"the input has {d} features per sample; the first Linear layer takes "
                f"{spec.in_features}")
    return None


# -------------------------------------------------------------------------- linearization
@dataclass
class _LinearState:
    W: torch.Tensor
    b: torch.Tensor | None
    a: torch.Tensor  # the layer's input (N, d_in)
    wi: int | None  # index of the weight among the differentiated parameters
    bi: int | None
    first: bool  # the first differentiated layer: no input tangent, no input gradient
    g: torch.Tensor | None = None  # Hessian: the gradient at the layer's output (N, d_out)


@dataclass
class _ActState:
    d1: torch.Tensor  # σ'(h)
    d2: torch.Tensor | None  # σ''(h) (None: zero or not needed)
    c: torch.Tensor | None = None  # Hessian: g ⊙ σ''(h), g the gradient at the output


@dataclass
class MLPLinearization:
    """One batch's forward pass, cached: what every product needs.

    Attributes:
        layers: from the first differentiated layer on, per Linear layer its weight,
            bias and input, per activation its derivatives ``σ'`` (and ``σ''``).
        out: the model output ``(N, C)``.
        n_params: the number of differentiated parameters.
        width: the largest layer width (products with many columns are chunked by it).
        order: ``spec.order``.
    """

    layers: list
    out: torch.Tensor
    n_params: int
    width: int
    order: int


def mlp_linearize(spec: MLPSpec, tensors: Mapping[str, torch.Tensor],
                  X: torch.Tensor) -> MLPLinearization:
    """One forward pass with raw operations, caching each Linear layer's input and each
    activation's ``σ'`` (and ``σ''`` for ``spec.order == 2``).

    Args:
        spec: from ``mlp_spec``.
        tensors: every Linear layer's weight and bias by name (detached or not: they are
            detached here).
        X: the batch input ``(N, d)`` (``(N, ...)`` when the model flattens it first),
            checked by ``mlp_input_problem``.

    Cost: one forward pass; activations without a closed form (all but SiLU, Tanh,
    Sigmoid, ReLU and LeakyReLU) one autograd call each (two for ``σ''``).
    """
    index = {n: i for i, n in enumerate(spec.param_names)}
    a = X.detach()
    if spec.flatten_input:
        a = a.flatten(1)
    layers, width = [], a.shape[1]
    with torch.no_grad():
        for i, layer in enumerate(spec.layers):
            active = i >= spec.start
            if isinstance(layer, _Linear):
                W = tensors[layer.weight].detach()
                b = None if layer.bias is None else tensors[layer.bias].detach()
                if active:
                    layers.append(_LinearState(W, b, a, index.get(layer.weight),
                                               index.get(layer.bias), i == spec.start))
                a = torch.nn.functional.linear(a, W, b)
                width = max(width, a.shape[1])
            elif active:
                a, d1, d2 = _activation(layer.module, a, spec.order)
                layers.append(_ActState(d1, d2))
            else:  # before the first differentiated layer: the value only (out of place,
                # as ``a`` may be the caller's input)
                a = layer.module(a.clone() if getattr(layer.module, "inplace", False) else a)
    return MLPLinearization(layers, a, len(spec.param_names), width, spec.order)


# -------------------------------------------------------------------------- products
def _chunks(lin: MLPLinearization, k: int):
    step = max(1, COLUMN_BUDGET // max(1, lin.out.shape[0] * lin.width))
    return [(i, min(k, i + step)) for i in range(0, k, step)]


def _tangent_forward(lin: MLPLinearization, V: Sequence[torch.Tensor], keep: bool):
    """``J v`` for ``V[i]`` of shape ``(k, *param_i.shape)``; with ``keep`` also the
    tangent at every layer's input (None where it is zero)."""
    t, inputs = None, []
    for layer in lin.layers:
        if keep:
            inputs.append(t)
        if isinstance(layer, _LinearState):
            new = None
            if t is not None:  # da W_lᵀ: one GEMM over k·N rows
                new = torch.matmul(t, layer.W.mT)
            if layer.wi is not None:  # a_l dW_lᵀ: a batched GEMM
                term = torch.matmul(layer.a, V[layer.wi].mT)
                new = term if new is None else new.add_(term)
            if layer.bi is not None:
                db = V[layer.bi].unsqueeze(1)
                new = db.expand(-1, layer.a.shape[0], -1).clone() if new is None else new.add_(db)
            t = new
        elif t is not None:
            t = t * layer.d1
    return t, inputs


def mlp_jvp(lin: MLPLinearization, V: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``J v`` for k tangents: ``V[i]`` of shape ``(k, *param_i.shape)`` in the
    differentiated parameters' order; returns ``(k, N, C)``."""
    if k == 0:
        return lin.out.new_zeros((0, *lin.out.shape))
    parts = [_tangent_forward(lin, [v[i:j] for v in V], False)[0] for i, j in _chunks(lin, k)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _weight_product(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``gᵀ a`` over the sample dimension (the one before last): ``g`` ``(..., N, d_out)``,
    ``a`` ``(..., N, d_in)``, broadcast; ``(..., d_out, d_in)``. Computed as ``(aᵀ g)ᵀ``
    when ``d_in < d_out``: a GEMM whose output has few columns runs several times slower
    (measured with MKL on 2 cores: 72 µs against 19 µs for 200×500 by 500×2)."""
    if a.shape[-1] < g.shape[-1]:
        return torch.matmul(a.mT, g).mT
    return torch.matmul(g.mT, a)


def _backward(lin: MLPLinearization, U: torch.Tensor, k: int) -> list:
    grads = [None] * lin.n_params
    g = U
    for layer in reversed(lin.layers):
        if isinstance(layer, _ActState):
            g = g * layer.d1
            continue
        if layer.wi is not None:
            grads[layer.wi] = _weight_product(g, layer.a)
        if layer.bi is not None:
            grads[layer.bi] = g.sum(1)
        if not layer.first:
            g = torch.matmul(g, layer.W)
    return grads


def mlp_layer_cotangents(lin: MLPLinearization, U: torch.Tensor) -> list:
    """Cotangents ``U`` ``(M, N, C)`` at the output back-propagated to every Linear layer's
    output: a list aligned with ``lin.layers``, ``(M, N, d_out)`` at each Linear state and
    None at each activation (the layer-wise engine's back-propagation, without autograd)."""
    res = [None] * len(lin.layers)
    g = U
    with torch.no_grad():
        for i in range(len(lin.layers) - 1, -1, -1):
            layer = lin.layers[i]
            if isinstance(layer, _ActState):
                g = g * layer.d1
                continue
            res[i] = g
            if not layer.first:
                g = torch.matmul(g, layer.W)
    return res


def mlp_vjp(lin: MLPLinearization, U: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``Jᵀ u`` for k cotangents ``U`` of shape ``(k, N, C)``; returns for each
    differentiated parameter a tensor ``(k, *shape)``."""
    chunks = _chunks(lin, k)
    if len(chunks) == 1:
        return _backward(lin, U, k)
    parts = [_backward(lin, U[i:j], j - i) for i, j in chunks]
    return [torch.cat(p) for p in zip(*parts)]


def mlp_gradient(lin: MLPLinearization, r: torch.Tensor) -> list[torch.Tensor]:
    """The gradient ``Jᵀ r`` for one output gradient ``r = ∇_o ℓ`` ``(N, C)``; returns
    one tensor per differentiated parameter (its shape).

    For ``order=2`` linearizations it also caches, in ``lin``, the gradient at every Linear
    layer's output and ``g ⊙ σ''`` at every activation, which ``mlp_hvp`` needs. Cost: one
    backward pass (2 GEMMs per layer, 1 at the first differentiated layer).
    """
    grads = [None] * lin.n_params
    g, keep = r, lin.order > 1
    with torch.no_grad():
        for layer in reversed(lin.layers):
            if isinstance(layer, _ActState):
                if keep and layer.d2 is not None:
                    layer.c = g * layer.d2
                g = g * layer.d1
                continue
            if keep:
                layer.g = g
            if layer.wi is not None:
                grads[layer.wi] = _weight_product(g, layer.a)
            if layer.bi is not None:
                grads[layer.bi] = g.sum(0)
            if not layer.first:
                g = g @ layer.W
    return grads


def mlp_hvp(lin: MLPLinearization, V: Sequence[torch.Tensor], k: int,
            output_hessian_product) -> list[torch.Tensor]:
    """``H v``, the Hessian of the loss in the parameters, by the R-operator.

    Args:
        lin: an ``order=2`` linearization on which ``mlp_gradient`` has run.
        V: ``V[i]`` of shape ``(k, *param_i.shape)``.
        k: the number of columns.
        output_hessian_product: ``T ↦ ∇²_o ℓ · T`` for ``T`` of shape ``(k, N, C)``.

    Returns:
        For each differentiated parameter a tensor ``(k, *shape)``.

    Cost: a tangent forward (2 GEMMs per layer) and a backward of 4 GEMMs per layer
    (``ρᵀ a``, ``gᵀ da``, ``ρ W``, ``g dW``), fewer at the first differentiated layer.
    """
    chunks = _chunks(lin, k)
    if len(chunks) > 1:
        parts = [mlp_hvp(lin, [v[i:j] for v in V], j - i, output_hessian_product)
                 for i, j in chunks]
        return [torch.cat(p) for p in zip(*parts)]
    t, inputs = _tangent_forward(lin, V, True)
    rho = output_hessian_product(t)
    grads = [None] * lin.n_params
    for layer, da in zip(reversed(lin.layers), reversed(inputs)):
        if isinstance(layer, _ActState):
            new = rho * layer.d1
            if layer.c is not None and da is not None:
                new.addcmul_(layer.c, da)
            rho = new
            continue
        if layer.wi is not None:
            gw = _weight_product(rho, layer.a)
            if da is not None:
                gw = gw + _weight_product(layer.g, da)
            grads[layer.wi] = gw
        if layer.bi is not None:
            grads[layer.bi] = rho.sum(1)
        if not layer.first:
            new = torch.matmul(rho, layer.W)
            if layer.wi is not None:
                new.add_(torch.matmul(layer.g, V[layer.wi]))
            rho = new
    return grads
