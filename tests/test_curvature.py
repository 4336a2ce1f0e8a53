"""Network-level curvature operators (GGN, Hessian, empirical and Monte-Carlo Fisher)
against dense float64 ground truth from torch.func: every loss and reduction, all
parameters and a subset, one batch and the same data in several batches (with and without
cache), one and k vectors, transposes, CPU and CUDA; and the errors on bad input."""

import pytest
import torch
from _helpers import DEVICE_PARAMS
from torch import nn
from torch.func import functional_call, hessian, jacrev

import linops
from linops.curvature import GGN, EmpiricalFisher, Hessian, MCFisher
from linops.params import ParamSpace

F64 = torch.float64
K = 3
N = 12
SPLITS = (5, 3, 4)  # unequal batches, so a wrong weighting of the mean shows

LOSSES = {
    "ce-mean": (lambda: nn.CrossEntropyLoss(), 3, "index"),
    "ce-sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), 3, "index"),
    "mse-mean": (lambda: nn.MSELoss(), 2, "real"),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), 2, "real"),
    "bce-mean": (lambda: nn.BCEWithLogitsLoss(), 2, "prob"),
    "bce-sum": (lambda: nn.BCEWithLogitsLoss(reduction="sum"), 2, "prob"),
}
OPERATORS = {"ggn": GGN, "hessian": Hessian, "ef": EmpiricalFisher}


def _close(a, b, tol=1e-9):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


def _problem(loss_key, device, act=nn.Tanh, seed=0):
    make_loss, out_dim, kind = LOSSES[loss_key]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, out_dim)).to(device, F64)
    X, y = inputs_and_targets(kind, out_dim, g)
    return model, make_loss(), X.to(device), y.to(device)


def inputs_and_targets(kind, out_dim, g):
    """N inputs (N, 3) and targets of the loss's kind: class indices, reals or probabilities."""
    X = torch.randn(N, 3, generator=g, dtype=F64)
    if kind == "index":
        y = torch.randint(0, out_dim, (N,), generator=g)
    elif kind == "real":
        y = torch.randn(N, out_dim, generator=g, dtype=F64)
    else:
        y = torch.rand(N, out_dim, generator=g, dtype=F64)
    return X, y


def _batches(X, y, splits=SPLITS):
    return list(zip(torch.split(X, list(splits)), torch.split(y, list(splits))))


def _subset(model, which):
    named = dict(model.named_parameters())
    if which == "all":
        return None, named
    sub = {n: p for n, p in named.items() if n.startswith("2.")}  # the last layer
    return sub, sub


# ------------------------------------------------------------------ dense references
def _model_fn(model, space, X):
    return lambda theta: functional_call(model, space.unflatten(theta), (X,))


def ref_hessian(model, loss_fn, X, y, params):
    """∇² of the loss over the whole data, by reverse-over-reverse torch.func."""
    space = ParamSpace(params)
    f = _model_fn(model, space, X)
    theta = space.flatten({n: p.detach() for n, p in params.items()})
    return jacrev(jacrev(lambda t: loss_fn(f(t), y)))(theta)


def ref_ggn(model, loss_fn, X, y, params):
    """The Hessian of the loss of the model linearized at the parameters."""
    space = ParamSpace(params)
    f = _model_fn(model, space, X)
    theta0 = space.flatten({n: p.detach() for n, p in params.items()})
    out0 = f(theta0)
    J0 = jacrev(f)(theta0).reshape(-1, theta0.numel())

    def linearized_loss(t):
        return loss_fn(out0 + (J0 @ (t - theta0)).reshape(out0.shape), y)

    return hessian(linearized_loss)(theta0)


def _unreduced(loss_fn):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return nn.CrossEntropyLoss(reduction="none", ignore_index=loss_fn.ignore_index)
    return type(loss_fn)(reduction="none")


def ref_ef(model, loss_fn, X, y, params):
    """c Σ_n g_n g_nᵀ with per-sample gradients from torch.func and c = mean / sum."""
    space = ParamSpace(params)
    f = _model_fn(model, space, X)
    theta0 = space.flatten({n: p.detach() for n, p in params.items()})

    def per_sample(t):
        return _unreduced(loss_fn)(f(t), y).reshape(y.shape[0], -1).sum(1)

    G = jacrev(per_sample)(theta0)
    out0 = f(theta0)
    c = loss_fn(out0, y) / per_sample(theta0).sum()
    return c * G.T @ G


