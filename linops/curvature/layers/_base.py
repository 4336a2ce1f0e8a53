"""The registry of per-layer rules and the generic rule every other module takes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["REGISTRY", "LayerRule", "ModuleRule", "register", "rule_for", "supported_layers"]

#: exact module type -> its rule
REGISTRY: dict[type, LayerRule] = {}


def register(*types):
    """Class decorator: register one instance of the rule for each module type."""

    def deco(cls):
        rule = cls()
        for t in types:
            REGISTRY[t] = rule
        return cls

    return deco


class LayerRule:
    """Per-sample quantities of one recorded layer call.

    Every method takes the record (``rec.module``, ``rec.input`` (N, ...) detached) and
    ``cot``, the ``M`` cotangent columns at the layer's output, ``(M, N, *out.shape[1:])``,
    and returns a dict: local parameter name (``"weight"``) → tensor. Quantities are of
    the summed loss; the caller scales them.
    """

    #: how the supported-layers table describes the rule
    description = ""
    #: what K-FAC does with the layer's weight (for the table)
    kronecker = "dense GGN block (up to 4096 entries) or dropped"
    #: one call of the layer adds exactly one graph edge into each of its parameters (so
    #: more edges than calls reveal a use outside the layer's calls)
    single_edge = True

    def problem(self, rec) -> str | None:
        """Why the rule cannot take this call (None if it can)."""
        return None

    def per_sample(self, rec, cot) -> dict:
        """``(M, N, *p.shape)``: the per-sample gradient of each column."""
        raise NotImplementedError

    def summed(self, rec, cot) -> dict:
        """``(M, *p.shape)``: Σₙ of the per-sample gradients."""
        return {k: v.sum(1) for k, v in self.per_sample(rec, cot).items()}

    def sum_sq(self, rec, cot, w) -> dict | None:
        """``p.shape``: Σₘ Σₙ wₘₙ gₘₙ² (``w`` (M, N) or None for ones), or None where the
        layer has no cheaper form than the per-sample gradients."""
        return None

    def sum_sq_batch(self, rec, cot, w) -> dict | None:
        """``(N, *p.shape)``: Σₘ wₘₙ gₘₙ², or None (see ``sum_sq``)."""
        return None

    def sum_sq_summed(self, rec, cot) -> tuple[dict, dict] | None:
        """``(sum_sq(rec, cot, None), summed(rec, cot))`` from one pass where forming the
        per-sample gradients is what both cost (convolutions, sequences), or None."""
        return None

    def sq_norm(self, rec, cot) -> dict | None:
        """``(M, N)``: ‖gₘₙ‖², or None (see ``sum_sq``)."""
        return None


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


class ModuleRule(LayerRule):
    """Any module: per-sample gradients by ``torch.func`` (``vmap`` over the samples of the
    ``vjp`` of the module alone, called on one sample), from the recorded inputs. Needs
    every tensor input to carry the samples along dimension 0."""

    description = "torch.func per-sample vjp of the module"
    single_edge = False  # a module's forward may use a parameter several times

    def problem(self, rec):
        N = rec.input.shape[0] if rec.args and isinstance(rec.args[0], torch.Tensor) else None
        if N is None:
            return "its first input is not a tensor"
        for a in rec.args:
            if isinstance(a, torch.Tensor) and (a.ndim == 0 or a.shape[0] != N):
                return "its tensor inputs do not all carry the samples along dimension 0"
        return None

    def per_sample(self, rec, cot):
        module, kwargs = rec.module, rec.kwargs
        values = {local: getattr(module, local).detach() for local in rec.params}
        tensor_pos = [i for i, a in enumerate(rec.args) if isinstance(a, torch.Tensor)]
        args = list(rec.args)
        batched = tuple(args[i].detach() for i in tensor_pos)

        def call(p, xs):
            full = list(args)
            for i, x in zip(tensor_pos, xs):
                full[i] = x.unsqueeze(0)
            return _first(torch.func.functional_call(module, p, tuple(full), kwargs))

        def one(xs, c):  # c: (M, *out.shape[1:])
            _, vjp_fn = torch.func.vjp(lambda p: call(p, xs), values)
            return torch.func.vmap(vjp_fn)(c.unsqueeze(1))[0]

        res = torch.func.vmap(one, in_dims=(0, 1))(batched, cot)
        return {k: v.transpose(0, 1) for k, v in res.items()}


MODULE_RULE = ModuleRule()


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s exact type, or the generic ``ModuleRule``."""
    return REGISTRY.get(type(module), MODULE_RULE)


def supported_layers() -> list[tuple[str, str]]:
    """``[(module type, how its parameters' quantities are computed)]``, from the
    registry, plus the generic paths."""
    return [row[:2] for row in _rows()]


def _rows():
    rows = sorted((f"nn.{t.__name__}", r.description, r.kronecker) for t, r in REGISTRY.items())
    rows.append(("any other module owning parameters (Conv3d, ConvTranspose, BatchNorm, "
                 "LayerNorm, GroupNorm, Embedding, ...)", MODULE_RULE.description,
                 MODULE_RULE.kronecker))
    rows.append(("a parameter no module call records (used in a parent's forward)",
                 "torch.func per-sample vjp of the whole model", MODULE_RULE.kronecker))
    return rows


def supported_layers_table() -> str:
    """The supported-layers table of the README, in Markdown, generated from the registry
    (``tests/test_quantities.py`` checks that the README holds exactly this)."""
    lines = ["| module | per-sample, diagonal and square-root quantities | Kronecker factors "
             "(KFAC, KFLR, KFRA, EKFAC) |", "|---|---|---|"]
    lines += [f"| {m} | {d} | {k} |" for m, d, k in _rows()]
    return "\n".join(lines)
