"""Matrix functions ``sqrt``, ``isqrt``, ``exp``, ``log``, ``pow``, ``apply_unary`` against
scipy.linalg (sqrtm, expm, logm, fractional_matrix_power), dense and Lanczos paths, and the
structural rules (Diagonal, D + c·I, Identity, BlockDiag, Kronecker powers and log)."""

import warnings

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from _helpers import DEVICE_PARAMS, DTYPE_PARAMS, F64, randn, spd, spectrum_matrix

import solvers
from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Identity,
    Kronecker,
    ScalarMul,
    SelfAdjoint,
    Sum,
    is_self_adjoint,
)
from solvers import (
    Auto,
    Eigh,
    Lanczos,
    NotConvergedWarning,
    apply_unary,
    exp,
    isqrt,
    log,
    pow,
    sqrt,
)


def rel_err(x, ref):
    x = x.detach().cpu().to(F64)
    ref = torch.as_tensor(np.real(ref) if isinstance(ref, np.ndarray) else ref, dtype=F64)
    return float(torch.linalg.norm(x - ref) / max(float(torch.linalg.norm(ref)), 1.0))


#: name → (our function, scipy reference on a dense float64 ndarray)
FUNCTIONS = {
    "sqrt": (sqrt, sla.sqrtm),
    "isqrt": (isqrt, lambda M: np.linalg.inv(sla.sqrtm(M))),
    "exp": (exp, sla.expm),
    "log": (log, sla.logm),
    "pow1.7": (lambda A, alg=None: pow(A, 1.7, alg), lambda M: sla.fractional_matrix_power(M, 1.7)),
    "pow-1": (lambda A, alg=None: pow(A, -1, alg), np.linalg.inv),
    "tanh": (lambda A, alg=None: apply_unary(torch.tanh, A, alg),
             lambda M: sla.funm(M, np.tanh)),
}

N = 12
ALGS = {
    "auto-dense": None,
    "eigh": Eigh(),
    "dense": solvers.Dense(),
    "lanczos": Lanczos(max_iters=N),
    "auto-lanczos": Auto(dense_threshold=0),
}
RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("alg_name", list(ALGS))
@pytest.mark.parametrize("fname", list(FUNCTIONS))
def test_matrix_function_generic(fname, alg_name, dtype, device):
    ours, ref_fn = FUNCTIONS[fname]
    M = spd(N, cond=10.0)
    ref = ref_fn(M.numpy())
    A = PSD(Dense(M.to(dtype=dtype, device=device)))
    F = ours(A, alg=ALGS[alg_name])
    assert F.shape == (N, N) and F.dtype == dtype and F.device.type == device
    assert is_self_adjoint(F)
    b = randn(N, 2)
    assert rel_err(F @ b.to(dtype=dtype, device=device), np.real(ref) @ b.numpy()) < RTOL[dtype]
    assert rel_err(F.to_dense(), ref) < RTOL[dtype]


def test_exp_of_a_symmetric_indefinite_matrix():
    M = spectrum_matrix(torch.linspace(-3.0, 2.0, 10, dtype=F64), seed=2)
    for alg in (None, Lanczos(max_iters=10)):
        F = exp(SelfAdjoint(Dense(M)), alg)
        assert rel_err(F.to_dense(), sla.expm(M.numpy())) < 1e-10


def test_lanczos_function_does_not_fail_silently():
    # more steps than the default budget would be needed: the result is right or it warns
    n = 60
    M = spectrum_matrix(torch.logspace(-4, 2, n, dtype=F64), seed=3)
    b = randn(n)
    ref = np.linalg.inv(sla.sqrtm(M.numpy())).real @ b.numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = isqrt(PSD(Dense(M)), Auto(tol=1e-8, dense_threshold=0)) @ b
    warned = any(issubclass(w.category, NotConvergedWarning) for w in caught)
    assert warned or rel_err(y, ref) < 1e-6


def test_lanczos_function_of_a_zero_vector_is_zero():
    F = sqrt(PSD(Dense(spd(8))), Lanczos(max_iters=8))
    assert torch.equal(F @ torch.zeros(8, dtype=F64), torch.zeros(8, dtype=F64))


