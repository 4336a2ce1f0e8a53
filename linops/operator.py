"""The ``LinearOperator`` base class: shape, dtype, device, checked products."""

from __future__ import annotations

import numbers
import operator

import torch

__all__ = ["LinearOperator", "fmt_scalar", "check_operator_dtype"]


def fmt_scalar(c) -> str:
    """Format a scalar for a ``repr``: 0.001, -2, 3.5."""
    if isinstance(c, torch.Tensor):
        c = c.item() if c.numel() == 1 and c.device.type == "cpu" else "c"
    if isinstance(c, numbers.Number):
        return f"{c:.4g}" if isinstance(c, float) else str(c)
    return str(c)


def check_operator_dtype(dtype: torch.dtype, owner: str = "LinearOperator") -> None:
    """Raise a ``TypeError`` unless ``dtype`` is a floating or complex dtype."""
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"{owner} has dtype {dtype}: operators hold floating-point (or complex) numbers, "
            "since products, solves and eigenvalues are not integer arithmetic. Convert the "
            "data first, e.g. M.to(torch.float32) or M.double()."
        )


def _shape_str(shape) -> str:
    return "×".join(str(s) for s in shape)


class LinearOperator:
    """A lazy matrix of shape ``(m, n)`` that can only be multiplied.

    Subclasses call ``super().__init__(dtype, shape, device)`` and implement
    ``_matmat(X)`` for ``X`` of shape ``(n, k)``, returning ``A X`` of shape ``(m, k)``,
    and, unless the operator is self-adjoint, ``_rmatmat(Y)`` for ``Y`` of shape
    ``(m, k)``, returning ``Aᴴ Y``. The public ``A @ x`` checks ``x`` once (type, shape,
    dtype, device) and never lets a wrong shape broadcast; the private hooks never
    re-check.

    Example:
        >>> import torch, linops
        >>> A = linops.Dense(torch.eye(3)) + 2 * linops.Identity(3)
        >>> A @ torch.ones(3)
        tensor([3., 3., 3.])
    """

    #: short symbol used by ``repr`` (``J``, ``H``, ``I``, ...)
    symbol: str = "A"
    #: high number binds tighter in a repr: sums 0, products 1, atoms 2
    _precedence: int = 2

    def __init__(self, dtype: torch.dtype, shape, device=None):
        if isinstance(shape, torch.dtype) and not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"LinearOperator(dtype, shape, device) takes the dtype first; got shape "
                f"{shape} in the dtype's place: call super().__init__({shape}, {dtype!r})."
            )
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise TypeError(f"Operator sizes must be integers; got shape {tuple(shape)}.") from None
        if len(shape) != 2:
            raise ValueError(f"A linear operator has a 2-d shape (m, n); got {shape}.")
        if shape[0] <= 0 or shape[1] <= 0:
            raise ValueError(
                f"Empty operator of shape {shape}: both dimensions must be positive."
            )
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}.")
        check_operator_dtype(dtype, type(self).__name__)
        self._dtype = dtype
        self._shape = shape
        self._device = torch.device(device if device is not None else "cpu")
        self._tags: frozenset[str] = frozenset()

    # ---------------------------------------------------------------- metadata
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tags(self) -> frozenset[str]:
        """The properties the user promised for this operator (see ``linops.PSD``)."""
        return self._tags

    def is_square(self) -> bool:
        return self._shape[0] == self._shape[1]

    # ---------------------------------------------------------------- hooks
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat.")

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """Aᴴ Y; self-adjoint operators need not override it."""
        from .properties import is_self_adjoint

        if is_self_adjoint(self):
            return self._matmat(Y)
        raise NotImplementedError(
            f"{type(self).__name__} implements no _rmatmat (Aᴴ Y) and is not tagged "
            "self-adjoint; implement _rmatmat or wrap it with linops.SelfAdjoint(A) if it is."
        )

    def _transpose(self) -> LinearOperator:
        """Aᵀ as an operator; subclasses push the transpose down their structure."""
        from .algebra import Transpose

        return Transpose(self, conj=False)

    def _adjoint(self) -> LinearOperator:
        if not self.dtype.is_complex:
            return self._transpose()
        from .algebra import Transpose

        return Transpose(self, conj=True)

    def _to(self, dtype: torch.dtype, device: torch.device) -> LinearOperator:
        raise NotImplementedError(
            f"{type(self).__name__} cannot be moved with .to(); rebuild it from data on the "
            "target device or dtype."
        )

    def _diag(self) -> torch.Tensor:
        raise NotImplementedError(
            f"The diagonal of {type(self).__name__} has no cheap closed form; estimate it "
            "with solvers.diag(A) (Hutchinson/XDiag) or use A.to_dense().diagonal()."
        )

    def _children(self) -> tuple[LinearOperator, ...]:
        return ()

    # ---------------------------------------------------------------- checks
    def _check_operand(self, x, side: str = "right") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"Cannot multiply {self._describe()} with a {type(x).__name__}: pass a "
                "torch.Tensor of shape (n,) or (n, k), or a LinearOperator."
            )
        if x.ndim not in (1, 2):
            raise ValueError(
                f"{self._describe()} multiplies vectors (n,) or matrices (n, k); got a "
                f"tensor of shape {tuple(x.shape)}. Reshape batched inputs to (n, k)."
            )
        m, n = self.shape
        if side == "right" and x.shape[0] != n:
            raise ValueError(
                f"A ({type(self).__name__}) is {m}×{n} but x has {x.shape[0]} rows "
                f"(shape {tuple(x.shape)}); x needs {n} rows."
            )
        if side == "left" and x.shape[-1] != m:
            raise ValueError(
                f"x of shape {tuple(x.shape)} cannot multiply {self._describe()} from the "
                f"left: x needs {m} columns (its last dimension)."
            )
        if x.dtype != self.dtype:
            raise ValueError(
                f"{self._describe()} has dtype {self.dtype} but x has {x.dtype}; convert "
                f"with x.to({self.dtype}) or A.to({x.dtype})."
            )
        if x.device != self.device and not _same_device(x.device, self.device):
            raise ValueError(
                f"{self._describe()} lives on {self.device} but x is on {x.device}; move "
                f"one of them, e.g. x.to('{self.device}') or A.to('{x.device}')."
            )

    def _check_compatible(self, other: LinearOperator, op: str) -> None:
        if other.dtype != self.dtype:
            raise ValueError(
                f"Cannot combine {self._describe()} ({self.dtype}) {op} "
                f"{other._describe()} ({other.dtype}): convert one with .to(dtype)."
            )
        if not _same_device(other.device, self.device):
            raise ValueError(
                f"Cannot combine {self._describe()} on {self.device} {op} "
                f"{other._describe()} on {other.device}: move one with .to(device)."
            )

    def _describe(self) -> str:
        return f"A ({type(self).__name__}, {_shape_str(self.shape)})"

    # ---------------------------------------------------------------- products
    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        self._check_operand(X)
        if X.ndim == 1:
            return self._matmat(X[:, None])[:, 0]
        return self._matmat(X)

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """Aᴴ Y for Y of shape (m,) or (m, k)."""
        return self.H.matmat(Y)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            from .algebra import Product

            if self.shape[1] != other.shape[0]:
                raise ValueError(
                    f"Cannot multiply {self._describe()} by {other._describe()}: "
                    f"inner dimensions {self.shape[1]} and {other.shape[0]} differ."
                )
            self._check_compatible(other, "@")
            return Product(self, other)
        return self.matmat(other)

    def __rmatmul__(self, other):
        if isinstance(other, torch.Tensor):
            self._check_operand(other, side="left")
            # x A = (Aᵀ xᵀ)ᵀ
            if other.ndim == 1:
                return self.T._matmat(other[:, None])[:, 0]
            return self.T._matmat(other.mT).mT
        raise TypeError(
            f"Cannot multiply a {type(other).__name__} with {self._describe()}; use a "
            "torch.Tensor or a LinearOperator."
        )

    # ---------------------------------------------------------------- algebra
    def __add__(self, other):
        from .algebra import Sum

        if not isinstance(other, LinearOperator):
            if isinstance(other, numbers.Number) and other == 0:
                return self
            raise TypeError(
                f"Cannot add {type(other).__name__} to {self._describe()}: add a "
                "LinearOperator; for a shift use A + c * linops.I_like(A)."
            )
        if other.shape != self.shape:
            raise ValueError(
                f"Cannot add {self._describe()} and {other._describe()}: shapes "
                f"{self.shape} and {other.shape} differ."
            )
        self._check_compatible(other, "+")
        return Sum(self, other)

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        if not isinstance(other, LinearOperator):
            return self.__add__(other)  # raises the same helpful error
        return self + (-other)

    def __rsub__(self, other):
        return (-self).__add__(other)

    def __neg__(self):
        return -1 * self

    def __mul__(self, c):
        from .algebra import ScalarMul

        if isinstance(c, LinearOperator):
            raise TypeError(
                "`A * B` is not a product of operators: use `A @ B` for the matrix product."
            )
        if isinstance(c, torch.Tensor):
            if c.numel() != 1:
                raise ValueError(
                    f"Scalar multiplication takes a number or a one-element tensor; got "
                    f"shape {tuple(c.shape)}. For a diagonal scaling use linops.Diagonal(d) @ A."
                )
            c = c.reshape(())
        elif not isinstance(c, numbers.Number) or isinstance(c, bool):
            raise TypeError(f"Cannot multiply {self._describe()} by {type(c).__name__} {c!r}: "
                            "use a number or a one-element tensor.")
        return ScalarMul(c, self)

    def __rmul__(self, c):
        return self.__mul__(c)

    def __truediv__(self, c):
        if isinstance(c, LinearOperator):
            raise TypeError("Operators cannot be divided; use solvers.inv(B) for B⁻¹.")
        if isinstance(c, numbers.Number) and c == 0:
            raise ValueError(f"{self._describe()} / 0: division by zero.")
        return self.__mul__(1 / c)

    @property
    def T(self) -> LinearOperator:
        from .properties import is_self_adjoint

        if is_self_adjoint(self) and not self.dtype.is_complex:
            return self
        out = self._transpose()
        if out is not self and getattr(out, "_transpose_of", None) is None:
            out._transpose_of = self  # lets the Bᵀ A B rule recognize rebuilt transposes
        return out

    @property
    def H(self) -> LinearOperator:
        from .properties import is_self_adjoint

        if is_self_adjoint(self):
            return self
        return self._adjoint()

    # ---------------------------------------------------------------- conversions
    def to(self, *args, dtype=None, device=None) -> LinearOperator:
        """A copy with another dtype and/or device: ``A.to(torch.float64)``, ``A.to('cuda')``."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise TypeError(f"A.to() takes a dtype or a device, got {a!r}.")
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else torch.device(device)
        if dtype == self.dtype and _same_device(device, self.device):
            return self
        from .properties import is_psd, is_self_adjoint

        out = self._to(dtype, device)
        tags = set(self._tags)
        # converted children are new objects, so structural rules (Bᵀ A B) may no longer
        # see them; keep what was known
        if is_psd(self):
            tags |= {"psd", "self_adjoint"}
        elif is_self_adjoint(self):
            tags.add("self_adjoint")
        out._tags = frozenset(tags)
        return out

    def to_dense(self) -> torch.Tensor:
        """The matrix as a dense tensor of shape ``(m, n)`` (n products with unit vectors)."""
        n = self.shape[1]
        return self._matmat(torch.eye(n, dtype=self.dtype, device=self.device))

    def to_scipy(self, dtype=None):
        """A ``scipy.sparse.linalg.LinearOperator`` of this operator, numpy in and out, so
        ``eigsh``, ``lsqr``, ``gmres`` run on it; ``dtype`` (numpy) is what scipy sees, the
        operator's own by default (see ``linops.scipy_interop.to_scipy``)."""
        from .scipy_interop import to_scipy

        return to_scipy(self, dtype)

    def diag(self) -> torch.Tensor:
        """The diagonal, where the structure gives it cheaply (else NotImplementedError)."""
        if not self.is_square():
            raise ValueError(f"diag() needs a square operator; {self._describe()} is not.")
        return self._diag()

    def __repr__(self) -> str:
        return self._repr()

    def _repr(self) -> str:
        return self.symbol

    def _repr_wrapped(self, precedence: int) -> str:
        s = self._repr()
        return f"({s})" if self._precedence < precedence else s

    # torch functions should not try to treat operators as tensors
    __array_priority__ = 1000


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return a.index is None or b.index is None or a.index == b.index