REFS = {"ggn": ref_ggn, "hessian": ref_hessian, "ef": ref_ef}


def _check(op, ref, device, tol=1e-9):
    ref = ref.detach()
    n = ref.shape[0]
    assert op.shape == (n, n) and op.dtype == ref.dtype and op.device.type == device
    V = torch.randn(n, K, dtype=ref.dtype, device=device)
    _close(op @ V[:, 0], ref @ V[:, 0], tol)
    assert not (op @ V).requires_grad  # products carry no graph
    _close(op @ V, ref @ V, tol)
    _close(op.T @ V, ref.T @ V, tol)
    _close(V.T @ op, V.T @ ref, tol)


# ------------------------------------------------------------------ the grid
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("which", ["all", "subset"])
@pytest.mark.parametrize("loss_key", list(LOSSES))
@pytest.mark.parametrize("op_key", list(OPERATORS))
def test_operator_matches_dense_reference(op_key, loss_key, which, device):
    model, loss_fn, X, y = _problem(loss_key, device)
    params, ref_params = _subset(model, which)
    ref = REFS[op_key](model, loss_fn, X, y, ref_params)
    Op = OPERATORS[op_key]
    one = Op(model, loss_fn, (X, y), params)
    several = Op(model, loss_fn, _batches(X, y), params)
    cached = Op(model, loss_fn, _batches(X, y), params, cache=True)
    for op in (one, several, cached):
        _check(op, ref, device)
    assert one.cached and cached.cached and not several.cached
    names = list(ref_params)
    assert one.param_space.names == tuple(names)
    if op_key == "hessian":
        assert linops.is_self_adjoint(one) and not linops.is_psd(one)
    else:
        assert linops.is_psd(one) and linops.is_self_adjoint(one)


@pytest.mark.parametrize("op_key", list(OPERATORS))
def test_vectorized_and_looped_k_products_agree(op_key):
    for loss_key in ("ce-mean", "mse-sum", "bce-mean"):
        model, loss_fn, X, y = _problem(loss_key, "cpu")
        ref = REFS[op_key](model, loss_fn, X, y, dict(model.named_parameters()))
        for data in ((X, y), _batches(X, y)):
            for vectorize in (False, True):
                op = OPERATORS[op_key](model, loss_fn, data, vectorize=vectorize)
                V = torch.randn(op.shape[1], 4, dtype=F64)
                _close(op @ V, ref @ V)


def test_silu_network_hessian_and_ggn():
    model, loss_fn, X, y = _problem("ce-mean", "cpu", act=nn.SiLU)
    params = dict(model.named_parameters())
    _check(Hessian(model, loss_fn, (X, y)), ref_hessian(model, loss_fn, X, y, params), "cpu")
    _check(GGN(model, loss_fn, (X, y)), ref_ggn(model, loss_fn, X, y, params), "cpu")


ACTIVATIONS = [
    nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Hardswish,
    nn.LeakyReLU, nn.Sigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardtanh,
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=[a.__name__ for a in ACTIVATIONS])
def test_every_activation(act):
    model, loss_fn, X, y = _problem("ce-sum", "cpu", act=act)
    params = dict(model.named_parameters())
    _check(Hessian(model, loss_fn, (X, y)), ref_hessian(model, loss_fn, X, y, params), "cpu")
    _check(GGN(model, loss_fn, (X, y)), ref_ggn(model, loss_fn, X, y, params), "cpu")


def test_activation_without_second_derivatives():
    # PyTorch has no second derivative of hardsigmoid (neither double backward nor forward
    # mode over its backward): the GGN needs none and falls back to forward mode for J v;
    # the Hessian says what is missing and what to use instead. (The autograd path: the MLP
    # fast path knows hardsigmoid's σ'' = 0, see test_curvature_mlp.py.)
    model, loss_fn, X, y = _problem("ce-mean", "cpu", act=nn.Hardsigmoid)
    G = GGN(model, loss_fn, (X, y), fast_path=False)
    _check(G, ref_ggn(model, loss_fn, X, y, dict(model.named_parameters())), "cpu")
    H = Hessian(model, loss_fn, (X, y), fast_path=False)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward.*Use the GGN"):
        H @ torch.ones(H.shape[1], dtype=F64)


