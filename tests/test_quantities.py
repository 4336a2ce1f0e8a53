"""The layer-wise engine (``linops.curvature.quantities``, ``DiagGGN``, ``DiagHessian``,
``.diag()``) against float64 ground truth from torch.func (``_quantity_reference``)."""

from __future__ import annotations

import importlib

import pytest
import torch
from _quantity_reference import reference
from torch import nn

from linops import is_psd
from linops.curvature import (
    GGN,
    QUANTITY_NAMES,
    DiagGGN,
    DiagHessian,
    EmpiricalFisher,
    Hessian,
    MCFisher,
    quantities,
    supported_layers,
)

# the module (the package attribute ``quantities`` is the function)
quantities_module = importlib.import_module("linops.curvature.quantities")

F64 = torch.float64
N = 4
ALL_EXACT = ["grad_batch", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
             "diag_ggn_exact_batch", "sqrt_ggn_exact", "diag_h", "diag_h_batch"]
NO_H = [n for n in ALL_EXACT if not n.startswith("diag_h")]


# ----------------------------------------------------------------------------- models
class ResBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.Tanh()
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head((x + self.act(self.bn(self.c1(x)))).flatten(1))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.gn(self.ln(self.l1(x)))))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.a = nn.Sigmoid()
        self.h = nn.Linear(4, 3)

    def forward(self, x):
        return self.h(self.a(self.l(self.a(self.l(x)))))


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.emb(x)))).mean(1)


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        return self.l(x) * self.scale


class UsedOutside(nn.Module):  # l.weight also used outside its module's call
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.h = nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.l(x)) + nn.functional.linear(x, self.l.weight))


class Gated(nn.Module):  # a product of two branches with different parameters
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.s = nn.Sigmoid()

    def forward(self, x):
        return self.a(x) * self.s(self.b(x))


class SelfProduct(nn.Module):  # h hᵀ: a second-order term no activation holds
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        h = self.l(x)
        return (h.unsqueeze(2) @ h.unsqueeze(1)).flatten(1)


class EmbedBN(nn.Module):  # Embedding with padding_idx, BatchNorm1d (eval), LayerNorm (3-D)
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.ln(self.emb(x)).mean(1)
        return self.head(torch.tanh(self.bn(h)))


def _bn_model():
    m = ResBN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 1.5)
    return m


def _x(*shape):
    return lambda: torch.randn(N, *shape, dtype=F64)


def _cls(C=3):
    return lambda out_shape=None: torch.randint(0, C, (N,))


MLP = lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(),  # noqa: E731
                            nn.Linear(4, 3))

