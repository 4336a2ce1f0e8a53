"""Jacobian products of a convolutional chain with raw tensor operations (no autograd).

The MLP fast path (``_mlp.py``) for chains that also hold convolutions and max pooling:
an ``nn.Sequential`` (nested ones flattened) of ``nn.Conv1d/2d/3d`` (``groups=1``, zero
padding given as numbers), ``nn.Linear`` (on ``(N, d)`` inputs), ``nn.MaxPool1d/2d/3d``,
``nn.Flatten()``, ``nn.BatchNorm1d/2d/3d`` in eval mode (running statistics: a
per-channel affine map), elementwise activations, ``nn.Identity`` and inactive dropout —
the reference CNN of BackPACK's diagonal-GGN example is one. One forward pass of raw
operations (``chain_linearize``) keeps each layer's input, each activation's ``σ'`` and
each pooling's argmax indices; then, for k columns at once:

- ``J v`` (``chain_jvp``): at a convolution ``dh = conv(da, W) + conv(a, dW) + db``, the
  ``k`` weight tangents as one convolution with ``k·C_out`` output channels (the input
  ``a`` is unfolded once, not ``k`` times) and the ``k`` input tangents as one
  convolution over ``k·N`` samples; through max pooling a gather at the kept indices;
- ``Jᵀ u`` (``chain_vjp``): at a convolution the ``k`` weight gradients as one weight
  gradient of ``k·C_out`` output channels and the input cotangents as one transposed
  convolution over ``k·N`` samples (``torch.nn.grad``); through max pooling a scatter-add.

Compared with autograd this saves forward mode's second primal pass (``J v`` starts from
the kept inputs) and turns the per-column passes of a product with k columns into
batched kernels. Only Jacobian products (the GGN family): the Hessian needs second
derivatives of the chain and takes autograd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._mlp import (
    _AUTOGRAD_ELEMENTWISE,
    _CLOSED_FORMS,
    COLUMN_BUDGET,
    _activation,
    _chain_modules,
    _own_params,
    _weight_product,
)
from .layers.conv import _unfold

__all__ = ["ChainSpec", "chain_spec", "chain_linearize", "chain_jvp", "chain_vjp",
           "chain_gradient"]

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_GRAD_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
_GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


@dataclass(frozen=True)
class _Param:  # a Conv or Linear layer, by parameter name
    module: nn.Module
    weight: str
    bias: str | None
    dim: int  # 0 for Linear, else the convolution's spatial dimensions


@dataclass(frozen=True)
class _Norm:  # batch norm in eval mode: a per-channel affine map
    module: nn.Module
    weight: str | None
    bias: str | None
    dim: int  # 1 (BatchNorm1d: (N, C) or (N, C, L)), 2 or 3


@dataclass(frozen=True)
class _Layer:  # a parameter-free layer
    module: nn.Module
    kind: str  # "act", "pool", "flatten"
    dim: int = 0


@dataclass(frozen=True)
class ChainSpec:
    """A model recognized as a convolutional chain (``chain_spec``).

    Attributes:
        layers: the chain in order (identities and inactive dropout removed).
        start: the index in ``layers`` of the first layer holding a differentiated
            parameter.
        param_names: the differentiated parameters, in the operator's order.
    """

    layers: tuple
    start: int
    param_names: tuple


def chain_spec(model: nn.Module, param_names: Sequence[str], dtype: torch.dtype,
               named=None) -> ChainSpec | str:
    """Recognize a convolutional chain, or say why ``model`` is not one (see the module
    docstring for what is accepted; exact types only, no hooks, at least one
    convolution, every parameter among ``param_names`` a Conv, Linear or batch norm
    layer's)."""
    chain = _chain_modules(model)
    if isinstance(chain, str):
        return chain
    params = dict(model.named_parameters()) if named is None else named
    layers, n_conv = [], 0
    for name, m, label in chain:
        t = type(m)
        if t in _CONVS or t is nn.Linear:
            if t in _CONVS:
                if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                    return f"{label} has groups, a padding mode or a padding string"
                n_conv += 1
            owned = _own_params(name, m, params, label, dtype)
            if isinstance(owned, str):
                return owned
            layers.append(_Param(m, *owned, _CONVS.get(t, 0)))
        elif t in _NORMS:
            if m.training or m.running_mean is None:
                return f"{label} normalizes with batch statistics (training mode)"
            wname = bname = None
            if m.affine:
                owned = _own_params(name, m, params, label)
                if isinstance(owned, str):
                    return owned
                wname, bname = owned
            layers.append(_Norm(m, wname, bname, _NORMS[t]))
        elif t in _POOLS:
            if m.return_indices:
                return f"{label} returns its indices"
            layers.append(_Layer(m, "pool", _POOLS[t]))
        elif t is nn.Flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                return f"{label} is not nn.Flatten(start_dim=1, end_dim=-1)"
            layers.append(_Layer(m, "flatten"))
        elif t is nn.Identity:
            continue
        elif t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
            if m.training and m.p > 0:
                return f"{label} is active (training mode)"
        elif t in _CLOSED_FORMS or t in _AUTOGRAD_ELEMENTWISE:
            if any(True for _ in m.parameters()):
                return f"{label} has parameters"
            layers.append(_Layer(m, "act"))
        else:
            return (f"{label} is not a convolution, nn.Linear, max pooling, batch norm, an "
                    "elementwise activation, nn.Flatten, nn.Identity or inactive dropout")
    if not n_conv:
        return "the model has no convolution"
    owned = {n for layer in layers if isinstance(layer, (_Param, _Norm))
             for n in (layer.weight, layer.bias) if n is not None}
    other = [n for n in param_names if n not in owned]
    if other:
        return (f"the parameter(s) {other[:4]} do not belong to a Conv, Linear or batch "
                "norm layer")
    start = next(i for i, layer in enumerate(layers) if isinstance(layer, (_Param, _Norm))
                 and (layer.weight in param_names or layer.bias in param_names))
    return ChainSpec(tuple(layers), start, tuple(param_names))


# -------------------------------------------------------------------------- linearization
@dataclass
class _ParamState:
    module: nn.Module
    dim: int
    W: torch.Tensor
    b: torch.Tensor | None
    a: torch.Tensor  # the layer's input
    wi: int | None
    bi: int | None
    first: bool  # no input tangent, no input cotangent
    unfolded: torch.Tensor | None = None  # the first convolution's patches (C·K, N·L)
    unfold_tried: bool = False


@dataclass
class _NormState:
    xhat: torch.Tensor  # the normalized input (a − mean) / √(var + eps)
    scale: torch.Tensor  # γ / √(var + eps), shaped to broadcast over (N, C, ...)
    wi: int | None
    bi: int | None
    first: bool


@dataclass
class _State:
    kind: str  # "act", "pool", "flatten"
    d1: torch.Tensor | None = None  # activation: σ'
    idx: torch.Tensor | None = None  # pooling: argmax of each window, flattened positions
    in_shape: tuple = ()  # pooling, flatten: the input's shape (N, ...)


@dataclass
class ChainLinearization:
    """One batch's forward pass, kept: per layer from the first differentiated one on,
    its input (Conv, Linear), ``σ'`` (activations), argmax indices (pooling) or input
    shape (flatten); the output; the widest activation (the column chunking's unit)."""

    layers: list
    out: torch.Tensor
    n_params: int
    width: int


def _conv_args(m):
    return m.stride, m.padding, m.dilation


def chain_linearize(spec: ChainSpec, tensors: Mapping[str, torch.Tensor],
                    X: torch.Tensor) -> ChainLinearization | None:
    """One forward pass with raw operations; None where the batch does not fit (``X`` is
    not a tensor, or a layer meets an input of another rank than ``(N, d)`` for Linear,
    ``(N, C, *spatial)`` with 1, 2 or 3 spatial dimensions for convolution and pooling:
    PyTorch would take some of those as one unbatched sample)."""
    if not isinstance(X, torch.Tensor) or X.ndim < 2:
        return None
    index = {n: i for i, n in enumerate(spec.param_names)}
    a, layers, width = X.detach(), [], 0
    with torch.no_grad():
        for i, layer in enumerate(spec.layers):
            active = i >= spec.start
            m = layer.module
            if isinstance(layer, _Param):
                W = tensors[layer.weight].detach()
                b = None if layer.bias is None else tensors[layer.bias].detach()
                if a.ndim != layer.dim + 2:  # (N, d) for Linear, (N, C, *spatial) else
                    return None
                if active:
                    layers.append(_ParamState(m, layer.dim, W, b, a, index.get(layer.weight),
                                              index.get(layer.bias), i == spec.start))
                a = (F.linear(a, W, b) if layer.dim == 0
                     else _CONV_FN[layer.dim](a, W, b, *_conv_args(m)))
            elif isinstance(layer, _Norm):
                if a.ndim not in ((2, 3) if layer.dim == 1 else (layer.dim + 2,)):
                    return None
                shape = (1, -1, *([1] * (a.ndim - 2)))
                inv = torch.rsqrt(m.running_var.to(a.dtype) + m.eps)
                xhat = (a - m.running_mean.to(a.dtype).reshape(shape)) * inv.reshape(shape)
                gamma = tensors[layer.weight].detach() if layer.weight else None
                beta = tensors[layer.bias].detach() if layer.bias else None
                scale = inv if gamma is None else inv * gamma
                a = xhat if gamma is None else xhat * gamma.reshape(shape)
                if beta is not None:
                    a = a + beta.reshape(shape)
                if active:
                    layers.append(_NormState(xhat, scale.reshape(shape),
                                             index.get(layer.weight), index.get(layer.bias),
                                             i == spec.start))
            elif not active:
                a = m(a.clone() if getattr(m, "inplace", False) else a)
                continue
            elif layer.kind == "act":
                a, d1, _ = _activation(m, a, 1)
                layers.append(_State("act", d1=d1))
            elif layer.kind == "pool":
                if a.ndim != layer.dim + 2:  # an unbatched input to PyTorch's pooling
                    return None
                shape = tuple(a.shape)
                a, idx = _POOL_FN[layer.dim](a, m.kernel_size, m.stride, m.padding,
                                             m.dilation, m.ceil_mode, return_indices=True)
                layers.append(_State("pool", idx=idx, in_shape=shape))
            else:
                layers.append(_State("flatten", in_shape=tuple(a.shape)))
                a = a.flatten(1)
            width = max(width, a[0].numel())
    return ChainLinearization(layers, a, len(spec.param_names), max(width, 1))


def _chunks(lin: ChainLinearization, k: int):
    step = max(1, COLUMN_BUDGET // max(1, lin.out.shape[0] * lin.width))
    return [(i, min(k, i + step)) for i in range(0, k, step)]


# -------------------------------------------------------------------------- products
def _gather_pool(t: torch.Tensor, st: _State) -> torch.Tensor:
    """Max pooling's tangent: the entries of ``t`` ``(k, N, C, *spatial)`` at the argmax."""
    k = t.shape[0]
    idx = st.idx.flatten(2).unsqueeze(0).expand(k, -1, -1, -1)
    return t.flatten(3).gather(3, idx).reshape(k, *st.idx.shape)


def _scatter_pool(g: torch.Tensor, st: _State) -> torch.Tensor:
    k = g.shape[0]
    N, C = st.in_shape[:2]
    idx = st.idx.flatten(2).unsqueeze(0).expand(k, -1, -1, -1)
    out = g.new_zeros((k, N, C, math.prod(st.in_shape[2:])))
    out.scatter_add_(3, idx, g.flatten(3))
    return out.reshape(k, *st.in_shape)


#: the most entries the kept patches of a first convolution may have (64 MiB in float32);
#: a larger input takes oneDNN's weight gradient
UNFOLD_BUDGET = 2**24


def _first_unfold(st: _ParamState):
    """The first convolution's input patches ``(C_in · kernel, N · L)``, unfolded at the
    first product and kept (None where they would exceed ``UNFOLD_BUDGET``)."""
    if not st.unfold_tried:
        st.unfold_tried = True
        m, a = st.module, st.a
        L = math.prod(_out_spatial(m, a))
        if st.W[0].numel() * a.shape[0] * L <= UNFOLD_BUDGET:
            st.unfolded = _unfold(m, a, 1, feature_major=True).reshape(st.W[0].numel(), -1)
    return st.unfolded


def _out_spatial(m, a) -> list:
    return [(a.shape[2 + i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1)
            // m.stride[i] + 1 for i in range(len(m.kernel_size))]


def _jvp(lin: ChainLinearization, V: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    t = None
    for st in lin.layers:
        if isinstance(st, _ParamState):
            N = st.a.shape[0]
            new = None
            if st.dim == 0:
                if t is not None:
                    new = torch.matmul(t, st.W.mT)
                if st.wi is not None:
                    term = torch.matmul(st.a, V[st.wi].mT)
                    new = term if new is None else new.add_(term)
                if st.bi is not None:
                    db = V[st.bi].unsqueeze(1)
                    new = db.expand(-1, N, -1).clone() if new is None else new.add_(db)
            elif k == 1 and st.wi is not None:
                # conv(da, W) + conv(a, dW) + db as one convolution of twice the input
                # channels: [da, a] with [W, dW] (one unfold, one GEMM)
                dW = V[st.wi][0]
                db = None if st.bi is None else V[st.bi][0]
                x, w = (st.a, dW) if t is None else (torch.cat([t[0], st.a], 1),
                                                     torch.cat([st.W, dW], 1))
                new = _CONV_FN[st.dim](x, w, db, *_conv_args(st.module)).unsqueeze(0)
            else:
                conv, args = _CONV_FN[st.dim], _conv_args(st.module)
                if t is not None:  # the input tangents: one convolution over k·N samples
                    new = conv(t.flatten(0, 1), st.W, None, *args).unflatten(0, (k, N))
                if st.wi is not None:  # the weight tangents: k·C_out output channels
                    dW = V[st.wi]
                    y = conv(st.a, dW.flatten(0, 1), None, *args)
                    y = y.unflatten(1, (k, dW.shape[1])).movedim(1, 0)
                    new = y.contiguous() if new is None else new.add_(y)
                if st.bi is not None:
                    db = V[st.bi].reshape(k, 1, -1, *([1] * st.dim))
                    if new is None:
                        shape = conv(st.a[:1], st.W, None, *args).shape[1:]
                        new = db.expand(k, N, *shape).clone()
                    else:
                        new = new.add_(db)
            t = new
        elif isinstance(st, _NormState):  # t·γ/σ + x̂·dγ + dβ, per channel
            view = (k, 1, -1, *([1] * (st.xhat.ndim - 2)))
            new = None if t is None else t * st.scale
            if st.wi is not None:
                term = st.xhat * V[st.wi].reshape(view)
                new = term if new is None else new.add_(term)
            if st.bi is not None:
                db = V[st.bi].reshape(view)
                new = db.expand(k, *st.xhat.shape).clone() if new is None else new.add_(db)
            t = new
        elif t is None:
            continue
        elif st.kind == "act":
            t = t * st.d1
        elif st.kind == "pool":
            t = _gather_pool(t, st)
        else:
            t = t.flatten(2)
    return t


def _column_ranges(lin: ChainLinearization, k: int, batched: bool):
    return _chunks(lin, k) if batched else [(i, i + 1) for i in range(k)]


def chain_jvp(lin: ChainLinearization, V: Sequence[torch.Tensor], k: int,
              batched: bool = True) -> torch.Tensor:
    """``J v`` for k tangents ``V[i]`` ``(k, *param_i.shape)``; returns ``(k, *out.shape)``.
    ``batched``: the k columns through each layer at once (chunked to bound memory), else
    one column at a time. On 2 CPU cores the loop measured faster on the reference CNN
    (a column's convolutions fuse its weight and input tangents into one call, and
    PyTorch's own convolution backward gives all of a layer's gradients in one), so the
    operators batch on accelerators only (their ``vectorize``)."""
    if k == 0:
        return lin.out.new_zeros((0, *lin.out.shape))
    with torch.no_grad():
        parts = [_jvp(lin, [v[i:j] for v in V], j - i)
                 for i, j in _column_ranges(lin, k, batched)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _vjp(lin: ChainLinearization, U: torch.Tensor, k: int) -> list:
    grads = [None] * lin.n_params
    g = U
    for st in reversed(lin.layers):
        if isinstance(st, _NormState):
            dims = (1, *range(3, g.ndim))
            if st.wi is not None:
                grads[st.wi] = (g * st.xhat).sum(dim=dims)
            if st.bi is not None:
                grads[st.bi] = g.sum(dim=dims)
            if not st.first:
                g = g * st.scale
            continue
        if isinstance(st, _State):
            if st.kind == "act":
                g = g * st.d1
            elif st.kind == "pool":
                g = _scatter_pool(g, st)
            else:
                g = g.reshape(k, *st.in_shape)
            continue
        N = st.a.shape[0]
        if st.dim == 0:
            if st.wi is not None:
                grads[st.wi] = (_weight_product(g[0], st.a).unsqueeze(0) if k == 1
                                else _weight_product(g, st.a))
            if st.bi is not None:
                grads[st.bi] = g.sum(1)
            if not st.first:
                g = torch.matmul(g, st.W)
            continue
        args = _conv_args(st.module)
        C_out = st.W.shape[0]
        if k == 1 and st.first and st.wi is not None and _first_unfold(st) is not None:
            # the first layer's weight gradient as one GEMM with its input's patches,
            # unfolded once and kept: 2.3× faster than oneDNN's weight gradient on the
            # reference CNN's first convolution (one input channel, 5 × 5 kernel)
            Gf = g[0].movedim(1, 0).reshape(C_out, -1)
            grads[st.wi] = (Gf @ st.unfolded.mT).reshape(1, *st.W.shape)
            if st.bi is not None:
                grads[st.bi] = g.sum(dim=(1, *range(3, g.ndim)))
            continue
        if k == 1:  # PyTorch's own convolution backward: every gradient from one call
            gi, gw, gb = torch.ops.aten.convolution_backward(
                g[0], st.a, st.W, None if st.bi is None else [C_out], *args, False,
                [0] * st.dim, 1, (not st.first, st.wi is not None, st.bi is not None))
            if st.wi is not None:
                grads[st.wi] = gw.unsqueeze(0)
            if st.bi is not None:
                grads[st.bi] = gb.unsqueeze(0)
            if not st.first:
                g = gi.unsqueeze(0)
            continue
        if st.wi is not None:  # k weight gradients as one of k·C_out output channels
            gN = g.movedim(0, 1).reshape(N, k * C_out, *g.shape[3:])
            dW = _GRAD_WEIGHT[st.dim](st.a, (k * C_out, *st.W.shape[1:]), gN, *args)
            grads[st.wi] = dW.reshape(k, *st.W.shape)
        if st.bi is not None:
            grads[st.bi] = g.sum(dim=(1, *range(3, g.ndim)))
        if not st.first:
            g = _GRAD_INPUT[st.dim]((k * N, *st.a.shape[1:]), st.W, g.flatten(0, 1),
                                    *args).unflatten(0, (k, N))
    return grads


def chain_vjp(lin: ChainLinearization, U: torch.Tensor, k: int,
              batched: bool = True) -> list:
    """``Jᵀ u`` for k cotangents ``U`` ``(k, *out.shape)``; for each differentiated
    parameter ``(k, *param.shape)``. ``batched`` as in ``chain_jvp``."""
    if k == 0:
        return [None] * lin.n_params
    with torch.no_grad():
        parts = [_vjp(lin, U[i:j], j - i) for i, j in _column_ranges(lin, k, batched)]
    if len(parts) == 1:
        return parts[0]
    return [torch.cat(p) for p in zip(*parts)]


def chain_gradient(lin: ChainLinearization, r: torch.Tensor) -> list:
    """``Jᵀ r`` for one cotangent ``r`` of the output's shape: per parameter its shape."""
    return [g[0] for g in chain_vjp(lin, r.unsqueeze(0), 1)]