def test_float32_operators_track_the_float64_reference():
    model, loss_fn, X, y = _problem("ce-mean", "cpu")
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    model32 = model.float()
    G = GGN(model32, loss_fn, (X.float(), y))
    assert G.dtype == torch.float32
    V = torch.randn(G.shape[1], K)
    _close((G @ V).double(), ref @ V.double(), tol=1e-5)


def test_dataloader_with_progress_bar():
    model, loss_fn, X, y = _problem("mse-mean", "cpu")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    _check(GGN(model, loss_fn, loader, progress=True), ref, "cpu")


def test_products_run_under_no_grad():
    model, loss_fn, X, y = _problem("ce-mean", "cpu")
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    with torch.no_grad():
        G = GGN(model, loss_fn, _batches(X, y))
        _check(G, ref, "cpu")


# ------------------------------------------------------------------ cross entropy variants
def _spatial_problem():
    """Outputs (N, C=3, d=2) with class-index targets (N, d)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6), nn.Unflatten(1, (3, 2)))
    model = model.to(F64)
    X = torch.randn(N, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (N, 2), generator=g)
    return model, X, y


@pytest.mark.parametrize("op_key", list(OPERATORS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_extra_dimensions_and_ignore_index(op_key, reduction):
    model, X, y = _spatial_problem()
    y[1, 0] = -100  # ignored entries change what the mean divides by
    y[7, 1] = -100
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    params = dict(model.named_parameters())
    ref = REFS[op_key](model, loss_fn, X, y, params)
    _check(OPERATORS[op_key](model, loss_fn, (X, y)), ref, "cpu")
    _check(OPERATORS[op_key](model, loss_fn, _batches(X, y)), ref, "cpu")


@pytest.mark.parametrize("op_key", list(OPERATORS))
def test_cross_entropy_with_probability_targets(op_key):
    model, loss_fn, X, _ = _problem("ce-mean", "cpu")
    y = torch.softmax(torch.randn(N, 3, dtype=F64), dim=1) * 1.5  # not normalized on purpose
    ref = REFS[op_key](model, loss_fn, X, y, dict(model.named_parameters()))
    _check(OPERATORS[op_key](model, loss_fn, _batches(X, y)), ref, "cpu")


@pytest.mark.parametrize("op_key", ["ggn", "hessian"])
@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_weighted_cross_entropy_mean_divides_by_the_weight_sum(op_key, model_kind):
    """A weighted mean divides by Σ w_{y_n}, here not an integer (6.5 over the first
    batch, 13.5 in all): a count truncated to an int scaled every product wrongly."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    if model_kind == "mlp":  # (the MLP fast path)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
        X = torch.randn(N, 3, generator=g, dtype=F64)
    else:  # (the autograd path)
        model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(F64)
        X = torch.randn(N, 1, 6, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2, 0, 1, 1, 1])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    loss_fn = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    ref = REFS[op_key](model, loss_fn, X, y, dict(model.named_parameters()))
    assert float(w[y].sum()) == 13.5
    op = OPERATORS[op_key](model, loss_fn, (X, y))
    assert op.num_terms == 13.5
    _check(op, ref, "cpu")
    _check(OPERATORS[op_key](model, loss_fn, _batches(X, y)), ref, "cpu")


