"""``ParamSpace``: the map between a flat vector and a tensor or a dict of tensors.

Autodiff and curvature operators act on flat vectors of length ``n`` (the number of
parameters). Users hold parameters as a tensor of any shape or as a dict name → tensor
(``dict(model.named_parameters())``). A ``ParamSpace`` remembers the names, shapes, dtype
and device, and converts both ways, so nobody writes ``torch.cat([p.flatten() ...])`` by
hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["ParamSpace"]


class ParamSpace:
    """The layout of a tensor or of a dict of tensors as one flat vector.

    The flat vector concatenates the entries in the dict's order, each flattened in
    row-major order; a tensor ``x`` of any shape is flattened as ``x.reshape(-1)``.

    A batch of ``k`` vectors is a matrix ``(n, k)`` (one vector per column, as the operators
    take them). Its structured form puts ``k`` in front: each entry has shape
    ``(k, *shape)``, which is what ``torch.vmap`` and ``is_grads_batched`` expect.

    Args:
        params: a tensor, or a dict name → tensor with one floating dtype and one device.

    Example:
        >>> import torch
        >>> space = ParamSpace({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
        >>> space.numel
        8
        >>> v = space.flatten({"w": torch.ones(2, 3), "b": torch.full((2,), 2.0)})
        >>> v
        tensor([1., 1., 1., 1., 1., 1., 2., 2.])
        >>> space.unflatten(v)["b"]
        tensor([2., 2.])
        >>> space.unflatten(torch.ones(8, 5))["w"].shape   # k = 5 vectors, k in front
        torch.Size([5, 2, 3])
    """

    def __init__(self, params: torch.Tensor | Mapping[str, torch.Tensor]):
        if isinstance(params, torch.Tensor):
            self.is_dict = False
            items = [("", params)]
        elif isinstance(params, Mapping):
            self.is_dict = True
            items = list(params.items())
            if not items:
                raise ValueError("ParamSpace needs at least one tensor; the dict is empty.")
        else:
            raise TypeError(
                "Parameters must be a tensor or a dict name -> tensor (for example "
                f"dict(model.named_parameters())); got {type(params).__name__}."
            )
        for name, value in items:
            if not isinstance(name, str):
                raise TypeError(f"Parameter names must be strings; got {name!r}.")
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Parameter {name!r} is a {type(value).__name__}, not a torch.Tensor."
                )
        dtypes = {v.dtype for _, v in items}
        if len(dtypes) > 1:
            desc = ", ".join(f"{n}: {v.dtype}" for n, v in items)
            raise ValueError(
                f"All parameters must share one dtype to form one flat vector; got {desc}. "
                "Convert them (model.to(dtype)) or pass a subset with one dtype."
            )
        devices = {(v.device.type, v.device.index) for _, v in items}
        if len(devices) > 1:
            desc = ", ".join(f"{n}: {v.device}" for n, v in items)
            raise ValueError(
                f"All parameters must live on one device; got {desc}. Move them with .to()."
            )
        self.names: tuple[str, ...] = tuple(n for n, _ in items)
        self.shapes: tuple[torch.Size, ...] = tuple(v.shape for _, v in items)
        self.numels: tuple[int, ...] = tuple(math.prod(s) for s in self.shapes)
        self.dtype: torch.dtype = items[0][1].dtype
        self.device: torch.device = items[0][1].device
        #: the total number of entries, the length of a flat vector
        self.numel: int = sum(self.numels)
        if self.numel == 0:
            raise ValueError("The parameters have no entries (every tensor is empty).")

    # ------------------------------------------------------------------ structured ⇄ list
    def to_list(self, params) -> list[torch.Tensor]:
        """The tensors of ``params`` (a tensor or a dict in this space), in flat order."""
        if not self.is_dict:
            if not isinstance(params, torch.Tensor):
                raise TypeError(f"Expected a tensor of shape {tuple(self.shapes[0])}; got "
                                f"{type(params).__name__}.")
            return [params]
        if not isinstance(params, Mapping):
            raise TypeError(
                f"Expected a dict with keys {list(self.names)}; got {type(params).__name__}."
            )
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self.names]
        if missing or extra:
            msg = []
            if missing:
                msg.append(f"missing {missing}")
            if extra:
                msg.append(f"unexpected {extra}")
            raise ValueError(
                f"The dict does not match the parameter space: {' and '.join(msg)}; "
                f"expected exactly the keys {list(self.names)}."
            )
        return [params[n] for n in self.names]

    def from_list(self, tensors):
        """A tensor or a dict (as the space was built from) holding ``tensors`` in order."""
        tensors = list(tensors)
        if not self.is_dict:
            return tensors[0]
        return dict(zip(self.names, tensors))

    # ------------------------------------------------------------------ flat ⇄ list
    def split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat ``(n,)`` vector as the entries' shapes, or of an ``(n, k)``
        matrix as entries of shape ``(k, *shape)`` (copies in that case)."""
        self._check_flat(vec)
        if vec.ndim == 1:
            return [
                p.reshape(s) for p, s in zip(torch.split(vec, self.numels), self.shapes)
            ]
        k = vec.shape[1]
        rows = vec.mT
        return [
            p.reshape(k, *s) for p, s in zip(torch.split(rows, self.numels, dim=1), self.shapes)
        ]

    def join(self, tensors, k: int | None = None) -> torch.Tensor:
        """The inverse of ``split``: tensors of the entries' shapes give ``(n,)``; tensors of
        shape ``(k, *shape)`` (pass ``k``) give ``(n, k)``."""
        tensors = list(tensors)
        if len(tensors) != len(self.shapes):
            raise ValueError(f"Expected {len(self.shapes)} tensors, got {len(tensors)}.")
        if k is None:
            for name, t, s in zip(self.names, tensors, self.shapes):
                if t.shape != s:
                    raise ValueError(
                        f"Parameter {name or 'x'!r} has shape {tuple(t.shape)}; the space "
                        f"expects {tuple(s)}."
                    )
            return torch.cat([t.reshape(-1) for t in tensors])
        for name, t, s in zip(self.names, tensors, self.shapes):
            if t.shape != (k, *s):
                raise ValueError(
                    f"Parameter {name or 'x'!r} has shape {tuple(t.shape)}; a batch of {k} "
                    f"expects {(k, *s)}."
                )
        return torch.cat([t.reshape(k, -1) for t in tensors], dim=1).mT.contiguous()

    # ------------------------------------------------------------------ public API
    def flatten(self, params) -> torch.Tensor:
        """The flat vector ``(n,)`` of a tensor or dict in this space.

        A dict whose entries all carry one extra leading dimension ``k`` (shape
        ``(k, *shape)``) gives the matrix ``(n, k)``.
        """
        tensors = self.to_list(params)
        for name, t in zip(self.names, tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Entry {name!r} is a {type(t).__name__}, not a tensor.")
            if t.dtype != self.dtype:
                raise ValueError(
                    f"Entry {name or 'x'!r} has dtype {t.dtype}; the space has {self.dtype}. "
                    f"Convert with .to({self.dtype})."
                )
        batched = [t.ndim == len(s) + 1 for t, s in zip(tensors, self.shapes)]
        if all(batched) and len({t.shape[0] for t in tensors}) == 1:
            return self.join(tensors, k=tensors[0].shape[0])
        return self.join(tensors)

    def unflatten(self, vec: torch.Tensor):
        """The tensor or dict of a flat vector ``(n,)``; for a matrix ``(n, k)`` every entry
        gets shape ``(k, *shape)`` (``k`` in front)."""
        return self.from_list(self.split(vec))

    def zeros(self, k: int | None = None) -> torch.Tensor:
        """A flat zero vector ``(n,)``, or ``(n, k)``, with the space's dtype and device."""
        shape = (self.numel,) if k is None else (self.numel, k)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _check_flat(self, vec) -> None:
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"Expected a flat tensor of length {self.numel}; got "
                            f"{type(vec).__name__}.")
        if vec.ndim not in (1, 2) or vec.shape[0] != self.numel:
            raise ValueError(
                f"Expected a flat vector ({self.numel},) or a matrix ({self.numel}, k); got "
                f"shape {tuple(vec.shape)}."
            )

    def __len__(self) -> int:
        return self.numel

    def __eq__(self, other) -> bool:
        if not isinstance(other, ParamSpace):
            return NotImplemented
        return (
            self.is_dict == other.is_dict
            and self.names == other.names
            and self.shapes == other.shapes
            and self.dtype == other.dtype
        )

    __hash__ = None

    def __repr__(self) -> str:
        if not self.is_dict:
            return f"ParamSpace(tensor {tuple(self.shapes[0])}, {self.dtype})"
        return f"ParamSpace({len(self.names)} tensors, {self.numel} entries, {self.dtype})"
