"""solvers: algorithms and the functions that dispatch to them (the verbs of linops).

``inv(A) @ b``, ``solve``, ``pinv``, ``eig``, ``eigmax``, ``eigmin``, ``trace``, ``diag``,
``logdet``, ``slogdet``, ``sqrt``, ``isqrt``, ``exp``, ``log``, ``pow``, ``apply_unary``;
algorithms ``Auto``, ``CG``, ``MINRES``, ``GMRES``, ``Lanczos``, ``PowerIteration``,
``LOBPCG``, ``Cholesky``, ``Eigh``, ``Dense``; estimators ``Hutchinson``, ``HutchPP``,
``SLQ``; preconditioners ``jacobi``, ``nystrom``, ``pivoted_cholesky``; optimizers in
``solvers.optim`` (``GaussNewton``, ``CGNewton``, ``DiagGGN``).
"""

from . import diagnostics, optim
from .auto import Auto
from .cg import CG
from .curvature_preconditioners import PRECONDITIONER_KINDS, curvature_preconditioner
from .dense_algs import Cholesky, Dense, Eigh
from .eigen import EigResult, cond, eig, eig_rule, eigmax, eigmin
from .estimators import Estimate, Hutchinson, HutchPP, XDiag, XTrace
from .gmres import GMRES
from .inverse import InverseOperator, inv, inv_rule, pinv, pinv_rule, solve
from .lanczos import Lanczos
from .lobpcg import LOBPCG
from .logdet import SLQ, logdet, slogdet, slogdet_rule
from .minres import MINRES
from .power_iteration import PowerIteration
from .preconditioners import jacobi, nystrom, pivoted_cholesky
from .result import NotConvergedError, NotConvergedWarning, Solution, Status
from .trace import diag, diag_rule, trace, trace_rule
from .unary import apply_unary, exp, isqrt, log, pow, sqrt, unary_rule

__all__ = [
    "Auto", "CG", "MINRES", "GMRES", "Lanczos", "PowerIteration", "LOBPCG", "Cholesky",
    "Eigh", "Dense", "Hutchinson", "HutchPP", "XTrace", "XDiag", "Estimate", "SLQ",
    "inv", "solve", "pinv", "eig", "eigmax", "eigmin", "cond", "EigResult", "trace", "diag",
    "logdet", "slogdet", "sqrt", "isqrt", "exp", "log", "pow", "apply_unary",
    "jacobi", "nystrom", "pivoted_cholesky", "curvature_preconditioner",
    "PRECONDITIONER_KINDS",
    "Solution", "Status", "NotConvergedError", "NotConvergedWarning", "InverseOperator",
    "inv_rule", "pinv_rule", "eig_rule", "trace_rule", "diag_rule", "slogdet_rule",
    "unary_rule", "optim",
]
