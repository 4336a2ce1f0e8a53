"""The layer-wise engine's first half: forward records and batched back-propagation.

One forward pass of the model (``torch.func.functional_call`` at the differentiated
parameters) records, for every call of a module that owns a differentiated parameter, the
module's inputs and its output (a tensor of the graph), and, on request, the input and
output of every elementwise activation module. Cotangents injected at the model output
(or at an activation's input) are then back-propagated by autograd to all recorded
outputs at once, as one batch of ``M`` cotangent columns: whatever lies between the
recorded layers (activations, pooling, reshapes, residual additions, attention) is
autograd's job, never ours.

A module called twice (weight tying, a shared block) leaves two records; a parameter
owned by two modules (``head.weight = embedding.weight``) is recorded under both. Layers
whose output (or input) is later modified in place (``nn.ReLU(inplace=True)``) are
recorded again on a second forward pass that clones their outputs, so the records always
hold the tensors the layers saw and produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..autodiff._linearization import batched_grad
from ._mlp import (
    _AUTOGRAD_ELEMENTWISE,
    _CLOSED_FORMS,
    MLPSpec,
    _LinearState,
    mlp_input_problem,
    mlp_linearize,
)

__all__ = ["Record", "Recording", "param_owners", "record_forward", "record_chain",
           "backprop", "ELEMENTWISE_ACTIVATIONS"]

#: module types treated as elementwise activations (their second derivative is
#: back-propagated for the exact Hessian diagonal)
ELEMENTWISE_ACTIVATIONS = tuple(_CLOSED_FORMS) + tuple(_AUTOGRAD_ELEMENTWISE)


@dataclass(eq=False)
class Record:
    """One call of a module during the recorded forward pass.

    Attributes:
        module: the module.
        name: its path in the model (``""`` for the model itself).
        args: the positional inputs of the call (tensors of the graph, or other values).
        kwargs: the keyword inputs of the call.
        output: the output tensor of the call (in the graph).
        params: local parameter name → differentiated parameter name (empty for an
            activation record).
    """

    module: nn.Module
    name: str
    args: tuple
    kwargs: dict
    output: torch.Tensor
    params: dict = field(default_factory=dict)
    #: what a layer rule derives from the input once per call (e.g. the unfolded input)
    cache: dict = field(default_factory=dict)

    @property
    def input(self) -> torch.Tensor:
        """The first positional input, detached (what the per-layer formulas use)."""
        return self.args[0].detach()


@dataclass
class Recording:
    """The result of ``record_forward``: the model output and the records."""

    output: torch.Tensor
    layers: list  # Records of modules owning differentiated parameters, in call order
    activations: list  # Records of elementwise activation modules (when requested)
    leaves: dict  # differentiated parameter name -> the graph leaf used in the pass
    #: a multilayer perceptron's forward pass without autograd (``record_chain``): its
    #: ``_mlp.MLPLinearization`` and, per layer record, the index of its state in it
    chain: object = None
    chain_index: tuple = ()


def param_owners(model: nn.Module, names: Sequence[str]) -> dict:
    """``{module: (module path, {local name: parameter name})}`` for every module that
    directly owns one of the differentiated parameters ``names`` (a tied parameter has
    several owners)."""
    by_id = {}
    named = dict(model.named_parameters())
    for n in names:
        by_id[id(named[n])] = n
    owners = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for local, p in m._parameters.items():
            if p is not None and id(p) in by_id:
                entry = owners.setdefault(m, (path, {}))
                entry[1][local] = by_id[id(p)]
    return owners


def record_forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], names: Sequence[str],
                   X, owners: dict, activations: bool = False) -> Recording:
    """Run ``model(X)`` at ``tensors`` with fresh leaves for ``names``, recording layers.

    Args:
        model: the model.
        tensors: every parameter (and any buffer to override) by name.
        names: the differentiated parameters (fresh leaves requiring grad).
        X: the batch input.
        owners: from ``param_owners``.
        activations: also record elementwise activation modules.
    """
    rec = _record(model, tensors, names, X, owners, activations, clone=False)
    if _modified_in_place(rec):
        rec = _record(model, tensors, names, X, owners, activations, clone=True)
        if _modified_in_place(rec):  # pragma: no cover - a model writing into its own inputs
            raise ValueError(
                "A layer's input or output is modified in place after the layer ran, even "
                "with cloned outputs; the recorded tensors would be wrong. Make the "
                "in-place operation out of place."
            )
    return rec


def record_chain(model: nn.Module, spec: MLPSpec, tensors: Mapping[str, torch.Tensor], X,
                 dtype: torch.dtype) -> Recording | None:
    """The records of a multilayer perceptron (``_mlp.mlp_spec``) from one forward pass of
    raw tensor operations (``_mlp.mlp_linearize``): no autograd graph, no hooks. Each
    Linear layer holding a differentiated parameter gets a record of its input (its
    ``output`` is None: the cotangents come from ``_mlp.mlp_layer_cotangents``); the
    caller checks the output for NaN (``check_output``). None when
    the input does not fit the chain (``record_forward`` then takes it). The fixed cost of
    hooks, ``functional_call`` and autograd is most of a small model's time."""
    if mlp_input_problem(spec, X, dtype) is not None:
        return None
    lin = mlp_linearize(spec, tensors, X)  # (its output's NaN check: by the caller, on the
    # loss gradient, which holds every NaN of the output: one reduction instead of two)
    layers, index = [], []
    for i, (layer, state) in enumerate(zip(spec.layers[spec.start:], lin.layers)):
        if not isinstance(state, _LinearState) or (state.wi is None and state.bi is None):
            continue
        params = {}
        if state.wi is not None:
            params["weight"] = layer.weight
        if state.bi is not None:
            params["bias"] = layer.bias
        path = layer.weight.rpartition(".")[0]
        layers.append(Record(model.get_submodule(path), path, (state.a,), {}, None, params))
        index.append(i)
    return Recording(lin.out, layers, [], {}, lin, tuple(index))