# (id, model builder, input builder, target builder, loss, names)
CASES = [
    ("mlp-ce", MLP, _x(4), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
    ("mlp-ce-weighted-smoothed-sum", MLP, _x(4), _cls(),
     nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=F64), label_smoothing=0.1,
                         reduction="sum"), ALL_EXACT),
    ("mlp-ce-ignore-index", MLP, _x(4), lambda: torch.tensor([0, -100, 2, 1]),
     nn.CrossEntropyLoss(), ALL_EXACT),
    ("mlp-mse", MLP, _x(4), lambda: torch.randn(N, 3, dtype=F64), nn.MSELoss(), ALL_EXACT),
    ("mlp-bce-weighted", MLP, _x(4), lambda: torch.rand(N, 3, dtype=F64).round(),
     nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 0.5, 2.0], dtype=F64),
                          pos_weight=torch.tensor([2.0, 0.3, 1.0], dtype=F64)), ALL_EXACT),
    ("cnn-relu-maxpool", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1),
                                               nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                               nn.Linear(12, 3)),
     _x(2, 8, 8), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
    ("conv1d-groups-dilation", lambda: nn.Sequential(
        nn.Conv1d(4, 6, 3, groups=2, dilation=2, padding=1), nn.SiLU(), nn.Flatten(),
        nn.Linear(30, 3)), _x(4, 7), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
    ("linear-on-sequences", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
     _x(6, 4), lambda: torch.randn(N, 6, 3, dtype=F64), nn.MSELoss(), ALL_EXACT),
    ("ce-spatial-outputs", lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)), _x(2, 5),
     lambda: torch.randint(0, 3, (N, 5)), nn.CrossEntropyLoss(), ALL_EXACT),
    ("residual-batchnorm-eval", _bn_model, _x(2, 4, 4), _cls(), nn.CrossEntropyLoss(),
     ALL_EXACT),
    ("embedding-padding-batchnorm1d-layernorm", EmbedBN,
     lambda: torch.tensor([[0, 1, 2], [3, 0, 5], [1, 1, 4], [0, 0, 2]]), _cls(),
     nn.CrossEntropyLoss(), NO_H),
    ("gated-branches", Gated, _x(4), lambda: torch.randn(N, 3, dtype=F64), nn.MSELoss(),
     ALL_EXACT),
    ("self-product", SelfProduct, _x(4), lambda: torch.randn(N, 4, dtype=F64), nn.MSELoss(),
     NO_H),
    ("layernorm-groupnorm", Norms, _x(4), _cls(), nn.CrossEntropyLoss(), NO_H),
    ("module-called-twice", CalledTwice, _x(4), _cls(), nn.CrossEntropyLoss(), NO_H),
    ("tied-embedding-head", TiedEmbedding, lambda: torch.randint(0, 7, (N, 5)),
     lambda: torch.randint(0, 7, (N,)), nn.CrossEntropyLoss(), NO_H),
    ("raw-parameter", RawParameter, _x(4), lambda: torch.randn(N, 3, dtype=F64), nn.MSELoss(),
     NO_H),
    ("parameter-used-outside-its-module", UsedOutside, _x(4), _cls(), nn.CrossEntropyLoss(),
     NO_H),
    ("convtranspose-conv3d", lambda: nn.Sequential(
        nn.ConvTranspose2d(2, 1, 3, stride=2), nn.Sigmoid(), nn.Unflatten(1, (1, 1)),
        nn.Conv3d(1, 2, (1, 2, 2)), nn.Flatten(), nn.Linear(2 * 36, 3)),
     _x(2, 3, 3), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
    # kernel rows of C_in/groups · k_w = 8 · 4 = 32 entries: the row-view unfold
    # (layers/conv.py: ``_row_pieces``) with padding, dilation, a width stride, groups
    ("conv2d-row-views", lambda: nn.Sequential(
        nn.Conv2d(16, 4, (3, 4), padding=(1, 2), dilation=(2, 1), stride=(1, 2), groups=2),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
     _x(16, 6, 7), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
    ("inplace-activations", lambda: nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.SiLU(inplace=True),
        nn.Linear(5, 3)), _x(4), _cls(), nn.CrossEntropyLoss(), ALL_EXACT),
]


def _flat(d, names, lead):
    return torch.cat([d[n].reshape(*lead, -1) for n in names], -1)


def check_against_reference(model, loss_fn, X, y, qnames, names=None):
    model = model.to(F64).eval()
    names = names or [n for n, _ in model.named_parameters()]
    space, g, G, H = reference(model, loss_fn, X, y, names)
    named = dict(model.named_parameters())
    q = quantities(model, loss_fn, (X, y), qnames, params={n: named[n] for n in names})
    tol = 1e-10 * max(1.0, float(G.abs().max()), float(H.abs().max()))

    def close(name, got, want):
        assert got.shape == want.shape, name
        err = float((got - want).abs().max())
        assert err <= tol, f"{name}: error {err:.3g}"

    n = X.shape[0]
    expected = {
        "grad_batch": lambda: (_flat(q["grad_batch"], names, (n,)), g),
        "batch_l2": lambda: (torch.stack([q["batch_l2"][p] for p in names], 1),
                             torch.stack([(b**2).sum(-1) for b in
                                          g.split(list(space.numels), -1)], 1)),
        "sum_grad_squared": lambda: (_flat(q["sum_grad_squared"], names, ()), (g**2).sum(0)),
        "variance": lambda: (_flat(q["variance"], names, ()),
                             (g**2).sum(0) / n - (g.sum(0) / n) ** 2),
        "diag_ggn_exact": lambda: (_flat(q["diag_ggn_exact"], names, ()),
                                   torch.diagonal(G.sum(0))),
        "diag_ggn_exact_batch": lambda: (_flat(q["diag_ggn_exact_batch"], names, (n,)),
                                         torch.diagonal(G, dim1=1, dim2=2)),
        "diag_h": lambda: (_flat(q["diag_h"], names, ()), torch.diagonal(H.sum(0))),
        "diag_h_batch": lambda: (_flat(q["diag_h_batch"], names, (n,)),
                                 torch.diagonal(H, dim1=1, dim2=2)),
    }
    for name in qnames:
        if name == "sqrt_ggn_exact":
            V = torch.cat([q[name][p].reshape(*q[name][p].shape[:2], -1) for p in names], -1)
            close(name, torch.einsum("mnp,mnq->npq", V, V), G)  # Σₘ V Vᵀ = Gₙ
        else:
            close(name, *expected[name]())
    return q


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_name_against_torch_func(case):
    _, build, xb, yb, loss_fn, qnames = case
    torch.manual_seed(0)
    model = build()
    check_against_reference(model, loss_fn, xb(), yb(), qnames)


CONV_CASES = [c for c in CASES if c[0] in ("residual-batchnorm-eval",
                                           "conv2d-row-views")]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_every_conv2d_through_row_views(case, monkeypatch):
    """Every Conv2d of the cases unfolded by kernel rows (the threshold lowered to 0)."""
    conv = importlib.import_module("linops.curvature.layers.conv")
    monkeypatch.setattr(conv, "_ROW_VIEW_MIN", 0)
    calls = []
    real = conv._row_pieces
    monkeypatch.setattr(conv, "_row_pieces", lambda m, x: calls.append(real(m, x)) or calls[-1])
    _, build, xb, yb, loss_fn, qnames = case
    torch.manual_seed(0)
    check_against_reference(build(), loss_fn, xb(), yb(), qnames)
    assert any(c is not None for c in calls)  # the row views were taken


def test_row_views_are_the_rows_of_the_full_unfold(monkeypatch):
    conv = importlib.import_module("linops.curvature.layers.conv")
    assert conv._row_pieces(nn.Conv2d(8, 4, 3, stride=2), torch.randn(2, 8, 7, 7)) is None
    assert conv._row_pieces(nn.Conv2d(2, 4, 3), torch.randn(2, 2, 7, 7)) is None  # 6 < 32
    monkeypatch.setattr(conv, "_ROW_VIEW_MIN", 0)
    torch.manual_seed(0)
    for kw in [dict(), dict(padding=(2, 1), dilation=(1, 3), stride=(1, 2)), dict(groups=4)]:
        m = nn.Conv2d(8, 4, (3, 5), **kw)
        x = torch.randn(3, 8, 9, 11)
        full = conv._unfold(m, x, m.groups)  # (N, G, C/G · kh · kw, L)
        rows = conv._row_pieces(m, x)
        assert [a for a, _ in rows] == [0, 1, 2]
        G, c = m.groups, 8 // m.groups
        want = full.view(3, G, c, 3, 5, -1)
        for a, U in rows:
            assert U.shape == (3, G, c * 5, full.shape[-1])
            assert torch.equal(U.reshape(3, G, c, 5, -1), want[:, :, :, a])


def test_parameter_subset():
    torch.manual_seed(1)
    model = MLP()
    q = check_against_reference(model, nn.CrossEntropyLoss(), _x(4)(), _cls()(), ALL_EXACT,
                                names=["0.bias", "2.weight"])
    assert set(q["grad_batch"]) == {"0.bias", "2.weight"}


def test_hessian_diagonal_refuses_what_it_cannot_do_exactly():
    torch.manual_seed(0)
    X, y = _x(4)(), _cls()()
    with pytest.raises(ValueError, match="graph holds .*Backward.*estimator='hutchinson'"):
        quantities(Norms().to(F64).eval(), nn.CrossEntropyLoss(), (X, y), ["diag_h"])
    with pytest.raises(ValueError, match="used once.*l.weight"):
        quantities(CalledTwice().to(F64), nn.CrossEntropyLoss(), (X, y), ["diag_h"])

    with pytest.raises(ValueError, match="multiplies two tensors that both depend on"):
        quantities(SelfProduct().to(F64), nn.MSELoss(), (X, torch.randn(N, 4, dtype=F64)),
                   ["diag_h"])

    class Functional(nn.Module):  # torch.tanh outside a module: no record, so refused
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x):
            return torch.tanh(self.l(x))

    with pytest.raises(ValueError, match="TanhBackward"):
        quantities(Functional().to(F64), nn.CrossEntropyLoss(), (X, y), ["diag_h_batch"])


