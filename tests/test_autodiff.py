"""Function-level autodiff operators (Jacobian, Hessian, GGN, FIM) against dense float64
ground truth from torch.func, for flat and dict inputs, one and k vectors, transposes."""

import pytest
import torch
from _helpers import DEVICE_PARAMS
from torch.func import hessian, jacrev

import linops
from linops.autodiff import FIM, GGN, Hessian, Jacobian
from linops.params import ParamSpace

F64 = torch.float64
K = 3


def _close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


# ------------------------------------------------------------------ the test functions
def _mlp_fn(device, act=torch.tanh):
    """f(x) with x = dict of MLP weights (3 -> 4 -> 3) evaluated on 5 inputs: (5, 3)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, generator=g, dtype=F64).to(device)
    params = {
        "W1": torch.randn(4, 3, generator=g, dtype=F64).to(device),
        "b1": torch.randn(4, generator=g, dtype=F64).to(device),
        "W2": torch.randn(3, 4, generator=g, dtype=F64).to(device),
    }

    def f(p):
        return act(X @ p["W1"].T + p["b1"]) @ p["W2"].T

    return f, params


def _flat_fn(device):
    """f(x) for a tensor x of shape (2, 3): output of shape (4,)."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 6, generator=g, dtype=F64).to(device)
    x = torch.randn(2, 3, generator=g, dtype=F64).to(device)

    def f(x):
        return torch.sin(A @ x.reshape(-1)) * x.reshape(-1)[:4]

    return f, x


def _as_flat(f, space):
    return lambda v: f(space.unflatten(v))


def _cases(device):
    f, p = _mlp_fn(device)
    yield "dict", f, p
    f, x = _flat_fn(device)
    yield "tensor", f, x


# ------------------------------------------------------------------ Jacobian
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("vectorize", [False, True])
def test_jacobian_products_and_transposes(device, vectorize):
    for _, f, x in _cases(device):
        space = ParamSpace(x)
        x0 = space.flatten(x)
        Jref = jacrev(_as_flat(f, space))(x0).reshape(-1, space.numel)
        J = Jacobian(f, x, vectorize=vectorize)
        m, n = Jref.shape
        assert J.shape == (m, n) and J.dtype == F64 and J.device.type == device
        v = torch.randn(n, dtype=F64, device=device)
        V = torch.randn(n, K, dtype=F64, device=device)
        u = torch.randn(m, dtype=F64, device=device)
        U = torch.randn(m, K, dtype=F64, device=device)
        _close(J @ v, Jref @ v)
        _close(J @ V, Jref @ V)
        _close(J.T @ u, Jref.T @ u)
        _close(J.T @ U, Jref.T @ U)
        _close(u @ J, u @ Jref)
        _close(U.T @ J, U.T @ Jref)
        _close(J.to_dense(), Jref)
        _close(J.value.reshape(-1), f(x).reshape(-1))
        # adjoint identity on the operator itself
        assert torch.allclose((J @ v) @ u, v @ (J.T @ u))


def test_jacobian_repr_and_algebra():
    f, p = _mlp_fn("cpu")
    J = Jacobian(f, p)
    H = Hessian(lambda z: (z**2).sum() / 2, J.value)
    G = J.T @ H @ J
    assert repr(G) == "Jᵀ H J"
    assert linops.is_psd(linops.PSD(G + 1e-3 * linops.I_like(G)))
    v = torch.randn(J.shape[1], dtype=F64)
    Jd = J.to_dense()
    _close(G @ v, Jd.T @ (Jd @ v))


def test_jacobian_of_a_scalar_output_and_grad_mode_off():
    x = torch.randn(4, dtype=F64)
    with torch.no_grad():
        J = Jacobian(lambda x: (x**3).sum(), x)
        assert J.shape == (1, 4)
        _close(J.T @ torch.ones(1, dtype=F64), 3 * x**2)
        _close(J @ torch.ones(4, dtype=F64), (3 * x**2).sum().reshape(1))


