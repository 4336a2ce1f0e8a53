"""Network-level curvature operators built from ``(model, loss_fn, data, params=None)``."""

from ._base import CurvatureOperator
from .blocks import BlockDiagCurvature, block_product_callables
from .diagonal import DiagGGN, DiagHessian
from .ggn import GGN, EmpiricalFisher, MCFisher
from .hessian import Hessian
from .kfac import EKFAC, KFAC
from .layers import supported_layers
from .losses import SUPPORTED_LOSSES, loss_curvature
from .quantities import QUANTITY_NAMES, quantities

__all__ = [
    "CurvatureOperator",
    "GGN",
    "Hessian",
    "EmpiricalFisher",
    "MCFisher",
    "SUPPORTED_LOSSES",
    "loss_curvature",
    "quantities",
    "DiagGGN",
    "DiagHessian",
    "KFAC",
    "EKFAC",
    "BlockDiagCurvature",
    "block_product_callables",
    "QUANTITY_NAMES",
    "supported_layers",
]
