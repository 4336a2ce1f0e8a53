"""Inputs of the network-level operators: data, parameters, the model's mode."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "Batches",
    "resolve_params",
    "check_eval_mode",
    "progress_bar",
    "explain_forward_error",
    "require_terms",
]


def _is_batch(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)


class Batches:
    """One batch ``(X, y)`` or a re-iterable collection of batches (list, DataLoader).

    Iterating yields ``(X, y)`` moved to ``device``; it raises if there is no batch, if a
    batch is not a pair, or if a batch is empty. A collection of batches has its first
    batch checked when built (a DataLoader loads one batch for it), so a malformed loader
    fails at once rather than at the first product.
    """

    def __init__(self, data, device: torch.device):
        self.device = device
        if _is_batch(data):
            self.single = True
            self._data = [tuple(data)]
            return
        if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(
            data, Iterable
        ):
            raise TypeError(
                "data must be one batch (X, y) or an iterable of batches such as a list of "
                f"(X, y) pairs or a torch DataLoader; got {type(data).__name__}."
            )
        if iter(data) is data:
            raise TypeError(
                "data is a one-shot iterator (a generator?): every product passes over the "
                "data again, so pass a re-iterable collection such as a list of batches or "
                "a DataLoader (list(data) makes one)."
            )
        try:
            n = len(data)
        except TypeError:
            n = None
        if n == 0:
            raise ValueError("data is empty: it holds no batch (X, y).")
        self.single = False
        self._data = data
        for i, batch in enumerate(data):  # the first batch only: fail at build, not later
            _check_batch(i, batch)
            break

    def __len__(self) -> int:
        return len(self._data)

    def has_len(self) -> bool:
        try:
            len(self._data)
        except TypeError:
            return False
        return True

    def __iter__(self):
        empty = True
        for i, batch in enumerate(self._data):
            empty = False
            X, y = _check_batch(i, batch)
            yield _to_device(X, self.device), y.to(self.device)
        if empty:
            raise ValueError("data is empty: iterating it gave no batch (X, y).")


def _check_batch(i: int, batch):
    """``(X, y)`` of batch number ``i``, or a ``TypeError``/``ValueError`` naming the fix."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"Batch {i} is a {type(batch).__name__}{length}; every batch must be a pair "
            "(X, y). A DataLoader over TensorDataset(X, y) gives such pairs; one over a "
            "dataset of inputs only does not."
        )
    X, y = batch
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"Batch {i}: the targets y must be a tensor, got "
                        f"{type(y).__name__}.")
    if y.ndim > 0 and y.shape[0] == 0:
        raise ValueError(f"Batch {i} is empty (its targets have shape "
                         f"{tuple(y.shape)}).")
    for name, t in (("X", X), ("y", y)):
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"Batch {i}: {name} is on the 'meta' device (shapes, no values); "
                             "load the data onto a real device.")
    return X, y


def _to_device(X, device):
    if isinstance(X, torch.Tensor):
        return X.to(device)
    return X


def resolve_params(model: nn.Module, params, named=None) -> dict[str, torch.Tensor]:
    """The parameters to differentiate: all trainable ones by default, or a named subset.
    ``named``: ``dict(model.named_parameters())`` where the caller has it."""
    named = dict(model.named_parameters()) if named is None else named
    meta = [n for n, p in named.items() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"The model's parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the "
            "'meta' device: they have shapes but no values, so there is no curvature to "
            "compute. Materialize the model first: model.to_empty(device='cpu'), then load "
            "its weights (model.load_state_dict(...)) or initialize them."
        )
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "The model has no trainable parameters (none requires grad); pass params= "
                "a dict name -> tensor to choose some."
            )
        return chosen
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a dict name -> tensor, for example "
            "{n: p for n, p in model.named_parameters() if n.startswith('0.')}; got "
            f"{type(params).__name__}."
        )
    if not params:
        raise ValueError("params is empty; pass at least one parameter (or None for all).")
    unknown = [n for n in params if n not in named]
    if unknown:
        some = list(named)[:6]
        raise ValueError(
            f"params names {unknown} are not parameters of the model; its parameters are "
            f"named like {some}{' ...' if len(named) > 6 else ''} (see "
            "model.named_parameters())."
        )
    for n, p in params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{n!r}] is a {type(p).__name__}, not a tensor.")
        if p.shape != named[n].shape:
            raise ValueError(
                f"params[{n!r}] has shape {tuple(p.shape)} but the model's parameter has "
                f"shape {tuple(named[n].shape)}."
            )
    return dict(params)