class _OnceDifferentiableCube(torch.autograd.Function):
    """x³ whose backward cannot be differentiated (forces the forward-mode fallback)."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def test_jacobian_falls_back_to_forward_mode_without_double_backward():
    x = torch.randn(5, dtype=F64)
    J = Jacobian(lambda x: _OnceDifferentiableCube.apply(x) + x, x)
    ref = torch.diag(3 * x**2 + 1)
    V = torch.randn(5, 2, dtype=F64)
    _close(J @ V, ref @ V)
    _close(J.T @ V, ref.T @ V)


def test_hessian_falls_back_to_forward_over_reverse_without_double_backward():
    # without care the once-differentiable term's second derivative is silently dropped
    x = torch.randn(5, dtype=F64)
    H = Hessian(lambda x: _OnceDifferentiableCube.apply(x).sum() + (x**2).sum(), x)
    V = torch.randn(5, 2, dtype=F64)
    _close(H @ V, torch.diag(6 * x + 2) @ V)


def test_jacobian_to_rebuilds_at_the_moved_point():
    f, x = _flat_fn("cpu")
    x32 = x.float()
    J = Jacobian(lambda z: f(z.double()).to(z.dtype), x32)
    J64 = J.to(F64)
    assert J64.dtype == F64 and J64.shape == J.shape
    Jref = jacrev(lambda v: f(v.reshape(2, 3)))(x32.double().reshape(-1))
    _close(J64.to_dense(), Jref)
    f2, p = _mlp_fn("cpu")  # closes over float64 data: moving to float32 cannot rebuild
    with pytest.raises(ValueError, match="Could not rebuild Jacobian"):
        Jacobian(f2, p).to(torch.float32)


# ------------------------------------------------------------------ Hessian
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("act", [torch.tanh, torch.nn.functional.silu], ids=["tanh", "silu"])
def test_hessian_matches_torch_func(device, act):
    f, p = _mlp_fn(device, act)
    space = ParamSpace(p)
    y = torch.randn(5, 3, dtype=F64, device=device)

    def loss(q):
        return ((f(q) - y) ** 2).mean() + (q["W1"] ** 4).sum() * 0.01

    x0 = space.flatten(p)
    # reverse-over-reverse reference: torch.func.hessian (forward-over-reverse) fails on SiLU
    Href = jacrev(jacrev(_as_flat(loss, space)))(x0)
    for vectorize in (False, True):
        H = Hessian(loss, p, vectorize=vectorize)
        assert H.shape == Href.shape and linops.is_self_adjoint(H) and not linops.is_psd(H)
        V = torch.randn(space.numel, K, dtype=F64, device=device)
        _close(H @ V, Href @ V)
        _close(H @ V[:, 0], Href @ V[:, 0])
        _close(H.T @ V, Href.T @ V)
        _close(V.T @ H, V.T @ Href)
    _close(H.gradient, jacrev(_as_flat(loss, space))(x0))
    assert torch.allclose(H.value, loss(p))


def test_hessian_flat_input_matches_torch_func_hessian():
    f, x = _flat_fn("cpu")

    def loss(x):
        return (f(x) ** 2).sum()

    Href = hessian(lambda v: loss(v.reshape(2, 3)))(x.reshape(-1))
    _close(Hessian(loss, x).to_dense(), Href)


def test_hessian_of_a_linear_function_is_zero():
    x = torch.randn(3, dtype=F64)
    H = Hessian(lambda x: (2 * x).sum(), x)
    assert torch.equal(H @ torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------ GGN and FIM
def _linearized_loss_hessian(f, loss, x):
    """Ground truth: the Hessian of loss(f(x₀) + J(x₀)(x − x₀)) at x₀, by torch.func."""
    space = ParamSpace(x)
    x0 = space.flatten(x)
    fl = _as_flat(f, space)
    J0 = jacrev(fl)(x0)
    out0 = fl(x0)

    def lin_loss(v):
        return loss(out0 + (J0.reshape(-1, x0.numel()) @ (v - x0)).reshape(out0.shape))

    return hessian(lin_loss)(x0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_ggn_matches_hessian_of_linearized_loss(device):
    for _, f, x in _cases(device):
        target = torch.randn_like(f(x))

        def loss(z, target=target):
            return torch.nn.functional.softplus(z - target).sum() + (z**2).mean()

        Gref = _linearized_loss_hessian(f, loss, x)
        for vectorize in (False, True):
            G = GGN(f, loss, x, vectorize=vectorize)
            assert linops.is_psd(G) and linops.is_self_adjoint(G)
            V = torch.randn(G.shape[1], K, dtype=F64, device=device)
            _close(G @ V, Gref @ V)
            _close(G @ V[:, 1], Gref @ V[:, 1])
            _close(G.T @ V, Gref @ V)
            _close(V.T @ G, V.T @ Gref)
            _close(G.value, f(x))
            assert torch.allclose(G.loss_value, loss(f(x)))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_fim_equals_ggn_of_softmax_cross_entropy(device):
    f, p = _mlp_fn(device)  # logits (5 rows, 3 classes)
    labels = torch.tensor([0, 2, 1, 1, 0], device=device)

    def ce(z):
        return torch.nn.functional.cross_entropy(z, labels, reduction="sum")

    Fref = _linearized_loss_hessian(f, ce, p)
    F = FIM(f, p)
    assert linops.is_psd(F) and F.symbol == "F"
    _close(F.to_dense(), Fref)
    _close(GGN(f, ce, p).to_dense(), F.to_dense())
    # the network-level GGN of the same model and summed loss agrees too
    from torch import nn

    from linops.curvature import GGN as NetGGN

    X = torch.randn(5, 3, dtype=F64, device=device)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    model = model.to(device=device, dtype=F64)
    names = ["0.weight", "0.bias", "2.weight"]

    def logits(q):
        return torch.func.functional_call(model, dict(zip(names, q.values())), (X,))

    params = dict(model.named_parameters())
    _close(NetGGN(model, nn.CrossEntropyLoss(reduction="sum"), (X, labels)).to_dense(),
           FIM(logits, params).to_dense())


def test_fim_of_one_row_of_logits():
    W = torch.randn(3, 2, dtype=F64)
    x = torch.randn(2, dtype=F64)

    def logits(w):
        return w @ x

    Fref = _linearized_loss_hessian(logits, lambda z: torch.logsumexp(z, 0) - z[1], W)
    _close(FIM(logits, W).to_dense(), Fref)


# ------------------------------------------------------------------ bad input
def test_hessian_of_a_non_scalar_function_is_refused():
    with pytest.raises(ValueError, match=r"scalar function, but f\(x\) has shape \(3,\)"):
        Hessian(lambda x: x**2, torch.randn(3))


def test_inputs_that_do_not_affect_the_output_are_named():
    p = {"a": torch.randn(3), "unused": torch.randn(2)}
    for build in (
        lambda: Jacobian(lambda q: q["a"] * 2, p),
        lambda: Hessian(lambda q: (q["a"] ** 2).sum(), p),
        lambda: GGN(lambda q: q["a"] * 2, lambda z: (z**2).sum(), p),
        lambda: FIM(lambda q: q["a"][None], p),
    ):
        with pytest.raises(ValueError, match="'unused'"):
            build()
    with pytest.raises(ValueError, match="does not depend"):
        Jacobian(lambda x: torch.ones(2), torch.randn(3))


def test_bad_functions_and_points():
    with pytest.raises(TypeError, match="callable"):
        Jacobian(3, torch.randn(2))
    with pytest.raises(TypeError, match="real floating"):
        Jacobian(lambda x: x, torch.arange(3))
    with pytest.raises(TypeError, match="must return a tensor"):
        Jacobian(lambda x: [x], torch.randn(2))
    with pytest.raises(ValueError, match="dtype"):
        Jacobian(lambda x: x.double(), torch.randn(2))
    with pytest.raises(ValueError, match="must be a scalar"):
        GGN(lambda x: x * 2, lambda z: z**2, torch.randn(2))
    with pytest.raises(ValueError, match="scalar"):
        FIM(lambda x: x.sum(), torch.randn(2))
    J = Jacobian(lambda x: x * 2, torch.randn(3))
    with pytest.raises(ValueError, match="3 rows"):
        J @ torch.randn(4)


def test_vectorized_products_split_many_columns_into_chunks():
    from linops.autodiff._linearization import VMAP_CHUNK

    x = torch.randn(VMAP_CHUNK + 9, dtype=F64)

    def f(x):
        return torch.tanh(x) * x.sum()

    for vectorize in (True, False):
        _close(Jacobian(f, x, vectorize=vectorize).to_dense(), jacrev(f)(x))
        _close(Hessian(lambda x: f(x).sum(), x, vectorize=vectorize).to_dense(),
               hessian(lambda x: f(x).sum())(x))


def test_fim_and_ggn_lend_their_jacobian_without_a_new_pass():
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64)
    X = torch.randn(6, 4, dtype=torch.float64)
    calls = []

    def logits(w):
        calls.append(1)
        return torch.tanh(X @ w.T)

    ref = torch.func.jacrev(logits)(W).reshape(6 * 3, -1)
    for op in (linops.FIM(logits, W),
               linops.GGN(logits, lambda z: (z**2).sum(), W)):
        before = len(calls)
        J = op.jacobian
        assert len(calls) == before  # shares the operator's linearization
        torch.testing.assert_close(J.to_dense(), ref)
        u = torch.randn(J.shape[0], dtype=torch.float64)
        torch.testing.assert_close(J.T @ u, ref.T @ u)
        torch.testing.assert_close(J.value, op.value)
