"""linops: lazy linear operators for neural-network curvature (the nouns).

See ``solvers`` for the algorithms and functions (the verbs) that act on them.
"""

from . import curvature, data
from ._dispatch import dispatch
from .algebra import Product, ScalarMul, Sum, Transpose
from .autodiff import FIM, GGN, Hessian, Jacobian
from .blockdiag import BlockDiag
from .dense import Dense
from .diagonal import Diagonal, I_like, Identity
from .kronecker import Kronecker
from .kronecker_eigen import KroneckerEigen
from .lowrank import LowRank
from .operator import LinearOperator
from .params import ParamSpace
from .permutation import Permutation, Permuted
from .properties import PSD, SelfAdjoint, is_psd, is_self_adjoint, psd_rule, self_adjoint_rule
from .scipy_interop import from_scipy
from .triangular import Triangular

__version__ = "0.1.0"

__all__ = [
    "dispatch",
    "LinearOperator",
    "Dense",
    "Diagonal",
    "Identity",
    "I_like",
    "ScalarMul",
    "Sum",
    "Product",
    "Transpose",
    "Kronecker",
    "KroneckerEigen",
    "BlockDiag",
    "LowRank",
    "Permutation",
    "Permuted",
    "Triangular",
    "PSD",
    "SelfAdjoint",
    "is_psd",
    "is_self_adjoint",
    "psd_rule",
    "self_adjoint_rule",
    "ParamSpace",
    "Jacobian",
    "Hessian",
    "FIM",
    "GGN",
    "curvature",
    "from_scipy",
    "data",
]