# ------------------------------------------------------------------ Monte-Carlo Fisher
@pytest.mark.parametrize("loss_key", ["ce-mean", "ce-sum", "mse-mean", "bce-sum"])
def test_mc_fisher_converges_to_the_ggn(loss_key):
    model, loss_fn, X, y = _problem(loss_key, "cpu")
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))

    def rel_err(S):
        F = MCFisher(model, loss_fn, (X, y), mc_samples=S, seed=0).to_dense()
        return float(torch.linalg.matrix_norm(F - ref) / torch.linalg.matrix_norm(ref))

    errs = [rel_err(S) for S in (1, 30, 3000)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.08, errs  # ~1/√S: fails if the draws' covariance is not the GGN's


def test_mc_fisher_with_extra_dimensions_and_ignored_targets_converges():
    model, X, y = _spatial_problem()
    y[1, 0] = y[4, 1] = -100
    loss_fn = nn.CrossEntropyLoss()
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    F = MCFisher(model, loss_fn, _batches(X, y), mc_samples=3000).to_dense()
    assert float(torch.linalg.matrix_norm(F - ref) / torch.linalg.matrix_norm(ref)) < 0.08


def test_mc_fisher_is_one_fixed_matrix():
    model, loss_fn, X, y = _problem("ce-mean", "cpu")
    batches = _batches(X, y)
    F = MCFisher(model, loss_fn, batches, mc_samples=2, seed=5)
    Fc = MCFisher(model, loss_fn, batches, mc_samples=2, seed=5, cache=True)
    V = torch.randn(F.shape[1], K, dtype=F64)
    first = F @ V
    _close(F @ V, first, tol=1e-13)  # same draws on every pass
    _close(Fc @ V, first, tol=1e-12)
    dense = F.to_dense()
    _close(dense, dense.T, tol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10
    other = MCFisher(model, loss_fn, batches, mc_samples=2, seed=6) @ V
    assert not torch.allclose(other, first)
    assert repr(F) == "MCFisher(CrossEntropyLoss, 31 params, mc_samples=2)"


def test_check_deterministic_catches_a_shuffling_loader():
    model, loss_fn, X, y = _problem("ce-mean", "cpu")

    class Shuffled:
        def __iter__(self):
            perm = torch.randperm(N)
            return iter(_batches(X[perm], y[perm]))

    assert MCFisher(model, loss_fn, _batches(X, y)).check_deterministic() < 1e-12
    assert GGN(model, loss_fn, Shuffled()).check_deterministic() < 1e-9  # order-free
    with pytest.raises(ValueError, match="not deterministic"):
        MCFisher(model, loss_fn, Shuffled()).check_deterministic()


# ------------------------------------------------------------------ metadata
def test_repr_and_param_space():
    model, loss_fn, X, y = _problem("ce-mean", "cpu")
    G = GGN(model, loss_fn, (X, y))
    assert repr(G) == "GGN(CrossEntropyLoss, 31 params)"
    assert repr(Hessian(model, nn.MSELoss(), (X, torch.randn(N, 3, dtype=F64)))) == (
        "Hessian(MSELoss, 31 params)"
    )
    assert repr(G + 1e-3 * linops.I_like(G)).startswith("GGN(CrossEntropyLoss, 31 params) +")
    d = G.param_space.unflatten(G @ torch.ones(31, dtype=F64))
    assert d["0.weight"].shape == (4, 3) and d["2.bias"].shape == (3,)
    assert G.num_terms == N
    with pytest.raises(ValueError, match="cannot be moved"):
        G.to(torch.float32)


def test_train_mode_is_refused_unless_allowed():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(F64)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.randint(0, 3, (N,))
    for m, name in ((model, "Dropout"), (bn, "BatchNorm1d")):
        with pytest.raises(ValueError, match=rf"training mode with 1 \({name}\).*model.eval\(\)"):
            GGN(m, nn.CrossEntropyLoss(), (X, y))
        GGN(m, nn.CrossEntropyLoss(), (X, y), allow_train_mode=True)
        m.eval()
        GGN(m, nn.CrossEntropyLoss(), (X, y))


# ------------------------------------------------------------------ bad input
class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("Op", [GGN, Hessian, EmpiricalFisher, MCFisher])
def test_parameters_that_do_not_affect_the_output_are_named(Op):
    model = _WithUnusedLayer().to(F64)
    X, y = torch.randn(N, 3, dtype=F64), torch.randint(0, 3, (N,))
    with pytest.raises(ValueError, match="'unused.weight', 'unused.bias'"):
        Op(model, nn.CrossEntropyLoss(), (X, y))
    sub = {n: p for n, p in model.named_parameters() if n.startswith("used")}
    Op(model, nn.CrossEntropyLoss(), (X, y), sub)


def test_output_shape_that_does_not_fit_the_loss():
    X = torch.randn(N, 3, dtype=F64)
    one = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).to(F64)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss needs model outputs of shape \(N, C\)"):
        GGN(one, nn.CrossEntropyLoss(), (X, torch.randint(0, 2, (N,))))
    model = nn.Linear(3, 2).to(F64)
    with pytest.raises(ValueError, match=r"output has shape \(12, 2\) but the targets have "
                                         r"shape \(12,\)"):
        GGN(model, nn.MSELoss(), (X, torch.randn(N, dtype=F64)))
    with pytest.raises(ValueError, match=r"class-index targets of shape \(12,\)"):
        GGN(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 2, (N, 2))))


