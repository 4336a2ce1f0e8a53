"""Per-layer formulas of the layer-wise engine, one file per layer family.

A rule turns one recorded call of a layer (its input and the ``M`` cotangent columns at
its output) into per-sample quantities of the layer's parameters. Every rule provides
``per_sample``; the others default to reductions of it and are overridden where a layer
has a cheaper closed form (for example ``batch_l2`` of ``nn.Linear`` on 2-D inputs is
``‖aₙ‖²‖gₙ‖²``, never the N × P per-sample gradients).

``rule_for(module)`` picks the rule by exact module type; a module without a registered
rule that owns a differentiated parameter takes ``ModuleRule`` (``torch.func``: a
``vmap`` over the samples of the module's own ``vjp``), and a parameter no module call
records takes the whole-model rule in ``linops.curvature.quantities``. ``supported_layers()``
is the table of which module takes which path, read from this registry.
"""

from . import conv, embedding, linear, norm  # noqa: E402  (registers the rules)
from ._base import (
    REGISTRY,
    LayerRule,
    ModuleRule,
    register,
    rule_for,
    supported_layers,
    supported_layers_table,
)

__all__ = ["REGISTRY", "LayerRule", "ModuleRule", "register", "rule_for",
           "supported_layers", "supported_layers_table", "conv", "embedding", "linear", "norm"]