def check_eval_mode(model: nn.Module, allow_train_mode: bool) -> None:
    """Raise if a module in training mode makes the operator ill-defined."""
    if allow_train_mode:
        return
    bad = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            bad.append(f"{name or 'model'} ({type(m).__name__})")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            bad.append(f"{name or 'model'} ({type(m).__name__})")
    if bad:
        raise ValueError(
            f"The model is in training mode with {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}: dropout draws new masks and batch norm uses "
            "batch statistics (and updates its running ones) at every forward pass, so the "
            "curvature is not a fixed matrix. Call model.eval() before building the "
            "operator, or pass allow_train_mode=True if this is really intended."
        )


def progress_bar(iterable, enabled: bool, total: int | None, desc: str):
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (tqdm is optional)."""
    if not enabled:
        return iterable
    tqdm = require_tqdm()
    return tqdm(iterable, total=total, desc=desc, leave=False)


def require_tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "progress=True needs tqdm: pip install tqdm (or pip install linops[progress])."
        ) from err
    return tqdm


def require_terms(op, total) -> None:
    """Raise when a pass over the data found no loss term (every target ``ignore_index``):
    the mean would divide by zero and every product, ``loss`` and ``gradient`` be NaN. The
    count is read on the host once per operator."""
    if getattr(op, "_terms_seen", False):
        return
    if int(total) == 0:
        raise ValueError(
            "Every target in every batch is ignore_index: the loss has no term, so its "
            "value, gradient and curvature are undefined (a mean over zero terms). Drop "
            "those batches from the data, or check how the targets were built."
        )
    op._terms_seen = True


def _first_layer(model: nn.Module):
    """``(name, module)`` of the first module with ``in_features`` or ``in_channels``."""
    for name, m in model.named_modules():
        if hasattr(m, "in_features") or hasattr(m, "in_channels"):
            return name or "model", m
    return None, None


def _what_it_takes(model: nn.Module) -> str:
    name, m = _first_layer(model)
    if m is None:
        return ""
    if hasattr(m, "in_features"):
        return (f" The first layer, {name} ({type(m).__name__}), takes {m.in_features} "
                f"features: X needs shape (N, {m.in_features}).")
    return (f" The first layer, {name} ({type(m).__name__}), takes {m.in_channels} input "
            f"channels: X needs shape (N, {m.in_channels}, ...).")


def explain_forward_error(model: nn.Module, X, dtype: torch.dtype, err: Exception):
    """The exception to raise for ``err``, raised by ``model(X)`` with parameters of
    ``dtype``: a ``TypeError``/``ValueError`` that says what in the batch does not fit the
    model (dtype, integer inputs, number of features) and how to fix it, with ``err`` as
    its cause; or ``err`` itself when it is not one of those.

    Use as ``except Exception as err: raise explain_forward_error(model, X, dtype, err)``.
    """
    text = str(err)
    shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
    new = None
    dtype_error = "dtype" in text or "scalar type" in text
    if isinstance(X, torch.Tensor) and dtype_error and X.dtype != dtype:
        if not (X.dtype.is_floating_point or X.dtype.is_complex):
            new = TypeError(
                f"The model failed on an input X of dtype {X.dtype} (shape {shape}): its "
                f"parameters are {dtype}, and integer inputs only suit layers such as "
                f"nn.Embedding. Convert the inputs, X.to({dtype}) (or in the Dataset), before "
                f"building the operator. PyTorch said: {text}"
            )
        else:
            new = TypeError(
                f"The model failed on an input X of dtype {X.dtype}: its parameters are "
                f"{dtype}. Make them agree: X.to({dtype}), or model.to({X.dtype}) before "
                f"building the operator. PyTorch said: {text}"
            )
    elif any(key in text for key in ("shapes cannot be multiplied", "size of tensor",
                                      "channels")) or ("xpected" in text and "input" in text):
        new = ValueError(
            f"The model failed on a batch X of shape {shape}: the inputs do not fit the "
            f"model.{_what_it_takes(model)} Check that the data belongs to this model. "
            f"PyTorch said: {text}"
        )
    if new is None:
        return err
    new.__cause__ = err
    return new
