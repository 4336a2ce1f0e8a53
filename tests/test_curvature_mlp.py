"""The MLP fast path of the network-level curvature operators (``linops/curvature/_mlp.py``)
against the autograd path and dense float64 ground truth from torch.func: activations, with
and without bias, parameter subsets, every loss and reduction, one and k columns, several
batches (cached or not), the ``loss`` and ``gradient`` attributes, which models qualify, and
the errors of ``fast_path=True``."""

import copy

import pytest
import torch
from _helpers import DEVICE_PARAMS
from test_curvature import (
    LOSSES,
    N,
    _batches,
    inputs_and_targets,
    ref_ef,
    ref_ggn,
    ref_hessian,
)
from torch import nn
from torch.func import functional_call, grad

import linops
from linops.curvature import GGN, EmpiricalFisher, Hessian, MCFisher, _mlp
from linops.params import ParamSpace

F64 = torch.float64
K = 3
OPERATORS = {"ggn": GGN, "hessian": Hessian, "ef": EmpiricalFisher}
REFS = {"ggn": ref_ggn, "hessian": ref_hessian, "ef": ref_ef}


def _close(a, b, tol=1e-9):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


def _mlp_problem(loss_key, device="cpu", act=nn.SiLU, bias=True, seed=0, nested=True):
    """A three-layer MLP 3 → 5 → 4 → C (nested Sequentials: names like '1.0.weight')."""
    make_loss, out_dim, kind = LOSSES[loss_key]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inner = nn.Sequential(nn.Linear(5, 4, bias=bias), act())
    if not nested:
        inner = nn.Sequential(*inner)
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), act(), inner,
                          nn.Linear(4, out_dim, bias=bias))
    model = model.to(device, F64)
    X, y = inputs_and_targets(kind, out_dim, g)
    return model, make_loss(), X.to(device), y.to(device)


SUBSETS = {
    "all": lambda n: True,
    "first": lambda n: n.startswith("0."),  # no input tangent, no input gradient
    "middle-weight": lambda n: n == "2.0.weight",  # a weight alone, between two layers
    "last-bias": lambda n: n == "3.bias",
}


def _params(model, which):
    named = dict(model.named_parameters())
    sub = {n: p for n, p in named.items() if SUBSETS[which](n)}
    return (None if which == "all" else sub), sub


def _check(op, ref, device, tol=1e-9):
    ref = ref.detach()
    n = ref.shape[0]
    assert op.shape == (n, n) and op.dtype == ref.dtype and op.device.type == device
    V = torch.randn(n, K, dtype=ref.dtype, device=device)
    _close(op @ V[:, 0], ref @ V[:, 0], tol)  # k = 1
    _close(op @ V, ref @ V, tol)  # k > 1
    _close(V.T @ op, V.T @ ref, tol)
    assert not (op @ V.clone().requires_grad_(True)).requires_grad  # no graph


def _ref_loss_and_gradient(model, loss_fn, X, y, params):
    space = ParamSpace(params)
    theta = space.flatten({n: p.detach() for n, p in params.items()})

    def loss_of(t):
        return loss_fn(functional_call(model, space.unflatten(t), (X,)), y)

    return loss_of(theta).detach(), grad(loss_of)(theta).detach()


# ------------------------------------------------------------------ the grid
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("which", list(SUBSETS))
@pytest.mark.parametrize("loss_key", list(LOSSES))
@pytest.mark.parametrize("op_key", list(OPERATORS))
def test_fast_path_matches_dense_reference(op_key, loss_key, which, device):
    model, loss_fn, X, y = _mlp_problem(loss_key, device)
    params, ref_params = _params(model, which)
    ref = REFS[op_key](model, loss_fn, X, y, ref_params)
    Op = OPERATORS[op_key]
    one = Op(model, loss_fn, (X, y), params)
    several = Op(model, loss_fn, _batches(X, y), params)
    cached = Op(model, loss_fn, _batches(X, y), params, cache=True)
    auto = Op(model, loss_fn, (X, y), params, fast_path=False)
    assert one.fast_path and several.fast_path and cached.fast_path and not auto.fast_path
    for op in (one, several, cached, auto):
        _check(op, ref, device)
    V = torch.randn(ref.shape[0], K, dtype=F64, device=device)
    _close(one @ V, auto @ V, 1e-11)  # the two paths agree to rounding
    assert one.param_space.names == tuple(ref_params)
    assert linops.is_self_adjoint(one) and linops.is_psd(one) == (op_key != "hessian")


ACTIVATIONS = [nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus,
               nn.ELU, nn.Identity, nn.Mish, nn.Hardtanh]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=[a.__name__ for a in ACTIVATIONS])
