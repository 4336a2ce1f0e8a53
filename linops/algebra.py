"""Combinators: ``Sum``, ``Product``, ``ScalarMul``, ``Transpose``.

They simplify as they are built: nested sums and products flatten, identities drop out of
products, scalars merge and move to the front, and transposes push down the tree
((A + B)ᵀ = Aᵀ + Bᵀ, (A B)ᵀ = Bᵀ Aᵀ, (c A)ᵀ = c Aᵀ, (Aᵀ)ᵀ = A).
"""

from __future__ import annotations

import numbers

import torch

from .operator import LinearOperator, fmt_scalar

__all__ = ["Sum", "Product", "ScalarMul", "Transpose"]


def _is_identity(A) -> bool:
    from .diagonal import Identity

    return type(A) is Identity and not A.tags - Identity._default_tags


class ScalarMul(LinearOperator):
    """c · A for a number or one-element tensor c (``c * A`` builds it)."""

    _precedence = 1

    def __new__(cls, c, A):
        if isinstance(A, ScalarMul):  # c (d A) = (c d) A
            return ScalarMul(A.c * c, A.op)
        if isinstance(c, numbers.Number) and c == 1:
            return A
        return super().__new__(cls)

    def __init__(self, c, A: LinearOperator):
        if getattr(self, "_initialized", False):
            return
        c_complex = isinstance(c, complex) or (isinstance(c, torch.Tensor) and c.is_complex())
        if c_complex and not A.dtype.is_complex:
            raise TypeError(
                f"A complex scalar {c} times a real operator ({A.dtype}) would change its dtype: "
                "convert the operator first, e.g. A.to(torch.complex64)."
            )
        super().__init__(A.dtype, A.shape, A.device)
        if isinstance(c, torch.Tensor):
            c = c.to(device=A.device)
        self.c = c
        self.op = A
        self._initialized = True

    def __getnewargs__(self):
        return (self.c, self.op)

    def _children(self):
        return (self.op,)

    def _matmat(self, X):
        return self.c * self.op._matmat(X)

    def _rmatmat(self, Y):
        c = self.c.conj() if isinstance(self.c, torch.Tensor) else _conj(self.c)
        return c * self.op._rmatmat(Y)

    def _transpose(self):
        return ScalarMul(self.c, self.op.T)

    def _adjoint(self):
        c = self.c.conj() if isinstance(self.c, torch.Tensor) else _conj(self.c)
        return ScalarMul(c, self.op.H)

    def _to(self, dtype, device):
        c = self.c.to(device=device) if isinstance(self.c, torch.Tensor) else self.c
        return ScalarMul(c, self.op.to(dtype=dtype, device=device))

    def _diag(self):
        return self.c * self.op.diag()

    def to_dense(self):
        return self.c * self.op.to_dense()

    def _repr(self):
        if isinstance(self.c, numbers.Number) and self.c == -1:
            return "-" + self.op._repr_wrapped(2)
        return f"{fmt_scalar(self.c)}·{self.op._repr_wrapped(2)}"


def _conj(c):
    return c.conjugate() if isinstance(c, complex) else c


class Sum(LinearOperator):
    """A₁ + A₂ + … (``A + B`` builds it). Nested sums flatten; multiples of the identity merge."""

    _precedence = 0

    def __new__(cls, *terms):
        if not terms:
            raise ValueError("Sum needs at least one operator.")
        for t in terms[1:]:
            if t.shape != terms[0].shape:
                raise ValueError(
                    f"Sum of operators with shapes {terms[0].shape} and {t.shape}: add "
                    "operators of one shape."
                )
        flat = _flatten_sum(terms)
        if len(flat) == 1:
            return flat[0]
        self = super().__new__(cls)
        self._flat = flat
        return self

    def __init__(self, *terms):
        if getattr(self, "_initialized", False):
            return
        terms = self._flat
        del self._flat
        if not terms:
            raise ValueError("Sum needs at least one operator.")
        first = terms[0]
        for t in terms[1:]:
            if t.shape != first.shape:
                raise ValueError(f"Sum of operators with shapes {first.shape} and {t.shape}.")
            first._check_compatible(t, "+")
        super().__init__(first.dtype, first.shape, first.device)
        self.terms = tuple(terms)
        self._initialized = True

    def __getnewargs__(self):
        return self.terms

    def _children(self):
        return self.terms

    def _matmat(self, X):
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def _rmatmat(self, Y):
        out = self.terms[0]._rmatmat(Y)
        for t in self.terms[1:]:
            out = out + t._rmatmat(Y)
        return out

    def _transpose(self):
        return Sum(*(t.T for t in self.terms))

    def _adjoint(self):
        return Sum(*(t.H for t in self.terms))

    def _to(self, dtype, device):
        return Sum(*(t.to(dtype=dtype, device=device) for t in self.terms))

    def _diag(self):
        out = self.terms[0].diag()
        for t in self.terms[1:]:
            out = out + t.diag()
        return out

    def to_dense(self):
        out = self.terms[0].to_dense()
        for t in self.terms[1:]:
            out = out + t.to_dense()
        return out

    def _repr(self):
        parts = []
        for i, t in enumerate(self.terms):
            s = t._repr_wrapped(1)
            if i and s.startswith("-"):
                parts.append(" - " + s[1:])
            elif i:
                parts.append(" + " + s)
            else:
                parts.append(s)
        return "".join(parts)


