"""Bad input gets a clear ValueError or TypeError at once, saying what is wrong and what
to do; nothing broadcasts silently into a wrong result."""

import numpy as np
import pytest
import torch
from _helpers import DEVICE_PARAMS, F64, random_dense

from linops import (
    PSD,
    BlockDiag,
    Dense,
    Diagonal,
    I_like,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    Permutation,
    Product,
    SelfAdjoint,
    Sum,
    Triangular,
)

F32 = torch.float32


# ------------------------------------------------------------------ shapes
def test_shape_mismatch_in_matvec_names_both_shapes():
    A = random_dense(3, 4)
    with pytest.raises(ValueError, match=r"3×4 but x has 3 rows.*\(3,\).*needs 4 rows"):
        A @ torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"3×4 but x has 5 rows.*\(5, 2\)"):
        A @ torch.ones(5, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"3×4 but x has 3 rows"):
        A.matmat(torch.ones(3, 2, dtype=F64))


def test_shape_mismatch_from_the_left():
    A = random_dense(3, 4)
    with pytest.raises(ValueError, match=r"shape \(4,\).*3×4.*needs 3 columns"):
        torch.ones(4, dtype=F64) @ A
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*needs 3 columns"):
        torch.ones(2, 4, dtype=F64) @ A
    with pytest.raises(ValueError, match="needs 3"):
        A.T @ torch.ones(4, dtype=F64)


def test_shape_mismatch_between_operators_names_both_shapes():
    A, B = random_dense(3, 4), random_dense(3, 5)
    with pytest.raises(ValueError, match=r"3×4.*3×5.*inner dimensions 4 and 3"):
        A @ B
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\) differ"):
        A + B
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\) differ"):
        A - B
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(4, 3\)"):
        A + A.T


def test_combinators_built_directly_check_shapes():
    """Sum and Product are public: built by hand they check shapes like ``+`` and ``@``."""
    with pytest.raises(ValueError, match="shape"):
        Sum(random_dense(3, 3), random_dense(4, 4))
    with pytest.raises(ValueError, match="shape"):
        Product(random_dense(3, 4), random_dense(3, 4))
    with pytest.raises(ValueError, match="shape|dimension"):
        Sum(Identity(3, F64), Identity(4, F64))
    with pytest.raises(ValueError, match="shape|dimension"):
        Product(Identity(5, F64), random_dense(3, 4))


def test_no_silent_broadcasting():
    """A (1, n) row where an (n, 1) column is expected, and the reverse, raise."""
    n = 4
    A, D = random_dense(n, n), Diagonal(torch.randn(n, dtype=F64))
    row, col = torch.ones(1, n, dtype=F64), torch.ones(n, 1, dtype=F64)
    for op in (A, D, Identity(n, F64), A + D, A @ D, Kronecker(torch.eye(2, dtype=F64),
                                                              torch.eye(2, dtype=F64))):
        with pytest.raises(ValueError, match="rows"):
            op @ row
        assert (op @ col).shape == (n, 1)
        with pytest.raises(ValueError, match="columns"):
            col @ op
        assert (row @ op).shape == (1, n)
    with pytest.raises(ValueError, match=r"\(4, 1\) and \(1, 4\)"):
        Dense(col) + Dense(row)
    with pytest.raises(ValueError, match="one-element"):
        torch.ones(n, dtype=F64) * A
    with pytest.raises(ValueError, match="one-element"):
        A * torch.ones(n, 1, dtype=F64)


@pytest.mark.parametrize("x", [torch.ones(4, 3, 2, dtype=F64), torch.tensor(1.0, dtype=F64)],
                         ids=["3d", "0d"])
def test_wrong_number_of_dimensions(x):
    A = random_dense(4, 4)
    with pytest.raises(ValueError, match=r"\(n,\) or matrices \(n, k\).*Reshape"):
        A @ x
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        x @ A


# ------------------------------------------------------------------ dtypes and devices
def test_dtype_mismatch_operator_and_operand():
    A = random_dense(3, 3, F32)
    with pytest.raises(ValueError, match=r"torch.float32 but x has torch.float64.*\.to\("):
        A @ torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"float32.*float64"):
        torch.ones(3, dtype=F64) @ A
    with pytest.raises(ValueError, match=r"float32.*int64"):
        A @ torch.ones(3, dtype=torch.long)


def test_dtype_mismatch_between_operators():
    A, B = random_dense(3, 3, F32), random_dense(3, 3, F64)
    for combine in (lambda: A + B, lambda: A @ B, lambda: B - A, lambda: Kronecker(A, B),
                    lambda: BlockDiag(A, B), lambda: A + Identity(3, F64)):
        with pytest.raises(ValueError, match=r"float32.*float64|float64.*float32"):
            combine()
    with pytest.raises(ValueError, match="dtype"):
        LowRank(torch.randn(3, 2, dtype=F32), torch.eye(2, dtype=F64))


def test_device_mismatch_is_caught_without_a_gpu():
    """The device check itself, with PyTorch's data-less 'meta' device standing in."""
    A = Dense(torch.empty(3, 3, device="meta"))
    assert A.device.type == "meta"
    with pytest.raises(ValueError, match=r"meta.*cpu.*move"):
        A @ torch.ones(3)
    with pytest.raises(ValueError, match=r"meta|cpu"):
        torch.ones(3) @ A
    with pytest.raises(ValueError, match=r"meta.*cpu|cpu.*meta"):
        A + random_dense(3, 3, F32)
    with pytest.raises(ValueError, match=r"meta.*cpu|cpu.*meta"):
        Kronecker(A, random_dense(2, 2, F32))