@pytest.mark.parametrize("op_key", ["ggn", "hessian"])
def test_every_activation_with_and_without_bias(op_key, act, bias):
    model, loss_fn, X, y = _mlp_problem("ce-sum", act=act, bias=bias, seed=1)
    X = 2 * X  # reach both sides of the kinks and the saturated parts
    params = dict(model.named_parameters())
    Op = OPERATORS[op_key]
    op = Op(model, loss_fn, _batches(X, y), cache=True)
    assert op.fast_path
    _check(op, REFS[op_key](model, loss_fn, X, y, params), "cpu")
    V = torch.randn(op.shape[1], K, dtype=F64)
    _close(op @ V, Op(model, loss_fn, _batches(X, y), fast_path=False) @ V, 1e-11)


def test_leaky_relu_slope_and_gelu_tanh_approximation():
    for act in (lambda: nn.LeakyReLU(0.3), lambda: nn.GELU("tanh"),
                lambda: nn.Softplus(beta=2.0, threshold=1.0)):
        model, loss_fn, X, y = _mlp_problem("mse-mean", act=act, seed=2)
        params = dict(model.named_parameters())
        _check(Hessian(model, loss_fn, (X, y)), ref_hessian(model, loss_fn, X, y, params), "cpu")
        _check(GGN(model, loss_fn, (X, y)), ref_ggn(model, loss_fn, X, y, params), "cpu")


def test_activation_after_the_last_layer_and_before_the_first():
    model = nn.Sequential(nn.Tanh(), nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2),
                          nn.Tanh(), nn.Sigmoid()).to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.rand(N, 2, dtype=F64)
    loss_fn = nn.MSELoss()
    params = dict(model.named_parameters())
    for op_key in ("ggn", "hessian", "ef"):
        op = OPERATORS[op_key](model, loss_fn, (X, y))
        assert op.fast_path
        _check(op, REFS[op_key](model, loss_fn, X, y, params), "cpu")


def test_flatten_identity_and_inactive_dropout_and_a_single_layer():
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Dropout(0.5), nn.Identity(),
                          nn.GELU(), nn.Linear(4, 3)).to(F64).eval()
    X, y = torch.randn(N, 2, 3, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    H = Hessian(model, loss_fn, (X, y), fast_path=True)
    _check(H, ref_hessian(model, loss_fn, X, y, params), "cpu")
    single = nn.Linear(3, 2).to(F64)
    X1 = torch.randn(N, 3, generator=g, dtype=F64)
    G = GGN(single, loss_fn, (X1, y % 2), fast_path=True)
    _check(G, ref_ggn(single, loss_fn, X1, y % 2, dict(single.named_parameters())), "cpu")


def test_params_in_any_order_and_at_other_values():
    model, loss_fn, X, y = _mlp_problem("ce-mean")
    named = dict(model.named_parameters())
    params = {n: named[n].detach() + 0.1 for n in ("3.weight", "0.bias", "2.0.weight")}
    for Op in (GGN, Hessian, EmpiricalFisher):
        fast = Op(model, loss_fn, (X, y), params)
        auto = Op(model, loss_fn, (X, y), params, fast_path=False)
        assert fast.fast_path and fast.param_space.names == tuple(params)
        V = torch.randn(fast.shape[1], K, dtype=F64)
        _close(fast @ V, auto @ V, 1e-11)
        _close(fast.gradient, auto.gradient, 1e-11)
        _close(fast.loss, auto.loss, 1e-12)


def test_in_place_activations_leave_the_input_alone():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 4), nn.ELU(inplace=True),
                          nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.randn(N, 2, dtype=F64)
    X0 = X.clone()
    ops = {"ggn": GGN(model, nn.MSELoss(), (X, y)), "hessian": Hessian(model, nn.MSELoss(),
                                                                        (X, y))}
    assert torch.equal(X, X0)  # the autograd path would have applied relu_ to X
    for m in model:  # the references (torch.func) need out-of-place activations
        if hasattr(m, "inplace"):
            m.inplace = False
    for key, op in ops.items():
        assert op.fast_path
        ref = REFS[key](model, nn.MSELoss(), X, y, dict(model.named_parameters()))
        _check(op, ref, "cpu")


def test_mc_fisher_fast_path_matches_autograd():
    for loss_key in ("ce-mean", "mse-sum", "bce-mean"):
        model, loss_fn, X, y = _mlp_problem(loss_key)
        fast = MCFisher(model, loss_fn, _batches(X, y), mc_samples=3, seed=1, cache=True)
        auto = MCFisher(model, loss_fn, _batches(X, y), mc_samples=3, seed=1, fast_path=False)
        assert fast.fast_path and not auto.fast_path
        dense = fast.to_dense()
        _close(dense, auto.to_dense(), 1e-11)
        _close(dense, dense.T, 1e-12)
        assert torch.linalg.eigvalsh(dense).min() > -1e-10


