"""Second-order optimizers, each a ``torch.optim.Optimizer`` that runs the whole step.

``opt = Opt(model, loss_fn, lr=..., ...)``, then ``loss, outputs = opt.step((X, y))``:
the forward pass, the gradient, the curvature and the update, from one forward pass (the
curvature operator's own). ``opt.last`` holds the step's solver records and curvature
statistics.

- ``GaussNewton``: damped Gauss-Newton and natural-gradient steps (CoLA's notebook).
- ``CGNewton``: ``((1 − α) C + α I) d = −g`` by CG on parameter, layer or full blocks of
  the GGN or the Hessian (bpexts' CGNewton; Hessian-free with ``blocks="full"``).
- ``DiagGGN``: ``p ← p − lr · g / (diag(GGN) + damping)`` (BackPACK's example).
- ``KFAC``: ``p ← p − lr · (K + λI)⁻¹ g`` with K-FAC factors refreshed every
  ``update_every`` steps and the inverse cached in between.
"""

from .cg_newton import CGNewton
from .diag_ggn import DiagGGN
from .gauss_newton import GaussNewton
from .kfac import KFAC

__all__ = ["GaussNewton", "CGNewton", "DiagGGN", "KFAC"]