def test_targets_of_the_wrong_dtype():
    X = torch.randn(N, 3, dtype=F64)
    model = nn.Linear(3, 2).to(F64)
    with pytest.raises(ValueError, match=r"class probabilities.*y.long\(\)"):
        GGN(model, nn.CrossEntropyLoss(), (X, torch.randint(0, 2, (N,)).to(F64)))
    with pytest.raises(TypeError, match=r"MSELoss needs floating-point targets.*int64"):
        GGN(model, nn.MSELoss(), (X, torch.randint(0, 2, (N, 2))))
    with pytest.raises(TypeError, match=r"BCEWithLogitsLoss targets have dtype torch.float32"):
        GGN(model, nn.BCEWithLogitsLoss(), (X, torch.rand(N, 2)))
    with pytest.raises(TypeError, match="integer class indices"):
        GGN(model, nn.CrossEntropyLoss(), (X, torch.ones(N, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        EmpiricalFisher(model, nn.CrossEntropyLoss(), (X, torch.full((N,), 5)))


def test_empty_or_malformed_data():
    model = nn.Linear(3, 2).to(F64)
    loss = nn.MSELoss()
    with pytest.raises(ValueError, match="empty"):
        GGN(model, loss, [])
    empty_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)), batch_size=4
    )
    with pytest.raises(ValueError, match="empty"):
        GGN(model, loss, empty_loader)

    class NoBatches:
        def __iter__(self):
            return iter(())

    G = GGN(model, loss, NoBatches())  # unknown length: found out at the first pass
    with pytest.raises(ValueError, match="gave no batch"):
        G @ torch.ones(8, dtype=F64)
    with pytest.raises(TypeError, match="one-shot iterator"):
        GGN(model, loss, ((torch.randn(2, 3), torch.randn(2, 2)) for _ in range(2)))
    with pytest.raises(TypeError, match="one batch"):
        GGN(model, loss, torch.randn(4, 3))
    with pytest.raises(ValueError, match="Batch 0 is empty"):
        GGN(model, loss, (torch.zeros(0, 3, dtype=F64), torch.zeros(0, 2, dtype=F64)))
    with pytest.raises(TypeError, match="pair"):
        GGN(model, loss, [(torch.randn(2, 3),)], cache=True)


def test_unsupported_losses_and_settings():
    model = nn.Linear(3, 2).to(F64)
    data = (torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,)))
    with pytest.raises(TypeError, match="Unsupported loss L1Loss"):
        GGN(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match="reduction='none'"):
        GGN(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="one weight per class"):
        GGN(model, nn.CrossEntropyLoss(weight=torch.ones(7, dtype=F64)), data)

    class Doubled(nn.CrossEntropyLoss):
        def forward(self, a, b):
            return 2 * super().forward(a, b)

    with pytest.raises(TypeError, match="overrides forward.*plain nn.CrossEntropyLoss"):
        GGN(model, Doubled(), data)
    with pytest.raises(ValueError, match=r"not parameters of the model.*'weight', 'bias'"):
        GGN(model, nn.CrossEntropyLoss(), data, params={"w": model.weight})
    with pytest.raises(ValueError, match="mc_samples"):
        MCFisher(model, nn.CrossEntropyLoss(), data, mc_samples=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GGN(lambda x: x, nn.CrossEntropyLoss(), data)
