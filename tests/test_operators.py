"""Every operator of the conformance list (tests/conformance.py) against its dense float64
reference, in float32 and float64, on CPU and CUDA; and the simplifications the
combinators make as they are built."""

import copy
import pickle

import numpy as np
import pytest
import torch
from _helpers import DEVICE_PARAMS, FLOAT_DTYPES, random_dense
from conformance import CASES, PSD_TAG, SA_TAG, assert_close, walk

import linops
from linops import (
    PSD,
    BlockDiag,
    Diagonal,
    Identity,
    Kronecker,
    LowRank,
    Product,
    ScalarMul,
    Sum,
    Transpose,
    is_psd,
    is_self_adjoint,
)

K = 3  # columns of the matrices in matmat checks


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


@pytest.fixture
def built(case, dtype, device):
    """(case, operator, dtype, device) for every case, dtype and device."""
    return case, case.build(dtype, device), dtype, device


def _rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)


def _check_out(y, shape, dtype, device):
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == shape
    assert y.dtype == dtype, f"result has dtype {y.dtype}, operator has {dtype}"
    assert y.device.type == torch.device(device).type


# ------------------------------------------------------------------ the conformance checks
def test_metadata(built):
    case, A, dtype, device = built
    assert isinstance(A, linops.LinearOperator)
    assert A.shape == case.dense.shape
    assert A.dtype == dtype
    assert A.device.type == torch.device(device).type


def test_matvec(built):
    case, A, dtype, device = built
    x = _rand(A.shape[1], dtype=dtype, device=device)
    x0 = x.clone()
    y = A @ x
    _check_out(y, (A.shape[0],), dtype, device)
    assert_close(y, case.dense @ x.double().cpu().numpy(), dtype)
    assert torch.equal(x, x0), "A @ x modified x"
    assert_close(A.matmat(x), case.dense @ x.double().cpu().numpy(), dtype)


def test_matmat(built):
    case, A, dtype, device = built
    X = _rand(A.shape[1], K, dtype=dtype, device=device)
    Y = A @ X
    _check_out(Y, (A.shape[0], K), dtype, device)
    assert_close(Y, case.dense @ X.double().cpu().numpy(), dtype)
    # one column at a time gives the same as the block
    for j in range(K):
        assert_close(A @ X[:, j], case.dense @ X[:, j].double().cpu().numpy(), dtype)


def test_left_multiplication(built):
    case, A, dtype, device = built
    m = A.shape[0]
    x = _rand(m, dtype=dtype, device=device)
    y = x @ A
    _check_out(y, (A.shape[1],), dtype, device)
    assert_close(y, x.double().cpu().numpy() @ case.dense, dtype)
    X = _rand(K, m, dtype=dtype, device=device)
    Y = X @ A
    _check_out(Y, (K, A.shape[1]), dtype, device)
    assert_close(Y, X.double().cpu().numpy() @ case.dense, dtype)


def test_transpose_and_adjoint(built):
    case, A, dtype, device = built
    ref_T = case.dense.T
    for At in (A.T, A.H):
        assert isinstance(At, linops.LinearOperator)
        assert At.shape == ref_T.shape
        assert At.dtype == dtype and At.device.type == torch.device(device).type
        y = _rand(A.shape[0], K, dtype=dtype, device=device)
        Z = At @ y
        _check_out(Z, (A.shape[1], K), dtype, device)
        assert_close(Z, ref_T @ y.double().cpu().numpy(), dtype)
        assert_close(At @ y[:, 0], ref_T @ y[:, 0].double().cpu().numpy(), dtype)
        assert_close(At.to_dense(), ref_T, dtype)
    y = _rand(A.shape[0], dtype=dtype, device=device)
    assert_close(A.rmatmat(y), ref_T @ y.double().cpu().numpy(), dtype)
    assert_close(A.T.T.to_dense(), case.dense, dtype)


def test_adjoint_identity(built):
    """⟨A v, w⟩ = ⟨v, Aᵀ w⟩ with the operator's own products (no reference involved)."""
    case, A, dtype, device = built
    v = _rand(A.shape[1], K, dtype=dtype, device=device)
    w = _rand(A.shape[0], K, dtype=dtype, device=device)
    lhs = ((A @ v) * w).sum(0)
    rhs = (v * (A.T @ w)).sum(0)
    scale = float((A @ v).abs().max() * w.abs().max()) * A.shape[0]
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    torch.testing.assert_close(lhs, rhs, rtol=rtol, atol=atol * max(scale, 1.0))
    # the same from the left: x A w = (x A) w
    x = _rand(A.shape[0], dtype=dtype, device=device)
    torch.testing.assert_close((x @ A) @ v, x @ (A @ v), rtol=rtol, atol=atol * max(scale, 1))


def test_to_dense(built):
    case, A, dtype, device = built
    D = A.to_dense()
    _check_out(D, case.dense.shape, dtype, device)
    assert_close(D, case.dense, dtype)