def test_data_loader_of_uneven_batches_equals_one_batch():
    torch.manual_seed(2)
    model = MLP().to(F64).eval()
    X, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    y[3] = -100  # the mean divides by the 6 terms of the whole data set
    loss = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    whole = quantities(model, loss, (X, y), ALL_EXACT)
    parts = quantities(model, loss, loader, ALL_EXACT)
    for name in ALL_EXACT:
        for p in whole[name]:
            torch.testing.assert_close(parts[name][p], whole[name][p], rtol=1e-12, atol=1e-14)


def test_monte_carlo_names_are_reproducible_and_converge():
    torch.manual_seed(3)
    model = MLP().to(F64).eval()
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    names = ["diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc"]
    a = quantities(model, loss, (X, y), names, mc_samples=3, seed=7)
    b = quantities(model, loss, (X, y), names, mc_samples=3, seed=7)
    c = quantities(model, loss, (X, y), names, mc_samples=3, seed=8)
    for name in names:
        for p in a[name]:
            assert torch.equal(a[name][p], b[name][p])
        assert not all(torch.equal(a[name][p], c[name][p]) for p in a[name])
    assert a["sqrt_ggn_mc"]["0.weight"].shape == (3, 6, 5, 4)
    exact = _flat(quantities(model, loss, (X, y), ["diag_ggn_exact"])["diag_ggn_exact"],
                  list(a["diag_ggn_mc"]), ())
    errors = []
    for S in (10, 4000):
        mc = quantities(model, loss, (X, y), ["diag_ggn_mc"], mc_samples=S, seed=0)
        d = _flat(mc["diag_ggn_mc"], list(a["diag_ggn_mc"]), ())
        assert bool((d >= 0).all())
        errors.append(float((d - exact).norm() / exact.norm()))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 3, errors