# ------------------------------------------------------------------ structural rules
@pytest.mark.parametrize("fname", list(FUNCTIONS))
def test_diagonal_rule(fname):
    ours, ref_fn = FUNCTIONS[fname]
    d = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(4)) + 0.5
    F = ours(Diagonal(d))
    assert isinstance(F, Diagonal)
    assert rel_err(F.to_dense(), ref_fn(np.diag(d.numpy()))) < 1e-12
    # shifted: D + c·I stays diagonal, with f(dᵢ + c)
    for c in (0.3, -0.2):
        S = Diagonal(d) + c * I_like(Diagonal(d))
        F = ours(S)
        assert isinstance(F, Diagonal)
        assert rel_err(F.to_dense(), ref_fn(np.diag(d.numpy() + c))) < 1e-12
    # and 2·D + c·I
    F = ours(2.0 * Diagonal(d) + 0.5 * I_like(Diagonal(d)))
    assert isinstance(F, Diagonal)
    assert rel_err(F.to_dense(), ref_fn(np.diag(2 * d.numpy() + 0.5))) < 1e-12


@pytest.mark.parametrize("fname", ["sqrt", "exp", "log", "pow1.7", "tanh"])
def test_identity_and_scaled_identity(fname):
    ours, ref_fn = FUNCTIONS[fname]
    for op, c in ((Identity(4, F64), 1.0), (3.0 * Identity(4, F64), 3.0)):
        F = ours(op)
        assert isinstance(F, (ScalarMul, Identity))
        assert rel_err(F.to_dense(), ref_fn(c * np.eye(4))) < 1e-12


def test_blockdiag_rule():
    A, B = PSD(Dense(spd(4, seed=1))), PSD(Dense(spd(3, seed=2)))
    for fname in ("sqrt", "log", "exp", "isqrt"):
        ours, ref_fn = FUNCTIONS[fname]
        F = ours(BlockDiag(A, B))
        assert isinstance(F, BlockDiag)
        assert rel_err(F.to_dense(), ref_fn(BlockDiag(A, B).to_dense().numpy())) < 1e-10


def _kron(nfactors):
    factors = [PSD(Dense(spd(n, seed=s))) for n, s in ((4, 1), (3, 2), (2, 3))[:nfactors]]
    return Kronecker(*factors)


@pytest.mark.parametrize("nfactors", [2, 3])
@pytest.mark.parametrize("fname", ["sqrt", "isqrt", "pow1.7", "pow-1"])
def test_kronecker_power_rule(fname, nfactors):
    ours, ref_fn = FUNCTIONS[fname]
    K = _kron(nfactors)
    F = ours(K)
    assert isinstance(F, Kronecker) and len(F.factors) == nfactors
    assert [f.shape for f in F.factors] == [f.shape for f in K.factors]
    assert rel_err(F.to_dense(), ref_fn(K.to_dense().numpy())) < 1e-10


@pytest.mark.filterwarnings("ignore:logm result may be inaccurate")  # scipy, on the reference
@pytest.mark.parametrize("nfactors", [2, 3])
def test_kronecker_log_rule(nfactors):
    K = _kron(nfactors)
    F = log(K)
    assert isinstance(F, Sum) and len(F.terms) == nfactors
    assert all(isinstance(t, Kronecker) for t in F.terms)
    assert rel_err(F.to_dense(), sla.logm(K.to_dense().numpy())) < 1e-10


def test_kronecker_power_of_non_psd_factors():
    S = SelfAdjoint(Dense(spectrum_matrix(torch.tensor([-1.0, 2.0, 3.0], dtype=F64))))
    K = Kronecker(S, PSD(Dense(spd(2))))
    F = pow(K, 2)  # an integer power is factor-wise for any factors
    assert isinstance(F, Kronecker)
    D = K.to_dense()
    assert rel_err(F.to_dense(), D @ D) < 1e-12
    with pytest.raises(ValueError, match="PSD"):
        pow(K, 0.5)
    # exp is not factor-wise: the generic path gives the right answer
    assert rel_err(exp(K).to_dense(), sla.expm(D.numpy())) < 1e-10


# ------------------------------------------------------------------ misuse
def test_matrix_function_misuse():
    A = PSD(Dense(spd(4)))
    with pytest.raises(TypeError, match="callable"):
        apply_unary(3, A)
    with pytest.raises(TypeError, match="linops.Dense"):
        sqrt(spd(4))
    with pytest.raises(TypeError, match="real number"):
        pow(A, "2")
    with pytest.raises(ValueError, match="self-adjoint"):
        exp(Dense(randn(4, 4)))
    with pytest.raises(ValueError, match="self-adjoint"):
        exp(Dense(randn(4, 4)), Lanczos())
    with pytest.raises(TypeError, match="cannot run"):
        exp(A, solvers.CG())