def test_diag(built):
    case, A, dtype, device = built
    if not A.is_square():
        with pytest.raises(ValueError, match="square"):
            A.diag()
        return
    if case.diag:
        d = A.diag()
        _check_out(d, (A.shape[0],), dtype, device)
        assert_close(d, np.diagonal(case.dense), dtype)
        return
    # not promised cheap: either exact or NotImplementedError, never anything else
    try:
        d = A.diag()
    except NotImplementedError:
        return
    assert_close(d, np.diagonal(case.dense), dtype)


def test_tags(built):
    case, A, dtype, device = built
    assert is_psd(A) == (PSD_TAG in case.tags), f"is_psd({A!r})"
    assert is_self_adjoint(A) == (SA_TAG in case.tags), f"is_self_adjoint({A!r})"


def test_tags_are_true(case):
    """The reference really has the properties the case expects (guards the list itself)."""
    D = case.dense
    if SA_TAG in case.tags:
        np.testing.assert_allclose(D, D.T, atol=1e-12)
    if PSD_TAG in case.tags:
        assert np.linalg.eigvalsh((D + D.T) / 2).min() >= -1e-10


def test_repr(built):
    case, A, dtype, device = built
    assert case.repr in repr(A), f"{case.repr!r} not in {A!r}"


def test_to_dtype(built):
    case, A, dtype, device = built
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert A.to(dtype) is A or A.to(dtype).dtype == dtype
    B = A.to(other)
    assert B.dtype == other and B.shape == A.shape
    assert B.device.type == torch.device(device).type
    assert_close(B.to_dense(), case.dense, torch.float32)
    x = _rand(A.shape[1], dtype=other, device=device)
    _check_out(B @ x, (A.shape[0],), other, device)
    assert_close(B @ x, case.dense @ x.double().cpu().numpy(), torch.float32)
    assert is_psd(B) == is_psd(A) and is_self_adjoint(B) == is_self_adjoint(A)
    C = A.to(dtype=other)
    assert C.dtype == other


@pytest.mark.parametrize("target", DEVICE_PARAMS)
def test_to_device(built, target):
    case, A, dtype, device = built
    B = A.to(target)
    assert B.device.type == torch.device(target).type
    assert B.dtype == dtype and B.shape == A.shape
    x = _rand(A.shape[1], dtype=dtype, device=target)
    y = B @ x
    _check_out(y, (A.shape[0],), dtype, target)
    assert_close(y, case.dense @ x.double().cpu().numpy(), dtype)
    assert_close(B.to_dense(), case.dense, dtype)
    assert is_psd(B) == is_psd(A) and is_self_adjoint(B) == is_self_adjoint(A)
    for op in walk(B):  # every node of the tree moved
        assert op.device.type == torch.device(target).type, f"{op!r} stayed on {op.device}"
    D = A.to(device=target, dtype=torch.float64)
    assert D.dtype == torch.float64 and D.device.type == torch.device(target).type


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_copy_and_pickle(case):
    """copy.copy (what PSD(A) uses), and for data-only trees deepcopy and pickle, give an
    operator with the same products."""
    A = case.build(torch.float64, "cpu")
    x = torch.randn(A.shape[1], 2, dtype=torch.float64)
    copies = [copy.copy(A)]
    if not any(type(op).__module__.startswith("linops.autodiff") for op in walk(A)):
        copies += [copy.deepcopy(A), pickle.loads(pickle.dumps(A))]
    for B in copies:
        assert type(B) is type(A) and B.shape == A.shape
        assert_close(B @ x, case.dense @ x.numpy(), torch.float64)
        assert is_psd(B) == is_psd(A)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_products_do_not_synchronize(case):
    """No hidden host round-trips: products on CUDA never synchronize with the host."""
    A = case.build(torch.float32, "cuda")
    x = torch.randn(A.shape[1], K, device="cuda")
    y = torch.randn(A.shape[0], K, device="cuda")
    AT = A.T
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        A @ x
        AT @ y
        y.T @ A
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_every_operator_has_a_case():
    """Each LinearOperator class that linops exports appears in some conformance case."""
    exported = {
        obj for name in linops.__all__
        if isinstance(obj := getattr(linops, name), type)
        and issubclass(obj, linops.LinearOperator) and obj is not linops.LinearOperator
    }
    covered = {type(op) for c in CASES for op in walk(c.build(torch.float64, "cpu"))}
    missing = sorted(cls.__name__ for cls in exported - covered)
    assert not missing, f"operators with no conformance case: {missing}"


def test_case_ids_unique_and_dtypes_listed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(FLOAT_DTYPES) == {torch.float32, torch.float64}


# ------------------------------------------------------------------ simplification
def test_sums_flatten():
    A, B, C, D = (random_dense() for _ in range(4))
    S = (A + B) + (C + D)
    assert type(S) is Sum and S.terms == (A, B, C, D)
    S2 = A + (B + (C + D))
    assert type(S2) is Sum and S2.terms == (A, B, C, D)
    assert_close(S.to_dense(), sum(X.M for X in (A, B, C, D)), torch.float64)