def check_output(out):
    if bool(torch.isnan(out.detach()).any()):
        raise FloatingPointError(
            "The model output holds NaN values, so its curvature is undefined: the "
            "parameters or the inputs are not finite (after an optimizer step, lower lr or "
            "raise damping)."
        )


def _live_parameters(model, tensors, names):
    """The model's own parameters when ``tensors`` are exactly them (the same storage),
    the differentiated ones are exactly those that require grad, and none has a backward
    hook: the forward pass can then run on the model as it is, with its parameters as the
    leaves, instead of through ``functional_call`` (which swaps every parameter in and out:
    most of a small model's overhead). None otherwise."""
    live = dict(model.named_parameters())
    for n, t in tensors.items():
        p = live.get(n)
        if p is None or p.data_ptr() != t.data_ptr() or p.shape != t.shape \
                or p.stride() != t.stride() or p.dtype != t.dtype:
            return None
    if len(live) != len(tensors):
        return None
    # exactly the differentiated parameters require grad (else the others' operations
    # would enter the graph, and the Hessian checks would walk into them), and none
    # carries a hook of the user's (pruning masks, clipping: they would act on our passes)
    if {n for n, p in live.items() if p.requires_grad} != set(names):
        return None
    if any(live[n]._backward_hooks for n in names):
        return None
    return live


def _record(model, tensors, names, X, owners, activations, clone):
    live = _live_parameters(model, tensors, names)
    leaves = ({n: live[n] for n in names} if live is not None
              else {n: tensors[n].detach().requires_grad_(True) for n in names})
    layers, acts, handles, versions = [], [], [], []

    def layer_hook(module, args, kwargs, output):
        path, params = owners[module]
        first = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        r = Record(module, path, args, kwargs, first, dict(params))
        layers.append(r)
        versions.append((r, first._version, _arg_versions(args)))
        if clone and first is output:  # later in-place writes go to the clone
            return output.clone()
        return None

    stash = {}

    def act_pre_hook(module, args):
        # an in-place activation runs on a clone, so the record keeps its true input
        stash[module] = args
        if getattr(module, "inplace", False):
            return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        return None

    def act_hook(module, args, output):
        args = stash.pop(module, args)
        r = Record(module, "", args, {}, output)
        acts.append(r)
        versions.append((r, output._version, _arg_versions(args)))

    try:
        for m in owners:
            handles.append(m.register_forward_hook(layer_hook, with_kwargs=True))
        if activations:
            for m in model.modules():
                if type(m) in ELEMENTWISE_ACTIVATIONS and m not in owners:
                    handles.append(m.register_forward_pre_hook(act_pre_hook))
                    handles.append(m.register_forward_hook(act_hook))
        with torch.enable_grad():
            out = (model(X) if live is not None
                   else torch.func.functional_call(model, {**tensors, **leaves}, (X,)))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"The model returned a {type(out).__name__}; the curvature quantities need one "
            "output tensor (wrap the model so that it returns the logits)."
        )
    check_output(out)
    rec = Recording(out, layers, acts, leaves)
    rec._versions = versions
    return rec


def _first_tensor(output):
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"A layer returned a {type(output).__name__}; the layer-wise engine records layers "
        "that return one tensor."
    )


def _arg_versions(args):
    return [a._version if isinstance(a, torch.Tensor) else None for a in args]


def _modified_in_place(rec: Recording) -> bool:
    for r, v_out, v_args in rec._versions:
        if r.output._version != v_out:
            return True
        for a, v in zip(r.args, v_args):
            if v is not None and a._version != v:
                return True
    return False


def backprop(output: torch.Tensor, targets: Sequence[torch.Tensor], cot: torch.Tensor,
             vectorize: bool, reduce: Sequence | None = None) -> list:
    """``M`` cotangents at ``output`` back-propagated to each of ``targets``.

    Args:
        output: a tensor of the graph (the model output, or an activation's input).
        targets: tensors of the graph (recorded layer outputs).
        cot: ``(M, *output.shape)``.
        vectorize: one vmapped pass (``is_grads_batched``) instead of a loop over columns.
        reduce: None, or per target None or a function applied to each column's cotangent
            (``autodiff._linearization.batched_grad``).

    Returns:
        For each target ``(M, *target.shape)`` (or ``(M, *reduced shape)``), or None where
        it does not reach ``output``.
    """
    M = cot.shape[0]
    reach = _reaching(output, targets)
    idx = [i for i, ok in enumerate(reach) if ok]
    res = [None] * len(targets)
    if not idx or M == 0:
        return res
    got = batched_grad([output], [targets[i] for i in idx], [cot], M, vectorize,
                       None if reduce is None else [reduce[i] for i in idx])
    for i, g in zip(idx, got):
        res[i] = g
    return res


def _reaching(output, targets) -> list[bool]:
    """Whether each target lies in the graph of ``output`` (autograd raises otherwise)."""
    wanted = {}
    for i, t in enumerate(targets):
        if t.grad_fn is not None:
            wanted.setdefault(t.grad_fn, []).append(i)
    found = [False] * len(targets)
    if output.grad_fn is None:
        return found
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for i in wanted.get(node, ()):
            found[i] = True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found