def test_diagonal_operators_and_diag_of_curvature_operators():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    data = [(torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))),
            (torch.randn(3, 3, dtype=F64), torch.randint(0, 2, (3,)))]
    loss = nn.CrossEntropyLoss()
    for op in (GGN(model, loss, data), Hessian(model, loss, data),
               EmpiricalFisher(model, loss, data),
               MCFisher(model, loss, data, mc_samples=3, seed=1)):
        torch.testing.assert_close(op.diag(), op.to_dense().diagonal(), rtol=1e-12,
                                   atol=1e-14)
    G = GGN(model, loss, data)
    D = DiagGGN(model, loss, data)
    assert is_psd(D)
    torch.testing.assert_close(D.d, G.to_dense().diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(D.gradient, G.gradient, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(D.loss, G.loss)
    assert D.output is None  # several batches
    one = DiagGGN(model, loss, data[0], mc_samples=2, seed=0)
    F = MCFisher(model, loss, data[0], mc_samples=2, seed=0)
    torch.testing.assert_close(one.d, F.to_dense().diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one.output, model(data[0][0]).detach())
    H = DiagHessian(model, loss, data)
    assert not is_psd(H)
    torch.testing.assert_close(H.d, Hessian(model, loss, data).to_dense().diagonal(),
                               rtol=1e-12, atol=1e-14)


def test_hutchinson_hessian_diagonal_for_any_model():
    torch.manual_seed(5)
    model = Norms().to(F64).eval()
    X, y = _x(4)(), _cls()()
    exact = Hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense().diagonal()
    D = DiagHessian(model, nn.CrossEntropyLoss(), (X, y), estimator="hutchinson",
                    samples=400, seed=0)
    assert D.record["products"] == 400
    err = (D.d - exact).abs()
    assert bool((err <= 5 * D.record["stderr"] + 1e-12).all())
    assert float(D.record["stderr"].max()) > 0


def test_bad_input_is_refused_with_the_fix():
    model = MLP().to(F64)
    data = (_x(4)(), _cls()())
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="valid names are: grad_batch, batch_l2"):
        quantities(model, loss, data, ["grad_batch", "diag_gnn"])
    with pytest.raises(ValueError, match="mc_samples"):
        quantities(model, loss, data, ["diag_ggn_mc"], mc_samples=0)
    with pytest.raises(ValueError, match="reduction='none'"):
        quantities(model, nn.CrossEntropyLoss(reduction="none"), data, ["grad_batch"])
    with pytest.raises(ValueError, match="model.eval"):
        quantities(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).to(F64).train(), loss,
                   data, ["grad_batch"])
    with pytest.raises(ValueError, match="batch_first=True"):
        quantities(nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)).eval(),
                   nn.MSELoss(), (torch.randn(3, 2, 4), torch.randn(3, 2, 4)),
                   ["grad_batch"])
    with pytest.raises(ValueError, match="one output row per sample"):
        quantities(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0, 1), nn.Unflatten(0, (-1, 1))
                                 ).to(F64), nn.MSELoss(),
                   (_x(4)(), torch.randn(3 * N, 1, dtype=F64)), ["diag_ggn_exact"])


