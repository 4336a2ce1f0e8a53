"""scipy interop, both ways: ``A.to_scipy()`` and ``linops.from_scipy(L)``.

``to_scipy(A)`` gives a ``scipy.sparse.linalg.LinearOperator`` that takes and returns numpy
arrays, so scipy's ``eigsh``, ``lsqr``, ``gmres``, ``svds``, ... run on any linops operator
(curvature operators included; each product moves the vector to the operator's device and
back). ``from_scipy(L)`` wraps a scipy ``LinearOperator``, a scipy sparse matrix or array, or
a dense numpy array as a linops operator.

Example:
    >>> import numpy as np, torch, linops
    >>> from scipy.sparse.linalg import eigsh
    >>> A = linops.Diagonal(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> round(float(eigsh(A.to_scipy(), k=1, which="LA")[0][0]), 6)
    10.0
    >>> B = linops.from_scipy(np.array([[2.0, 0.0], [0.0, 3.0]]))
    >>> B @ torch.ones(2, dtype=torch.float64)
    tensor([2., 3.], dtype=torch.float64)
"""

from __future__ import annotations

import numpy as np
import torch

from .operator import LinearOperator, check_operator_dtype

__all__ = ["to_scipy", "from_scipy"]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def to_scipy(A: LinearOperator, dtype=None):
    """``A`` as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out).

    Args:
        A: any linops operator (m, n).
        dtype: the numpy dtype scipy sees (``np.float64`` for solvers that want it); the
            default is A's own dtype. Inputs are converted to A's dtype before each product
            and results to ``dtype`` after it.

    Products run without autograd; ``rmatvec``/``rmatmat`` use ``Aᴴ``.
    """
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    if not isinstance(A, LinearOperator):
        raise TypeError(f"to_scipy takes a linops LinearOperator, got {type(A).__name__}.")
    out_dtype = _numpy_dtype(A.dtype) if dtype is None else np.dtype(dtype)
    if out_dtype.kind not in "fc":
        raise TypeError(f"to_scipy: dtype must be a floating or complex numpy dtype, got "
                        f"{out_dtype}.")
    if out_dtype.kind == "f" and A.dtype.is_complex:
        raise TypeError(f"to_scipy: A is complex ({A.dtype}); a real dtype={out_dtype} "
                        "would drop the imaginary part. Use np.complex128.")

    def apply(op: LinearOperator, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.dtype.kind == "c" and not A.dtype.is_complex:
            raise TypeError(f"to_scipy: a complex vector cannot multiply the real operator "
                            f"A ({A.dtype}); apply it to the real and imaginary parts.")
        T = torch.from_numpy(np.ascontiguousarray(X)).to(dtype=A.dtype, device=A.device)
        with torch.no_grad():
            Y = op._matmat(T.reshape(T.shape[0], -1))
        Y = Y.detach().cpu().numpy().astype(out_dtype, copy=False)
        return Y.reshape(-1) if X.ndim == 1 else Y

    class _Wrapped(ScipyOperator):
        def __init__(self):
            super().__init__(dtype=out_dtype, shape=A.shape)

        def _matvec(self, x):
            return apply(A, x)

        def _matmat(self, X):
            return apply(A, X)

        def _rmatvec(self, y):
            return apply(A.H, y)

        def _rmatmat(self, Y):
            return apply(A.H, Y)

        def __repr__(self):
            return f"<{A.shape[0]}x{A.shape[1]} scipy LinearOperator of linops {A!r}>"

    return _Wrapped()


def from_scipy(L, dtype: torch.dtype | None = None, device=None) -> LinearOperator:
    """A linops operator from a scipy ``LinearOperator``, a scipy sparse matrix or array, or a
    dense numpy array (2-d).

    Args:
        L: the matrix or operator (m, n).
        dtype: the operator's torch dtype; by default L's dtype when it is floating or
            complex, else float64 (an integer sparse matrix becomes float64).
        device: where the operator lives (default cpu). A dense or sparse matrix is copied
            there (a sparse one as a torch sparse COO tensor); a scipy ``LinearOperator``
            runs on the host and each product moves the block to it and back.

    Tags are not guessed: wrap the result with ``linops.SelfAdjoint`` or ``linops.PSD``
    when L is symmetric or positive semi-definite.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    if isinstance(L, torch.Tensor):
        raise TypeError("from_scipy takes scipy or numpy objects; for a torch.Tensor use "
                        "linops.Dense(M).")
    if not (isinstance(L, (ScipyOperator, np.ndarray)) or sp.issparse(L)):
        raise TypeError(
            "from_scipy takes a scipy.sparse.linalg.LinearOperator, a scipy sparse matrix or "
            f"array, or a 2-d numpy array; got {type(L).__name__}."
        )
    if len(L.shape) != 2:
        raise ValueError(f"from_scipy needs a 2-d matrix or operator; got shape {L.shape}.")
    if dtype is None:
        kind = np.dtype(L.dtype).kind if L.dtype is not None else "f"
        dtype = _torch_dtype(L.dtype) if kind in "fc" else torch.float64
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"from_scipy: dtype must be a torch.dtype, got {dtype!r}.")
    check_operator_dtype(dtype, "from_scipy")
    device = torch.device("cpu" if device is None else device)
    if isinstance(L, np.ndarray):
        from .dense import Dense

        return Dense(torch.from_numpy(np.ascontiguousarray(L)).to(dtype=dtype, device=device))
    if sp.issparse(L):
        return SparseMatrix.from_scipy(L, dtype, device)
    return ScipyLinearOperator(L, dtype, device)


class SparseMatrix(LinearOperator):
    """The operator of a torch sparse COO matrix S (m, n): A x = S x."""

    symbol = "Sparse"

    def __init__(self, S: torch.Tensor):
        if not isinstance(S, torch.Tensor) or S.layout != torch.sparse_coo or S.ndim != 2:
            raise TypeError("SparseMatrix takes a 2-d torch sparse COO tensor "
                            "(torch.sparse_coo_tensor or M.to_sparse()).")
        super().__init__(S.dtype, S.shape, S.device)
        self.S = S.coalesce()

    @classmethod
    def from_scipy(cls, L, dtype: torch.dtype, device) -> SparseMatrix:
        coo = L.tocoo()
        idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        vals = torch.from_numpy(np.ascontiguousarray(coo.data)).to(dtype)
        S = torch.sparse_coo_tensor(idx, vals, coo.shape, check_invariants=True)
        return cls(S.to(device))

    def _matmat(self, X):
        return torch.sparse.mm(self.S, X)

    def _rmatmat(self, Y):
        St = self.S.t()
        return torch.sparse.mm(St.conj() if St.is_complex() else St, Y)

    def _to(self, dtype, device):
        return SparseMatrix(self.S.to(dtype=dtype, device=device))

    def to_dense(self):
        return self.S.to_dense()

    def _repr(self):
        m, n = self.shape
        return f"Sparse({m}×{n}, nnz={self.S._nnz()})"


class ScipyLinearOperator(LinearOperator):
    """A scipy ``LinearOperator`` L as a linops operator: products go to numpy and back."""

    symbol = "L"

    def __init__(self, L, dtype: torch.dtype, device):
        super().__init__(dtype, L.shape, device)
        self.L = L

    def _call(self, fn, X):
        Y = fn(X.detach().cpu().numpy())
        Y = np.asarray(Y).reshape(-1, X.shape[1])
        return torch.from_numpy(np.ascontiguousarray(Y)).to(dtype=self.dtype, device=self.device)

    def _matmat(self, X):
        return self._call(self.L.matmat, X)

    def _rmatmat(self, Y):
        return self._call(self.L.rmatmat, Y)

    def _to(self, dtype, device):
        return ScipyLinearOperator(self.L, dtype, device)

    def _repr(self):
        m, n = self.shape
        return f"scipy({m}×{n})"