def test_many_columns_are_split_into_chunks(monkeypatch):
    model, loss_fn, X, y = _mlp_problem("ce-mean")
    params = dict(model.named_parameters())
    H = Hessian(model, loss_fn, (X, y))
    G = GGN(model, loss_fn, (X, y))
    monkeypatch.setattr(_mlp, "COLUMN_BUDGET", 2 * N * 5)  # two columns per chunk
    assert len(_mlp._chunks(G._states[0]["mlp"], 7)) == 4
    _close(H.to_dense(), ref_hessian(model, loss_fn, X, y, params))
    _close(G.to_dense(), ref_ggn(model, loss_fn, X, y, params))


def test_float32_fast_path_tracks_the_float64_reference():
    model, loss_fn, X, y = _mlp_problem("ce-mean")
    params = dict(model.named_parameters())
    refs = {"ggn": ref_ggn(model, loss_fn, X, y, params),
            "hessian": ref_hessian(model, loss_fn, X, y, params)}
    model32 = model.float()
    V = torch.randn(refs["ggn"].shape[0], K)
    for key, ref in refs.items():
        op = OPERATORS[key](model32, loss_fn, (X.float(), y))
        assert op.fast_path and op.dtype == torch.float32
        _close((op @ V).double(), ref @ V.double(), tol=1e-5)
        assert op.gradient.dtype == torch.float32 and op.loss.dtype == torch.float32


# ------------------------------------------------------------------ loss and gradient
@pytest.mark.parametrize("loss_key", list(LOSSES))
@pytest.mark.parametrize("Op", [GGN, Hessian, EmpiricalFisher, MCFisher])
def test_loss_and_gradient_attributes(Op, loss_key):
    model, loss_fn, X, y = _mlp_problem(loss_key)
    for which in ("all", "first", "middle-weight"):
        params, ref_params = _params(model, which)
        ref_loss, ref_grad = _ref_loss_and_gradient(model, loss_fn, X, y, ref_params)
        ops = [Op(model, loss_fn, (X, y), params),
               Op(model, loss_fn, (X, y), params, fast_path=False),
               Op(model, loss_fn, _batches(X, y), params, cache=True),
               Op(model, loss_fn, _batches(X, y), params, cache=True, fast_path=False),
               Op(model, loss_fn, _batches(X, y), params)]  # not cached: a pass
        for op in ops:
            assert op.loss.shape == () and op.gradient.shape == ref_grad.shape
            _close(op.loss, ref_loss, 1e-12)
            _close(op.gradient, ref_grad, 1e-11)
            assert not op.gradient.requires_grad and not op.loss.requires_grad
            assert op.gradient is op.gradient  # computed once


def test_loss_and_gradient_of_cross_entropy_with_ignored_targets():
    model, loss_fn, X, y = _mlp_problem("ce-mean")
    y[2] = y[9] = -100
    ref_loss, ref_grad = _ref_loss_and_gradient(model, loss_fn, X, y,
                                                dict(model.named_parameters()))
    params = dict(model.named_parameters())
    for op in (GGN(model, loss_fn, _batches(X, y), cache=True), Hessian(model, loss_fn, (X, y)),
               GGN(model, loss_fn, _batches(X, y)), EmpiricalFisher(model, loss_fn, (X, y))):
        assert op.fast_path and op.num_terms in (None, N - 2)
        _close(op.loss, ref_loss, 1e-12)
        _close(op.gradient, ref_grad, 1e-11)
        key = {GGN: "ggn", Hessian: "hessian", EmpiricalFisher: "ef"}[type(op)]
        _check(op, REFS[key](model, loss_fn, X, y, params), "cpu")


def test_loss_and_gradient_of_a_model_without_fast_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6),
                          nn.Unflatten(1, (3, 2))).to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.randint(0, 3, (N, 2))
    loss_fn = nn.CrossEntropyLoss()
    ref_loss, ref_grad = _ref_loss_and_gradient(model, loss_fn, X, y,
                                                dict(model.named_parameters()))
    for Op in (GGN, Hessian, EmpiricalFisher):
        op = Op(model, loss_fn, (X, y))
        assert not op.fast_path
        _close(op.loss, ref_loss, 1e-12)
        _close(op.gradient, ref_grad, 1e-11)


# ------------------------------------------------------------------ the autograd path
@pytest.mark.parametrize("op_key", list(OPERATORS))
def test_autograd_path_vectorized_and_looped(op_key):
    # the MLPs of test_curvature.py now take the fast path: this keeps the autograd one
    # (vmapped and looped k-column products, one and several batches) under test
    for loss_key in ("ce-mean", "mse-sum", "bce-mean"):
        model, loss_fn, X, y = _mlp_problem(loss_key)
        ref = REFS[op_key](model, loss_fn, X, y, dict(model.named_parameters()))
        for data in ((X, y), _batches(X, y)):
            for vectorize in (False, True):
                op = OPERATORS[op_key](model, loss_fn, data, vectorize=vectorize,
                                       fast_path=False)
                assert not op.fast_path
                V = torch.randn(op.shape[1], 4, dtype=F64)
                _close(op @ V, ref @ V)