def test_per_sample_names_too_large_say_how_much(monkeypatch):
    monkeypatch.setattr(quantities_module, "_memory_limit", lambda device: 1000)
    model = MLP().to(F64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(40, 4, dtype=F64),
                                       torch.randint(0, 3, (40,))), batch_size=8)
    with pytest.raises(MemoryError, match=r"over 40 samples would take .* GiB"):
        quantities(model, nn.CrossEntropyLoss(), loader, ["grad_batch"])
    quantities(model, nn.CrossEntropyLoss(), loader, ["sum_grad_squared"])  # summed: fine


def test_readme_holds_the_generated_supported_layers_table():
    from pathlib import Path

    from linops.curvature.layers import supported_layers_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- supported-layers table: generated")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end of the supported")]
    assert block.strip() == supported_layers_table().strip(), (
        "README's supported-layers table is out of date: paste "
        "linops.curvature.layers.supported_layers_table() between its markers.")


def test_supported_layers_table_comes_from_the_registry():
    rows = dict(supported_layers())
    assert "closed form" in rows["nn.Linear"] and "closed form" in rows["nn.Conv2d"]
    assert any("torch.func" in how for module, how in rows.items()
               if module.startswith("any other module owning parameters"))
    assert set(QUANTITY_NAMES) >= {"grad_batch", "diag_h_batch", "sqrt_ggn_mc"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))])
def test_devices(device):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(
        device)
    X, y = torch.randn(5, 1, 4, 4, device=device), torch.randint(0, 3, (5,), device=device)
    q = quantities(model, nn.CrossEntropyLoss(), (X, y), ["grad_batch", "diag_ggn_mc"],
                   seed=0)
    assert q["grad_batch"]["0.weight"].device.type == device
    ref = quantities(model.cpu().double(), nn.CrossEntropyLoss(), (X.cpu().double(), y.cpu()),
                     ["grad_batch"])
    torch.testing.assert_close(q["grad_batch"]["3.bias"].cpu().double(),
                               ref["grad_batch"]["3.bias"], rtol=1e-4, atol=1e-6)


