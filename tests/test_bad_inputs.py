"""The bad-input catalogue (issue 12): every misuse a careful user tried, each raising at once
the named exception with a message that says what to do (the phrase checked here). Numerical
trouble that is the caller's to read (a status) is checked with ``on_failure="raise"``.

Each case is ``(id, thunk, exception type, regex of the fix)``; adding a misuse adds a line.
"""

import numpy as np
import pytest
import torch
from torch import nn

import linops
import solvers
from linops import PSD, Dense, Diagonal, Identity, LinearOperator, SelfAdjoint
from linops.curvature import GGN, EmpiricalFisher, Hessian
from solvers import CG, GMRES, MINRES, Auto, Cholesky, NotConvergedError

F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------ small inputs
def _eye(n=3, dtype=F32):
    return torch.eye(n, dtype=dtype)


def _nonsymmetric(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, n, generator=g, dtype=F64) + 2 * n**0.5 * torch.eye(n, dtype=F64)


def _nan_matrix(n=4):
    M = torch.eye(n, dtype=F64)
    M[1, 2] = float("nan")
    return M


def _numerically_singular(n=40, r=20):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(n, r, generator=g, dtype=F64)
    return B @ B.T  # rank r in exact arithmetic; LU finds no exact zero pivot


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _data(n=6, features=3, dtype=F32):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, features, generator=g).to(dtype)
    return X, torch.randint(0, 2, (n,), generator=g)


def _ignored(n=6):
    X, _ = _data(n)
    return X, torch.full((n,), -100)


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = nn.functional.dropout(torch.tanh(self.a(x)), 0.5, training=self.training)
        return self.b(h)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 3, 3)

    def forward(self, x):
        return self.c(x).mean(-1)


def _op_with_swapped_init():
    class Mine(LinearOperator):
        def __init__(self):
            super().__init__((3, 3), F32)

    return Mine()


def _loader_of_inputs_only():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3))
    return GGN(_mlp(), nn.CrossEntropyLoss(), torch.utils.data.DataLoader(ds, batch_size=3))


def _solve(A, alg=None, b=None):
    b = torch.ones(A.shape[0], dtype=A.dtype) if b is None else b
    return solvers.inv(A, alg=alg) @ b