def test_operators_on_one_non_cuda_device_combine():
    """Same-device checks work for device types other than cpu and cuda (meta, mps, xpu)."""
    A = Dense(torch.empty(3, 3, device="meta"))
    assert (A + A).device.type == "meta"
    assert (A @ A).device.type == "meta"
    assert Kronecker(A, A).shape == (9, 9)
    assert BlockDiag(A, A).shape == (6, 6)


@pytest.mark.parametrize("device", DEVICE_PARAMS[1:])
def test_device_mismatch_cuda(device):
    A = random_dense(3, 3, F32, device)
    with pytest.raises(ValueError, match=r"cuda.*cpu"):
        A @ torch.ones(3)
    with pytest.raises(ValueError, match=r"cuda.*cpu|cpu.*cuda"):
        torch.ones(3) @ A
    with pytest.raises(ValueError, match=r"cuda.*cpu|cpu.*cuda"):
        A + random_dense(3, 3, F32)
    with pytest.raises(ValueError, match=r"cuda.*cpu|cpu.*cuda"):
        A @ random_dense(3, 3, F32)
    with pytest.raises(ValueError, match=r"cuda.*cpu|cpu.*cuda"):
        BlockDiag(A, random_dense(2, 2, F32))


# ------------------------------------------------------------------ operand types
@pytest.mark.parametrize("x", [[1.0, 2.0, 3.0], np.ones(3), 3.0, "abc"],
                         ids=["list", "numpy", "float", "str"])
def test_non_tensor_operand(x):
    A = random_dense(3, 3)
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        A @ x
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        A.matmat(x)
    if not isinstance(x, (float, str)):  # a number or str @ A is Python's own TypeError
        with pytest.raises(TypeError, match=r"torch.Tensor"):
            x @ A


def test_operator_times_operator_is_not_a_product():
    A, B = random_dense(3, 3), random_dense(3, 3)
    with pytest.raises(TypeError, match="A @ B"):
        A * B
    with pytest.raises(TypeError, match="inv"):
        A / B
    with pytest.raises(TypeError, match="LinearOperator"):
        A + torch.ones(3, 3, dtype=F64)
    with pytest.raises(TypeError, match="I_like"):
        A + 1.0
    with pytest.raises(TypeError):
        A * "2"


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "build",
    [
        lambda: Dense(torch.zeros(0, 3)),
        lambda: Dense(torch.zeros(3, 0)),
        lambda: Diagonal(torch.zeros(0)),
        lambda: Identity(0),
        lambda: LowRank(torch.zeros(0, 2)),
        lambda: Triangular(torch.zeros(0, 0)),
        lambda: Permutation(torch.zeros(0, dtype=torch.long)),
        lambda: Kronecker(),
        lambda: Kronecker([]),
        lambda: BlockDiag(),
        lambda: BlockDiag([]),
    ],
    ids=["dense_0x3", "dense_3x0", "diagonal", "identity", "lowrank", "triangular",
         "permutation", "kronecker", "kronecker_list", "blockdiag", "blockdiag_list"],
)
def test_empty_operator(build):
    with pytest.raises(ValueError, match=r"[Ee]mpty|at least one|positive"):
        build()


def test_identity_size_must_be_an_integer():
    with pytest.raises((TypeError, ValueError), match="int"):
        Identity(2.5)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], np.eye(2), "A", 3.0], ids=str)
def test_kronecker_and_blockdiag_of_a_non_operator(bad):
    A = random_dense(2, 2)
    with pytest.raises(TypeError, match="LinearOperator"):
        Kronecker(A, bad)
    with pytest.raises(TypeError, match="LinearOperator"):
        BlockDiag(bad, A)


def test_squareness_where_needed():
    K = Kronecker(torch.randn(2, 3, dtype=F64), torch.randn(2, 2, dtype=F64))  # 4×6
    Bd = BlockDiag(torch.randn(2, 3, dtype=F64), torch.randn(2, 2, dtype=F64))  # 4×5
    for A in (K, Bd, random_dense(3, 4)):
        for f in (PSD, SelfAdjoint, I_like):
            with pytest.raises(ValueError, match=r"square.*" + rf"\({A.shape[0]}, "):
                f(A)
        with pytest.raises(ValueError, match="square"):
            A.diag()
    with pytest.raises(TypeError, match="LinearOperator"):
        I_like(torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        Triangular(torch.randn(3, 4))


@pytest.mark.parametrize(
    "perm",
    [torch.tensor([0, 0, 2]), torch.tensor([0, 1, 3]), torch.tensor([-1, 0, 1])],
    ids=["repeated", "out_of_range", "negative"],
)
def test_permutation_must_be_a_permutation(perm):
    with pytest.raises(ValueError, match=r"permutation of 0\.\.2"):
        Permutation(perm)


def test_permutation_input_types():
    with pytest.raises(TypeError, match="integer"):
        Permutation(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer"):
        Permutation([0, 1])
    with pytest.raises(ValueError, match=r"vector"):
        Permutation(torch.tensor([[0, 1]]))


def test_constructor_argument_checks():
    with pytest.raises(TypeError, match="torch.Tensor"):
        Dense(np.eye(3))
    with pytest.raises(ValueError, match="2-d"):
        Dense(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Diagonal([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(n,\)"):
        Diagonal(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"V must be \(n, 2\)"):
        LowRank(torch.randn(4, 2), V=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"C must be \(2, 2\)"):
        LowRank(torch.randn(4, 2), torch.eye(3))
    with pytest.raises(TypeError, match="dtype"):
        LinearOperator("float32", (2, 2))
    with pytest.raises(ValueError, match="2-d"):
        LinearOperator(F32, (2, 2, 2))
    with pytest.raises(TypeError, match="dtype or a device"):
        random_dense(2, 2).to(3)
