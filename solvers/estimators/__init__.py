"""Stochastic estimators of the trace and the diagonal: ``Hutchinson``, ``HutchPP``,
``XTrace``, ``XDiag``; each returns an :class:`Estimate` (value, standard error, products).

The spectral density by stochastic Lanczos quadrature lives in ``solvers.diagnostics``.
"""

from ._common import Estimate
from .hutchinson import Hutchinson, hutchinson_diag, hutchinson_trace
from .hutchpp import HutchPP, hutchpp_trace
from .xtrace import XDiag, XTrace, xdiag, xtrace

__all__ = [
    "Estimate", "Hutchinson", "HutchPP", "XTrace", "XDiag",
    "hutchinson_trace", "hutchinson_diag", "hutchpp_trace", "xtrace", "xdiag",
]
