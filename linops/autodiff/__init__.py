"""Function-level autodiff operators (CoLA's vocabulary): Jacobian, Hessian, FIM, GGN."""

from .ggn import FIM, GGN
from .hessian import Hessian
from .jacobian import Jacobian

__all__ = ["Jacobian", "Hessian", "FIM", "GGN"]