def test_non_finite_outputs_are_reported_not_sampled():
    """A diverged model (NaN parameters) raises a clear error in every pass of the engine,
    instead of torch's sampler complaining about its probabilities (MC names) or NaN
    quantities coming back silently."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    for names in (["diag_ggn_mc"], ["grad_batch"], ["kfac"]):
        with pytest.raises(FloatingPointError, match="NaN"):
            quantities(model, nn.CrossEntropyLoss(), (X, y), names, seed=0)
    from linops.curvature import BlockDiagCurvature

    with pytest.raises(FloatingPointError, match="NaN"):
        BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature="hessian")
    # an MSE target of inf: the loss gradient is not finite
    reg = nn.Sequential(nn.Linear(3, 2))
    Y = torch.randn(5, 2)
    Y[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="loss gradient"):
        quantities(reg, nn.MSELoss(), (X, Y), ["diag_ggn_exact"])


def test_masked_logits_of_minus_inf_are_fine():
    """Logits masked to -inf (invalid classes) have a finite loss and curvature: no alarm,
    and the values equal the model without the masked class."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    mask = torch.tensor([False, False, False, True])

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = lin

        def forward(self, x):
            return self.l(x).masked_fill(mask, float("-inf"))

    X, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 3, (6,))
    names = ["grad_batch", "diag_ggn_exact", "diag_h"]
    got = quantities(Masked(), nn.CrossEntropyLoss(), (X, y), names)
    for name in names:
        ref = torch.func.vmap(torch.func.grad(
            lambda w, b, x, t: nn.functional.cross_entropy(
                (x @ w.T + b)[:, :3], t)), in_dims=(None, None, 0, 0))(
            lin.weight.detach(), lin.bias.detach(), X[:, None], y[:, None]) \
            if name == "grad_batch" else None
        if ref is not None:
            torch.testing.assert_close(got[name]["l.weight"], ref / 6)
        assert torch.isfinite(got[name]["l.weight"]).all()
        assert torch.all(got[name]["l.weight"][..., 3, :] == 0)  # the masked class's row


def test_user_hooks_params_subsets_scalars_and_detached_results():
    """The engine's passes on the model's own parameters never change what they compute:
    a gradient hook of the user's (pruning, clipping) is not run by them; diag_h over a
    params= subset treats the other parameters as constants (a LayerNorm backbone stays
    allowed); a 0-dim parameter has its batch_l2; results carry no autograd graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))
    loss = nn.CrossEntropyLoss()
    plain = torch.autograd.grad(loss(model(X), y), list(model.parameters()))
    h = model[0].weight.register_hook(lambda g: g * 0)
    try:
        D = DiagGGN(model, loss, (X, y))
        torch.testing.assert_close(D.param_space.unflatten(D.gradient)["0.weight"], plain[0])
    finally:
        h.remove()
    head = {"3.weight": model[3].weight, "3.bias": model[3].bias}
    got = quantities(model, loss, (X, y), ["diag_h"], params=head)["diag_h"]
    w, b = model[3].weight.detach(), model[3].bias.detach()
    feats = model[:3](X).detach()

    def f(w, b):
        return loss(feats @ w.T + b, y)

    Hw = torch.autograd.functional.hessian(lambda w: f(w, b), w).reshape(w.numel(), -1)
    torch.testing.assert_close(got["3.weight"].reshape(-1), Hw.diagonal())

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.scale * self.l(x)

    m = Scaled().double()
    q = quantities(m, loss, (X, y), ["batch_l2", "grad_batch", "diag_ggn_exact"])
    torch.testing.assert_close(q["batch_l2"]["scale"], q["grad_batch"]["scale"] ** 2)
    for name in q:
        for t in q[name].values():
            assert not t.requires_grad, name


@pytest.mark.parametrize("vectorize", [False, True])
def test_batched_grad_reduces_each_column_as_it_comes(vectorize):
    from linops.autodiff._linearization import batched_grad

    torch.manual_seed(0)
    W = torch.randn(4, 3, dtype=F64, requires_grad=True)
    x = torch.randn(5, 3, dtype=F64)
    h = x @ W.T  # (5, 4)
    out = torch.tanh(h).sum(1)  # (5,)
    U = torch.randn(3, 5, dtype=F64)
    full = batched_grad([out], [h, W], [U], 3, vectorize)
    got = batched_grad([out], [h, W], [U], 3, vectorize, reduce=[lambda c: c.sum(0), None])
    torch.testing.assert_close(got[0], full[0].sum(1))
    torch.testing.assert_close(got[1], full[1])
    for m in range(3):  # against one autograd call per column
        want = torch.autograd.grad(out, h, U[m], retain_graph=True)[0]
        torch.testing.assert_close(full[0][m], want)
