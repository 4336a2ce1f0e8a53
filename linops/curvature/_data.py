"""Inputs of the network-level operators: data, parameters, the model's mode."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["Batches", "resolve_params", "check_eval_mode", "progress_bar"]


def _is_batch(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)


class Batches:
    """One batch ``(X, y)`` or a re-iterable collection of batches (list, DataLoader).

    Iterating yields ``(X, y)`` moved to ``device``; it raises if there is no batch, if a
    batch is not a pair, or if a batch is empty.
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
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"Batch {i} is a {type(batch).__name__}"
                    f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
                    "; every batch must be a pair (X, y)."
                )
            X, y = batch
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"Batch {i}: the targets y must be a tensor, got "
                                f"{type(y).__name__}.")
            if y.ndim > 0 and y.shape[0] == 0:
                raise ValueError(f"Batch {i} is empty (its targets have shape "
                                 f"{tuple(y.shape)}).")
            yield _to_device(X, self.device), y.to(self.device)
        if empty:
            raise ValueError("data is empty: iterating it gave no batch (X, y).")


def _to_device(X, device):
    if isinstance(X, torch.Tensor):
        return X.to(device)
    return X


def resolve_params(model: nn.Module, params) -> dict[str, torch.Tensor]:
    """The parameters to differentiate: all trainable ones by default, or a named subset."""
    named = dict(model.named_parameters())
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