class _ClampHardsigmoid(nn.Module):
    """Hardsigmoid written with ops that have second derivatives: the same function."""

    def forward(self, x):
        return torch.clamp(x + 3, 0, 6) / 6


def test_activation_without_second_derivatives_in_pytorch():
    # PyTorch has σ' of hardsigmoid but no σ'' rule. The fast path knows σ'' = 0 (closed
    # form), so both the GGN and the Hessian work on it; the autograd Hessian raises at the
    # product, saying to use the GGN; the autograd GGN falls back to forward mode.
    model, loss_fn, X, y = _mlp_problem("ce-mean", act=nn.Hardsigmoid)
    twin = copy.deepcopy(model)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _ClampHardsigmoid())
    params = dict(twin.named_parameters())
    G = GGN(model, loss_fn, (X, y))
    assert G.fast_path
    _check(G, ref_ggn(twin, loss_fn, X, y, params), "cpu")
    # PyTorch's hardsigmoid_backward multiplies by 1/6 as a float32 constant (0.16666667163),
    # 3e-8 relative even in float64, so the autograd path matches to that level only
    _check(GGN(model, loss_fn, (X, y), fast_path=False), ref_ggn(twin, loss_fn, X, y, params),
           "cpu", tol=1e-7)
    H = Hessian(model, loss_fn, (X, y))
    assert H.fast_path
    _check(H, ref_hessian(twin, loss_fn, X, y, params), "cpu")
    H_autograd = Hessian(model, loss_fn, (X, y), fast_path=False)
    with pytest.raises(RuntimeError, match="Use the GGN"):
        H_autograd @ torch.ones(H_autograd.shape[1], dtype=F64)


# ------------------------------------------------------------------ what qualifies
class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def _non_mlps():
    shared = nn.Linear(3, 3)
    hooked = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    hooked[1].register_forward_hook(lambda m, i, o: 2 * o)
    return {
        "custom module": (_Custom(), r"module 'model' \(_Custom\) is neither nn.Linear"),
        "softmax": (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1), nn.Linear(3, 2)),
                    r"module '1' \(Softmax\)"),
        "prelu": (nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 2)),
                  r"module '1' \(PReLU\)"),
        "shared weights": (nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(3, 2)),
                           "shares its parameters"),
        "hook": (hooked, "hooks"),
        "training dropout": (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2)),
                             "active"),
    }


@pytest.mark.parametrize("case", list(_non_mlps()))
def test_models_that_do_not_qualify_take_the_autograd_path(case):
    model, message = _non_mlps()[case]
    model = model.to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.randint(0, 2, (N,))
    loss_fn = nn.CrossEntropyLoss()
    kw = {"allow_train_mode": True} if case == "training dropout" else {}
    G = GGN(model, loss_fn, (X, y), **kw)
    assert not G.fast_path
    if case != "training dropout":
        _check(G, ref_ggn(model, loss_fn, X, y, dict(model.named_parameters())), "cpu")
    with pytest.raises(ValueError, match=message):
        GGN(model, loss_fn, (X, y), fast_path=True, **kw)


def test_inputs_that_do_not_fit_fall_back_batch_by_batch():
    # nn.Linear maps the last dimension: inputs (N, T, d) work through autograd only
    model, loss_fn, _, _ = _mlp_problem("mse-mean")
    X = torch.randn(4, 3, 3, dtype=F64)
    y = torch.randn(4, 3, 2, dtype=F64)
    params = dict(model.named_parameters())
    G = GGN(model, loss_fn, (X, y))
    assert G.fast_path  # the model qualifies; this batch goes through autograd
    _check(G, ref_ggn(model, loss_fn, X, y, params), "cpu")
    with pytest.raises(ValueError, match=r"fast_path=True, but the input has shape \(4, 3, 3\)"):
        GGN(model, loss_fn, (X, y), fast_path=True)
    with pytest.raises(TypeError, match="fast_path must be None, True or False"):
        GGN(model, loss_fn, (X, y), fast_path="yes")


def test_mlp_spec_records_the_chain():
    model, _, _, _ = _mlp_problem("ce-mean")
    names = ("2.0.weight", "3.bias")
    spec = _mlp.mlp_spec(model, names, F64, order=2)
    assert isinstance(spec, _mlp.MLPSpec)
    assert spec.start == 2 and spec.in_features == 3 and not spec.flatten_input
    assert [type(layer).__name__ for layer in spec.layers] == [
        "_Linear", "_Act", "_Linear", "_Act", "_Linear"]
    assert "dtype torch.float32" in _mlp.mlp_spec(model.float(), names, F64, order=1)
