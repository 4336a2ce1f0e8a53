"""Float64 ground truth for the layer-wise quantities, straight from torch.func."""

from __future__ import annotations

import copy

import torch

from linops import ParamSpace


def sum_loss_of(loss_fn):
    s = copy.deepcopy(loss_fn)
    s.reduction = "sum"
    return s


def scale_of(loss_fn, out, y):
    """c: what the mean reduction divides by (1 for sum), read off the loss itself."""
    if loss_fn.reduction == "sum":
        return 1.0
    return float(sum_loss_of(loss_fn)(out, y) / loss_fn(out, y))


def reference(model, loss_fn, X, y, names):
    """Per-sample gradients, GGNs and Hessians of ℓₙ / c (dense, flat in ``names``)."""
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    space = ParamSpace(params)
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    flat0 = space.flatten(params)
    with torch.no_grad():
        out_all = model(X)
    c = scale_of(loss_fn, out_all, y)
    sl = sum_loss_of(loss_fn)
    grads, ggns, hessians = [], [], []
    for n in range(X.shape[0]):
        xn, yn = X[n:n + 1], y[n:n + 1]

        def f(flat, xn=xn):
            return torch.func.functional_call(model, {**frozen, **space.unflatten(flat)},
                                              (xn,))

        def ell(flat, xn=xn, yn=yn):
            return sl(f(flat), yn) / c

        grads.append(torch.func.grad(ell)(flat0))
        out_n = f(flat0)
        J = torch.func.jacrev(f)(flat0).reshape(out_n.numel(), -1)
        Ho = torch.func.hessian(lambda o, yn=yn, s=out_n.shape: sl(o.reshape(s), yn))(
            out_n.detach().flatten()) / c
        ggns.append(J.T @ Ho @ J)
        hessians.append(torch.autograd.functional.hessian(ell, flat0))
    return space, torch.stack(grads), torch.stack(ggns), torch.stack(hessians)