def _flatten_sum(terms):
    flat = []
    for t in terms:
        if isinstance(t, Sum):
            flat.extend(t.terms)
        else:
            flat.append(t)
    # merge all multiples of the identity into one term c·I
    ident, coeff, rest = None, 0, []
    for t in flat:
        if _is_identity(t):
            ident, coeff = t, coeff + 1
        elif isinstance(t, ScalarMul) and _is_identity(t.op) and isinstance(t.c, numbers.Number):
            ident, coeff = t.op, coeff + t.c
        else:
            rest.append(t)
    n_id = len(flat) - len(rest)
    if n_id >= 2:
        merged = ScalarMul(coeff, ident) if coeff != 0 else None
        if merged is not None:
            rest.append(merged)
        if not rest:  # c·I with c == 0
            rest.append(ScalarMul(0.0, ident))
        return rest
    return flat


class Product(LinearOperator):
    """A₁ A₂ … (``A @ B`` builds it). Nested products flatten, identities drop out, scalars
    move to the front: (c A)(d B) = (c d)·(A B)."""

    _precedence = 1

    def __new__(cls, *factors):
        if not factors:
            raise ValueError("Product needs at least one operator.")
        for a, b in zip(factors[:-1], factors[1:]):
            if a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"Product of operators with shapes {a.shape} and {b.shape}: inner "
                    "dimensions differ."
                )
        flat, c = _flatten_product(factors)
        if len(flat) == 1:
            return flat[0] if _is_one(c) else ScalarMul(c, flat[0])
        if not _is_one(c):
            return ScalarMul(c, Product(*flat))
        self = super().__new__(cls)
        self._flat = flat
        return self

    def __init__(self, *factors):
        if getattr(self, "_initialized", False):
            return
        factors = self._flat
        del self._flat
        for a, b in zip(factors[:-1], factors[1:]):
            if a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"Product of operators with shapes {a.shape} and {b.shape}: inner "
                    "dimensions differ."
                )
            a._check_compatible(b, "@")
        super().__init__(factors[0].dtype, (factors[0].shape[0], factors[-1].shape[1]),
                         factors[0].device)
        self.factors = tuple(factors)
        self._initialized = True

    def __getnewargs__(self):
        return self.factors

    def _children(self):
        return self.factors

    def _matmat(self, X):
        for f in reversed(self.factors):
            X = f._matmat(X)
        return X

    def _rmatmat(self, Y):
        for f in self.factors:
            Y = f._rmatmat(Y)
        return Y

    def _transpose(self):
        return Product(*(f.T for f in reversed(self.factors)))

    def _adjoint(self):
        return Product(*(f.H for f in reversed(self.factors)))

    def _to(self, dtype, device):
        return Product(*(f.to(dtype=dtype, device=device) for f in self.factors))

    def _repr(self):
        return " ".join(f._repr_wrapped(2) for f in self.factors)


def _is_one(c) -> bool:
    return isinstance(c, numbers.Number) and c == 1


def _flatten_product(factors):
    flat, c = [], 1
    for f in factors:
        if isinstance(f, Product):
            parts = list(f.factors)
        else:
            parts = [f]
        for p in parts:
            if isinstance(p, ScalarMul):
                c = c * p.c
                p = p.op
            if isinstance(p, Product):
                flat.extend(p.factors)
            else:
                flat.append(p)
    if len(flat) > 1:
        kept = [p for p in flat if not _is_identity(p)]
        flat = kept if kept else flat[:1]
    return flat, c


class Transpose(LinearOperator):
    """Aᵀ (or Aᴴ with ``conj=True``) of an operator with no cheaper transpose."""

    def __new__(cls, A, conj=False):
        if isinstance(A, Transpose) and A.conj == conj:
            return A.op
        return super().__new__(cls)

    def __init__(self, A: LinearOperator, conj: bool = False):
        if getattr(self, "_initialized", False):
            return
        super().__init__(A.dtype, (A.shape[1], A.shape[0]), A.device)
        self.op = A
        self.conj = bool(conj and A.dtype.is_complex)
        self._initialized = True

    def __getnewargs__(self):
        return (self.op, self.conj)

    def _children(self):
        return (self.op,)

    def _matmat(self, X):
        if self.conj:
            return self.op._rmatmat(X)
        if X.is_complex():
            return self.op._rmatmat(X.conj()).conj()
        return self.op._rmatmat(X)

    def _rmatmat(self, Y):
        if self.conj:
            return self.op._matmat(Y)
        if Y.is_complex():
            return self.op._matmat(Y.conj()).conj()
        return self.op._matmat(Y)

    def _transpose(self):
        return self.op if not self.conj else Transpose(self, conj=False)

    def _adjoint(self):
        return self.op if self.conj or not self.dtype.is_complex else Transpose(self, True)

    def _to(self, dtype, device):
        return Transpose(self.op.to(dtype=dtype, device=device), self.conj)

    def _diag(self):
        d = self.op.diag()
        return d.conj() if self.conj else d

    def to_dense(self):
        d = self.op.to_dense().mT
        return d.conj() if self.conj else d

    def _repr(self):
        return self.op._repr_wrapped(2) + ("ᴴ" if self.conj else "ᵀ")