def test_products_flatten():
    A, B, C, D = (random_dense() for _ in range(4))
    P = (A @ B) @ (C @ D)
    assert type(P) is Product and P.factors == (A, B, C, D)
    assert (A @ (B @ (C @ D))).factors == (A, B, C, D)
    assert_close(P.to_dense(), A.M @ B.M @ C.M @ D.M, torch.float64)


def test_identity_drops_out_of_products():
    A = random_dense()
    I = Identity(4, torch.float64)
    assert (I @ A) is A and (A @ I) is A
    P = A @ I @ A
    assert type(P) is Product and P.factors == (A, A)
    assert (I @ I) is not None and type(I @ I) is Identity
    R = random_dense(3, 4)
    assert (Identity(3, torch.float64) @ R @ I) is R


def test_scalars_merge():
    A = random_dense()
    S = 2 * (3 * A)
    assert type(S) is ScalarMul and S.c == 6 and S.op is A
    negA = -A
    assert type(negA) is ScalarMul and negA.c == -1 and (-negA) is A
    assert (1 * A) is A and (A / 1) is A
    P = (2 * A) @ (5 * A)
    assert type(P) is ScalarMul and P.c == 10
    assert type(P.op) is Product and P.op.factors == (A, A)
    assert_close(P.to_dense(), 10 * A.M @ A.M, torch.float64)
    T = 2 * (A / 4)
    assert type(T) is ScalarMul and T.c == 0.5 and T.op is A


def test_tensor_scalars_stay_in_the_graph():
    """A tensor scalar equal to 1 is still a tensor: simplification must not drop it
    (its gradient, and no host synchronization to compare it with 1)."""
    A = random_dense()
    x = torch.randn(4, dtype=torch.float64)
    for build in (lambda c: (c * A) @ Identity(4, torch.float64),
                  lambda c: Identity(4, torch.float64) @ (A * c),
                  lambda c: c * A,
                  lambda c: (c * A) @ A):
        c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        y = build(c) @ x
        assert y.requires_grad, "the scalar's autograd graph was dropped"
        y.sum().backward()
        assert c.grad is not None
        torch.testing.assert_close(c.grad, y.detach().sum())


def test_multiples_of_identity_merge():
    I = Identity(4, torch.float64)
    S = 2 * I + 3 * I
    assert type(S) is ScalarMul and S.c == 5 and type(S.op) is Identity
    A = random_dense()
    S2 = A + 0.5 * I + I
    assert type(S2) is Sum and len(S2.terms) == 2
    merged = [t for t in S2.terms if t is not A]
    assert type(merged[0]) is ScalarMul and merged[0].c == 1.5
    assert_close(S2.to_dense(), A.M + 1.5 * torch.eye(4, dtype=torch.float64), torch.float64)
    assert (A + I - I) is A
    Z = I - I
    assert_close(Z.to_dense(), torch.zeros(4, 4, dtype=torch.float64), torch.float64)


def test_transpose_pushes_down_sums():
    A, B = random_dense(3, 4), random_dense(3, 4)
    S = (A + B).T
    assert type(S) is Sum and len(S.terms) == 2
    assert all(type(t) is Transpose for t in S.terms)
    assert S.terms[0].op is A and S.terms[1].op is B
    assert_close(S.to_dense(), (A.M + B.M).T, torch.float64)


def test_transpose_of_product_reverses():
    A, B = random_dense(3, 4), random_dense(4, 5)
    P = (A @ B).T
    Q = B.T @ A.T
    assert type(P) is Product and type(Q) is Product
    assert len(P.factors) == len(Q.factors) == 2
    for f, g in zip(P.factors, Q.factors):
        assert type(f) is type(g) is Transpose and f.op is g.op
    assert P.factors[0].op is B and P.factors[1].op is A
    assert_close(P.to_dense(), (A.M @ B.M).T, torch.float64)


def test_transpose_of_scalar_and_structure():
    A = random_dense(3, 4)
    S = (2 * A).T
    assert type(S) is ScalarMul and S.c == 2 and type(S.op) is Transpose and S.op.op is A
    K_ = Kronecker(random_dense(2, 3), random_dense(3, 2))
    assert type(K_.T) is Kronecker
    assert all(type(f) is Transpose for f in K_.T.factors)
    Bd = BlockDiag(random_dense(2, 3), random_dense(1, 1))
    assert type(Bd.T) is BlockDiag and Bd.T.shape == (4, 3)


def test_double_transpose_is_the_operator():
    A = random_dense(3, 4)
    assert A.T.T is A
    assert A.H.H is A
    assert Transpose(Transpose(A)) is A
    S = A + random_dense(3, 4)
    assert S.T.T.terms == S.terms


def test_self_adjoint_transpose_is_itself():
    D = Diagonal(torch.randn(4, dtype=torch.float64))
    assert D.T is D
    G = PSD(random_dense())
    assert G.T is G and G.H is G
    I = Identity(3)
    assert I.T is I
    L = LowRank(torch.randn(5, 2, dtype=torch.float64))
    assert L.T is L