# ------------------------------------------------------------------ the catalogue
CASES = [
    # --- operators of a dtype that is not floating point, rejected when built
    ("dense-int64", lambda: Dense(torch.ones(3, 3, dtype=torch.int64)), TypeError,
     r"M\.to\(torch\.float32\)"),
    ("dense-bool", lambda: Dense(torch.ones(3, 3, dtype=torch.bool)), TypeError,
     r"floating-point"),
    ("diagonal-int32", lambda: Diagonal(torch.ones(3, dtype=torch.int32)), TypeError,
     r"\.double\(\)"),
    ("triangular-int", lambda: linops.Triangular(torch.ones(3, 3, dtype=torch.int64)),
     TypeError, r"to\(torch\.float32\)"),
    ("lowrank-int", lambda: linops.LowRank(torch.ones(3, 1, dtype=torch.int64)), TypeError,
     r"to\(torch\.float32\)"),
    ("kronecker-int", lambda: linops.Kronecker(torch.ones(2, 2, dtype=torch.int64),
                                               torch.ones(2, 2, dtype=torch.int64)),
     TypeError, r"to\(torch\.float32\)"),
    ("identity-int-dtype", lambda: Identity(3, torch.int64), TypeError, r"floating-point"),
    ("permutation-int-dtype", lambda: linops.Permutation(torch.tensor([1, 0]), torch.int64),
     TypeError, r"floating-point"),
    ("to-int", lambda: Dense(_eye()).to(torch.int64), TypeError, r"floating-point"),
    ("from-scipy-int-dtype", lambda: linops.from_scipy(np.eye(2), dtype=torch.int32),
     TypeError, r"floating-point"),
    # --- arguments in the wrong order or of the wrong kind
    ("identity-swapped", lambda: Identity(torch.float32, 3), TypeError,
     r"Identity\(3, torch\.float32\)"),
    ("identity-dtype-as-size", lambda: Identity(3, 3), TypeError, r"size first"),
    ("identity-shape", lambda: Identity((3, 3)), TypeError, r"Identity\(3, dtype\)"),
    ("base-init-swapped", _op_with_swapped_init, TypeError, r"takes the dtype first"),
    ("dense-of-numpy", lambda: Dense(np.eye(2)), TypeError, r"torch\.Tensor"),
    ("matvec-rows", lambda: Dense(_eye(4)) @ torch.ones(3), ValueError, r"needs 4 rows"),
    ("matvec-dtype", lambda: Dense(_eye(3, F64)) @ torch.ones(3), ValueError,
     r"x\.to\(torch\.float64\)"),
    ("add-tensor", lambda: Dense(_eye()) + torch.eye(3), TypeError, r"I_like"),
    ("star-product", lambda: Dense(_eye()) * Dense(_eye()), TypeError, r"A @ B"),
    ("divide-zero", lambda: Dense(_eye()) / 0, ValueError, r"division by zero"),
    # --- algorithm configurations: unknown keywords name the right one
    ("cg-maxiter", lambda: CG(maxiter=20), TypeError, r"max_iters=20"),
    ("cg-rtol", lambda: CG(rtol=1e-3), TypeError, r"tol=0\.001"),
    ("minres-M", lambda: MINRES(M=None), TypeError, r"preconditioner=None"),
    ("gmres-max-iter", lambda: GMRES(max_iter=5), TypeError, r"max_iters=5"),
    ("auto-maxiter", lambda: Auto(maxiter=5), TypeError, r"max_iters=5"),
    ("cholesky-rtol", lambda: Cholesky(rtol=1e-3), TypeError, r"tol=0\.001"),
    ("cholesky-negative-tol", lambda: Cholesky(tol=-1.0), ValueError, r"tol=1e-4"),
    ("dense-unknown", lambda: solvers.Dense(pivot=True), TypeError,
     r"arguments are on_failure, tol"),
    ("cg-typo", lambda: CG(tols=1e-3), TypeError, r"tol=0\.001"),
    ("lanczos-maxiter", lambda: solvers.Lanczos(maxiter=50), TypeError, r"max_iters=50"),
    ("lobpcg-max-iter", lambda: solvers.LOBPCG(max_iter=5), TypeError, r"max_iters=5"),
    ("power-iteration-rtol", lambda: solvers.PowerIteration(rtol=1e-4), TypeError,
     r"tol=0\.0001"),
    ("slq-num-probes", lambda: solvers.SLQ(num_probes=10), TypeError, r"probes=10"),
    ("cg-too-many-positional", lambda: CG(1e-3, 0.0, 10, None, None, "warn", None, 1),
     TypeError, r"at most 7 arguments \(tol, atol, max_iters"),
    ("cg-negative-tol", lambda: CG(tol=-1), ValueError, r"tol=1e-6"),
    ("cg-zero-iters", lambda: CG(max_iters=0), ValueError, r"max_iters=100"),
    ("cg-on-failure", lambda: CG(on_failure="loud"), ValueError, r"'warn'"),
    ("alg-class", lambda: solvers.inv(Dense(_eye()), alg=CG), TypeError, r"alg=CG\(\)"),
    ("inv-tensor", lambda: solvers.inv(torch.eye(3)), TypeError, r"linops\.Dense\(M\)"),
    # --- preconditioners of the wrong shape
    ("precond-tensor-shape", lambda: _solve(PSD(Dense(_eye(4))), CG(preconditioner=_eye(3))),
     ValueError, r"must approximate A⁻¹, an 4×4"),
    ("precond-callable-shape",
     lambda: _solve(PSD(Dense(_eye(4))), CG(preconditioner=lambda X: X[:3])), ValueError,
     r"must map \(n, k\) to \(n, k\)"),
    ("precond-operator-shape",
     lambda: _solve(PSD(Dense(_eye(4))), CG(preconditioner=Dense(_eye(3)))), ValueError,
     r"of A's shape|must approximate"),
    ("precond-not-square", lambda: CG(preconditioner=torch.ones(3, 2)), ValueError,
     r"square matrix"),
    ("minres-precond-shape",
     lambda: _solve(SelfAdjoint(Dense(_eye(4))), MINRES(preconditioner=_eye(5))), ValueError,
     r"must approximate A⁻¹"),
    ("gmres-precond-callable",
     lambda: _solve(Dense(_eye(4)), GMRES(preconditioner=lambda X: X.T)), ValueError,
     r"must map \(n, k\) to \(n, k\)"),
    # --- CG and MINRES on a matrix that is not symmetric and not tagged
    ("cg-nonsymmetric", lambda: _solve(Dense(_nonsymmetric()), CG()), ValueError,
     r"alg=solvers\.GMRES\(\)"),
    ("minres-nonsymmetric", lambda: _solve(Dense(_nonsymmetric()), MINRES()), ValueError,
     r"linops\.SelfAdjoint\(A\)"),
    # --- dtypes the algorithms cannot take
    ("cg-complex", lambda: _solve(PSD(Dense(_eye(3, torch.complex64))), CG()), TypeError,
     r"imaginary part.*\[\[Re A, −Im A\]"),
    ("minres-kernel-complex",
     lambda: solvers.minres.minres(lambda X: X, torch.ones(3, dtype=torch.complex128)),
     TypeError, r"alg=solvers\.Dense\(\)"),
    ("cg-kernel-int", lambda: solvers.cg.cg(lambda X: X, torch.ones(3, dtype=torch.int64)),
     TypeError, r"\.to\(torch\.float32\)"),
    ("inv-float16", lambda: _solve(Dense(_eye(3, torch.float16))), TypeError,
     r"A\.to\(torch\.float32\)"),
    ("cholesky-bfloat16", lambda: _solve(PSD(Dense(_eye(3, torch.bfloat16))), Cholesky()),
     TypeError, r"A\.to\(torch\.float32\)"),
    ("eig-float16", lambda: solvers.eig(SelfAdjoint(Dense(_eye(3, torch.float16))), k=1),
     TypeError, r"A\.to\(torch\.float32\)"),
    ("eigh-float16", lambda: solvers.eig(SelfAdjoint(Dense(_eye(3, torch.float16))), k=1,
                                         alg=solvers.Eigh()),
     TypeError, r"A\.to\(torch\.float32\)"),
    ("logdet-bfloat16", lambda: solvers.logdet(Dense(_eye(3, torch.bfloat16))), TypeError,
     r"A\.to\(torch\.float32\)"),
    ("sqrt-float16", lambda: solvers.sqrt(PSD(Dense(_eye(3, torch.float16)))), TypeError,
     r"A\.to\(torch\.float32\)"),
    ("dense-solve-float16",
     lambda: solvers.dense_algs.dense_solve(_eye(3, torch.float16),
                                            torch.ones(3, dtype=torch.float16),
                                            solvers.Dense()),
     TypeError, r"A\.to\(torch\.float32\)"),
    # --- meta tensors: shapes without values
    ("inv-meta", lambda: solvers.inv(Dense(torch.empty(3, 3, device="meta"))), ValueError,
     r"to_empty"),
    ("eig-meta", lambda: solvers.eig(SelfAdjoint(Dense(torch.empty(3, 3, device="meta")))),
     ValueError, r"real data"),
    ("ggn-meta-model",
     lambda: GGN(nn.Linear(3, 2, device="meta"), nn.CrossEntropyLoss(), _data()), ValueError,
     r"model\.to_empty\(device='cpu'\)"),
    ("ggn-meta-data",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(),
                 [(torch.empty(2, 3, device="meta"), torch.zeros(2, dtype=torch.long))] * 2),
     ValueError, r"real device"),
    # --- numerical trouble read as a status, here raised on request
    ("cholesky-nan", lambda: _solve(PSD(Dense(_nan_matrix())), Cholesky(on_failure="raise")),
     NotConvergedError, r"NaN or infinity.*check how A was built"),
    ("lu-nan", lambda: _solve(Dense(_nan_matrix()), solvers.Dense(on_failure="raise")),
     NotConvergedError, r"NaN or infinity"),
    ("auto-numerically-singular",
     lambda: _solve(Dense(_numerically_singular()), Auto(on_failure="raise")),
     NotConvergedError, r"numerically singular.*solvers\.pinv\(A\)"),
    ("dense-solve-numerically-singular",
     lambda: solvers.dense_algs.dense_solve(_numerically_singular(),
                                            torch.ones(40, dtype=F64),
                                            solvers.Dense(on_failure="raise")),
     NotConvergedError, r"Add damping"),
    ("cholesky-not-pd", lambda: _solve(PSD(Dense(-_eye())), Cholesky()), ValueError,
     r"damping term"),
    # --- curvature: batches that do not fit the model
    ("features", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(features=4)), ValueError,
     r"X needs shape \(N, 3\)"),
    ("features-autograd",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(features=5), fast_path=False),
     ValueError, r"X needs shape \(N, 3\)"),
    ("features-hessian", lambda: Hessian(_mlp(), nn.CrossEntropyLoss(), _data(features=2)),
     ValueError, r"X needs shape \(N, 3\)"),
    ("input-float64", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(dtype=F64)), TypeError,
     r"X\.to\(torch\.float32\)"),
    ("input-int", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(dtype=torch.int64)),
     TypeError, r"nn\.Embedding"),
    ("conv-channels",
     lambda: GGN(_Conv(), nn.CrossEntropyLoss(), (torch.randn(4, 5, 7),
                                                  torch.zeros(4, dtype=torch.long))),
     ValueError, r"takes 2 input channels"),
    ("class-out-of-range-loss",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(), (_data()[0], torch.tensor([0, 1, 5, 0, 1, 0])))
     .loss, ValueError, r"lie in \[0, 2\)"),
    ("loader-of-inputs", _loader_of_inputs_only, TypeError, r"TensorDataset\(X, y\)"),
    ("batches-of-three", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), [(*_data(), 1)] * 2),
     TypeError, r"pair \(X, y\)"),
    ("batch-targets-not-tensor",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(), [(_data()[0], [0, 1])] * 2), TypeError,
     r"targets y must be a tensor"),
    ("empty-data", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), []), ValueError, r"empty"),
    ("generator-data", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), (b for b in [_data()])),
     TypeError, r"list\(data\)"),
    # --- curvature: every target ignore_index, several batches, no cache
    ("all-ignored-product",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(), [_ignored()] * 2) @ torch.ones(26), ValueError,
     r"Drop those batches"),
    ("all-ignored-loss", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), [_ignored()] * 2).loss,
     ValueError, r"Drop those batches"),
    ("all-ignored-gradient",
     lambda: GGN(_mlp(), nn.CrossEntropyLoss(), [_ignored()] * 2).gradient, ValueError,
     r"Drop those batches"),
    ("all-ignored-hessian",
     lambda: Hessian(_mlp(), nn.CrossEntropyLoss(), [_ignored()] * 2) @ torch.ones(26),
     ValueError, r"Drop those batches"),
    ("all-ignored-fisher",
     lambda: EmpiricalFisher(_mlp(), nn.CrossEntropyLoss(), [_ignored()] * 2) @ torch.ones(26),
     ValueError, r"Drop those batches"),
    ("all-ignored-cached", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _ignored()), ValueError,
     r"ignore_index"),
    # --- curvature: other misuse
    ("not-a-module", lambda: GGN(lambda x: x, nn.CrossEntropyLoss(), _data()), TypeError,
     r"torch\.nn\.Module"),
    ("unknown-param", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(),
                                  params={"w": torch.ones(1)}), ValueError,
     r"model\.named_parameters\(\)"),
    ("dropout-train-mode",
     lambda: GGN(nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)), nn.CrossEntropyLoss(),
                 _data()), ValueError, r"model\.eval\(\)"),
    ("functional-dropout",
     lambda: GGN(_FunctionalDropout(), nn.CrossEntropyLoss(), _data()).check_deterministic(),
     ValueError, r"not deterministic.*dropout"),
    ("unsupported-loss", lambda: GGN(_mlp(), nn.L1Loss(), _data()), TypeError,
     r"torch\.nn\.CrossEntropyLoss"),
    ("fast-path-flag", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data(), fast_path="yes"),
     TypeError, r"None, True or False"),
    ("curvature-to", lambda: GGN(_mlp(), nn.CrossEntropyLoss(), _data()).to(F64), ValueError,
     r"model\.to\(\.\.\.\)"),
    # --- scipy interop
    ("from-scipy-tensor", lambda: linops.from_scipy(torch.eye(2)), TypeError,
     r"linops\.Dense\(M\)"),
    ("from-scipy-list", lambda: linops.from_scipy([[1.0]]), TypeError, r"2-d numpy array"),
    ("to-scipy-complex-as-real",
     lambda: Dense(_eye(2, torch.complex128)).to_scipy(dtype=np.float64), TypeError,
     r"np\.complex128"),
]


def test_catalogue_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 60
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(("thunk", "exc", "fix"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_raises_with_the_fix(thunk, exc, fix):
    with pytest.raises(exc, match=fix) as info:
        thunk()
    # the exact type, not a subclass that happens to match (NotConvergedError is RuntimeError)
    assert type(info.value) is exc
