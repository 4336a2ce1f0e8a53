"""``BlockDiagCurvature`` and ``block_product_callables`` (issue 8, HBP) against dense
float64 references.

References: the diagonal blocks of ``GGN(...).to_dense()`` and ``Hessian(...).to_dense()``
(both verified against ``torch.func``), and for the positive-curvature Hessian an
independent per-sample construction with ``torch.func`` on the network written out by
hand: ``Σₙ J_oᵀ ∇²ℓₙ J_o + Σ_a J_hᵀ diag(R̃) J_h`` with ``R = ∂ℓ/∂z ⊙ σ''(h)`` (σ'' in
closed form here, not the library's). With ``R̃ = R`` that construction gives the
Hessian's blocks, which validates it. BackPACK's HMP/GGNMP/PCHMP are compared where its
environment (``benchmarks/.envs/peers``) exists.
"""

import subprocess
import textwrap

import pytest
import torch
from _helpers import DEVICE_PARAMS, PEERS_PYTHON, backpack_missing
from torch import nn

from linops import is_psd, is_self_adjoint
from linops.curvature import GGN, Hessian
from linops.curvature.blocks import (
    CURVATURES,
    BlockDiagCurvature,
    block_product_callables,
)

F64 = torch.float64


def _net():
    """Linear-Sigmoid-Linear-Tanh-Linear, 3 → 4 → 3 → 2 (39 parameters), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Tanh(),
                         nn.Linear(3, 2)).to(F64)


def _data(N=6, d=3, C=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g, dtype=F64), torch.randint(0, C, (N,), generator=g)


def _mask(op):
    return torch.block_diag(*[torch.ones(b.shape, dtype=torch.bool) for b in op.blocks])


def _assert_close(a, b, what, rtol=1e-10):
    err = float((a - b).abs().max())
    scale = float(b.abs().max())
    assert err <= rtol * max(scale, 1e-300), f"{what}: max error {err:.3e} (max |ref| {scale:.3e})"


# ----------------------------------------------------------------- GGN and Hessian
@pytest.mark.parametrize("blocks", ["parameter", "layer"])
@pytest.mark.parametrize("curvature,reference", [("ggn", GGN), ("hessian", Hessian)])
def test_blocks_equal_diagonal_blocks_of_the_dense_matrix(curvature, reference, blocks):
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature, blocks=blocks)
    full = reference(model, loss_fn, (X, y)).to_dense()
    sizes = [b.shape[0] for b in op.blocks]
    assert sizes == ([12, 4, 12, 3, 6, 2] if blocks == "parameter" else [16, 15, 8])
    assert op.param_space.names == GGN(model, loss_fn, (X, y)).param_space.names
    dense = op.to_dense()  # 39 columns in one product (k batched)
    _assert_close(dense, full * _mask(op), f"{curvature} {blocks} blocks")
    # each block alone, and the off-diagonal blocks of the full matrix are not zero (the
    # comparison above is not trivially true)
    start = 0
    for b, n in zip(op.blocks, sizes):
        _assert_close(b.to_dense(), full[start:start + n, start:start + n], "block alone")
        start += n
    assert float((full * ~_mask(op)).abs().max()) > 1e-3


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.BCEWithLogitsLoss(reduction="sum")],
                         ids=["mse-mean", "bce-sum"])
def test_hessian_and_pch_blocks_with_other_losses(loss_fn):
    model = _net()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.rand(5, 2, generator=g, dtype=F64)
    full = Hessian(model, loss_fn, (X, y)).to_dense()
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian", blocks="layer")
    _assert_close(op.to_dense(), full * _mask(op), f"{loss_fn} Hessian blocks")
    pch_op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="pch-abs")
    pch, mask = pch_op.to_dense(), _mask(pch_op)
    ggn = GGN(model, loss_fn, (X, y)).to_dense()
    # |R| ≥ R and |R| ≥ 0: PCH − H and PCH − GGN are PSD (block-diagonal), and not zero
    for D in (pch - full * mask, pch - ggn * mask):
        eig = torch.linalg.eigvalsh(D)
        assert float(eig.min()) >= -1e-10 and float(eig.max()) > 1e-6


def test_hessian_blocks_differ_from_ggn_blocks_and_tags():
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    H = BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian")
    G = BlockDiagCurvature(model, loss_fn, (X, y), curvature="ggn")
    v = torch.randn(39, 2, dtype=F64)
    assert float((H @ v - G @ v).abs().max()) > 1e-4  # the residual terms are present
    assert is_self_adjoint(H) and not is_psd(H)
    for name in ("ggn", "pch-abs", "pch-clip"):
        op = BlockDiagCurvature(model, loss_fn, (X, y), curvature=name)
        assert is_psd(op) and all(is_psd(b) for b in op.blocks), name


def test_conv_batchnorm_residual_hessian_blocks():
    """Conv2d, eval BatchNorm, Tanh, max pooling, a residual addition: exact Hessian blocks."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)
            self.act = nn.Tanh()
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.bn(self.conv(x))
            z = self.act(h) + h  # residual
            return self.head(self.pool(z).flatten(1))

    model = Net().to(F64)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 1, 4, 4, generator=g, dtype=F64)
    y = torch.randn(3, 2, generator=g, dtype=F64)
    loss_fn = nn.MSELoss(reduction="sum")
    full = Hessian(model, loss_fn, (X, y)).to_dense()
    for blocks in ("parameter", "layer"):
        op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian", blocks=blocks)
        _assert_close(op.to_dense(), full * _mask(op), f"conv net {blocks}")


# ----------------------------------------------------------------- the PCH
def _sigma2(kind, h):
    if kind == "sigmoid":
        s = torch.sigmoid(h)
        return s * (1 - s) * (1 - 2 * s)
    t = torch.tanh(h)
    return -2 * t * (1 - t * t)


def _pch_reference(model, X, y, modify, backpack_residual=False):
    """The modified Hessian of the mean cross entropy of a Linear-Sigmoid-Linear-Tanh-Linear
    network, dense, built per sample with torch.func on the network written out by hand.

    ``backpack_residual``: the residual BackPACK 1.7's PCHMP uses, ``σ''(h) (∂L/∂z)²``
    with ``L`` the mean loss (its ``modified_residual_mat_prod`` multiplies
    ``hessian_diagonal``, which already holds ``σ'' ∂L/∂z``, by ``∂L/∂z`` once more),
    instead of ``σ''(h) ∂L/∂z``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unpack(theta):
        out, i = [], 0
        for s in shapes:
            n = s.numel()
            out.append(theta[i:i + n].reshape(s))
            i += n
        return out

    def layers(theta, x):
        W1, b1, W2, b2, W3, b3 = unpack(theta)
        h1 = W1 @ x + b1
        h2 = W2 @ torch.sigmoid(h1) + b2
        o = W3 @ torch.tanh(h2) + b3
        return h1, h2, o

    def ce(o, t):
        return torch.logsumexp(o, 0) - o[t]

    n_par = theta0.numel()
    C = torch.zeros(n_par, n_par, dtype=F64)
    W2, W3, b3 = unpack(theta0)[2], unpack(theta0)[4], unpack(theta0)[5]
    for x, t in zip(X, y):
        h1, h2, o = layers(theta0, x)
        J1, J2, Jo = torch.func.jacrev(layers)(theta0, x)
        Ho = torch.func.hessian(ce)(o, t)
        # ∂ℓ/∂z for z1 = sigmoid(h1) and z2 = tanh(h2)
        g_z2 = torch.func.grad(lambda z2, t_: ce(W3 @ z2 + b3, t_))(torch.tanh(h2), t)
        g_z1 = W2.T @ (g_z2 * (1 - torch.tanh(h2) ** 2))
        R1 = g_z1 * _sigma2("sigmoid", h1)
        R2 = g_z2 * _sigma2("tanh", h2)
        if backpack_residual:  # N · σ'' (g/N)², per sample before the division by N
            R1, R2 = R1 * g_z1 / X.shape[0], R2 * g_z2 / X.shape[0]
        if modify == "abs":
            R1, R2 = R1.abs(), R2.abs()
        elif modify == "clip":
            R1, R2 = R1.clamp_min(0), R2.clamp_min(0)
        C += Jo.T @ Ho @ Jo + J1.T @ (R1[:, None] * J1) + J2.T @ (R2[:, None] * J2)
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    return C / X.shape[0]


@pytest.mark.parametrize("curvature,modify", [("pch-abs", "abs"), ("pch-clip", "clip"),
                                              ("hessian", None)])
def test_pch_blocks_equal_the_dense_modified_hessian_and_are_psd(curvature, modify):
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    ref = _pch_reference(model, X, y, modify)
    if modify is None:  # the reference construction itself, against the true Hessian
        full = Hessian(model, loss_fn, (X, y)).to_dense()
        op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian")
        _assert_close(ref * _mask(op), full * _mask(op), "reference vs Hessian blocks")
    for blocks in ("parameter", "layer"):
        op = BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature, blocks=blocks)
        dense = op.to_dense()
        _assert_close(dense, ref * _mask(op), f"{curvature} {blocks}")
        if modify is not None:
            for b in op.blocks:
                eig = torch.linalg.eigvalsh(b.to_dense())
                assert float(eig.min()) >= -1e-12 * float(eig.abs().max()), b
    if modify is not None:  # the modification matters on this network
        H = Hessian(model, loss_fn, (X, y)).to_dense()
        assert float(((ref - H) * _mask(op)).abs().max()) > 1e-4
        assert float(torch.linalg.eigvalsh(H[:12, :12]).min()) < -1e-8  # Hessian block: indefinite


def test_single_linear_layer_all_four_coincide():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(F64)
    X, y = _data(N=7, d=5, C=3)
    loss_fn = nn.CrossEntropyLoss()
    ref = GGN(model, loss_fn, (X, y)).to_dense()
    ops = {c: BlockDiagCurvature(model, loss_fn, (X, y), curvature=c) for c in CURVATURES}
    for c, op in ops.items():
        _assert_close(op.to_dense(), ref * _mask(op), c)
    # and the Hessian of a linear model is its GGN
    _assert_close(Hessian(model, loss_fn, (X, y)).to_dense() * _mask(ops["ggn"]),
                  ref * _mask(ops["ggn"]), "Hessian = GGN")


# ----------------------------------------------------------------- data, batching
def test_data_loader_of_uneven_batches_equals_one_batch():
    model = _net()
    X, y = _data(N=7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(39, 3, dtype=F64)
    for curvature in ("pch-clip", "ggn"):
        one = BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature, blocks="layer")
        many = BlockDiagCurvature(model, loss_fn, loader, curvature=curvature, blocks="layer")
        cached = BlockDiagCurvature(model, loss_fn, loader, curvature=curvature,
                                    blocks="layer", cache=True)
        ref = one @ v
        _assert_close(many @ v, ref, f"{curvature} loader")
        _assert_close(cached @ v, ref, f"{curvature} cached loader")
        _assert_close(many.blocks[1] @ v[16:31], ref[16:31], "one block over the loader")
        _assert_close(many.gradient, one.gradient, "gradient")
        _assert_close(many.loss, one.loss, "loss")


def test_vectorized_and_looped_products_agree_and_vector_shape():
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(39, 4, dtype=F64)
    a = BlockDiagCurvature(model, loss_fn, (X, y), curvature="pch-abs", vectorize=True)
    b = BlockDiagCurvature(model, loss_fn, (X, y), curvature="pch-abs", vectorize=False)
    _assert_close(a @ v, b @ v, "vmapped vs loop")
    _assert_close(a @ v[:, 0], (a @ v)[:, 0], "vector vs matrix")


def test_block_product_callables_are_the_blocks():
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="pch-clip")
    fns = block_product_callables(model, loss_fn, (X, y), "pchmp_clip")
    assert list(fns) == list(op.param_space.names)
    for (name, f), block in zip(fns.items(), op.blocks):
        p = dict(model.named_parameters())[name]
        V = torch.randn(2, *p.shape, dtype=F64)
        got = f(V)
        assert got.shape == V.shape
        _assert_close(got.reshape(2, -1), (block @ V.reshape(2, -1).T).T, name)
    with pytest.raises(ValueError, match=r"shape \(V, 4, 3\)"):
        fns["0.weight"](torch.randn(2, 12, dtype=F64))


def test_parameter_subset_is_its_blocks():
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    sub = {n: p for n, p in model.named_parameters() if n.startswith("2.")}
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian", params=sub)
    full = Hessian(model, loss_fn, (X, y)).to_dense()
    _assert_close(op.to_dense(), full[16:31, 16:31] * _mask(op), "subset")


def test_diagonal_and_block_wise_newton_step():
    """diag() from the engine; inv(C + λI) @ g solves block by block (the HBP tutorial's
    CG-Newton step) and equals the dense solve."""
    import solvers
    from linops import I_like

    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    for curvature in ("ggn", "hessian"):
        op = BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature)
        _assert_close(op.diag(), op.to_dense().diagonal(), f"{curvature} diag", 1e-9)
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="pch-abs")
    with pytest.raises(NotImplementedError, match="solvers.diag"):
        op.diag()
    A = op + 0.1 * I_like(op)
    step = solvers.inv(A, alg=solvers.CG(tol=1e-12, max_iters=200)) @ op.gradient
    dense = op.to_dense() + 0.1 * torch.eye(39, dtype=F64)
    _assert_close(step, torch.linalg.solve(dense, op.gradient), "block-wise solve", 1e-8)


def test_ggn_of_a_model_without_double_backward_falls_back_to_forward_mode():
    """Hardsigmoid's backward has no derivative: the GGN blocks take forward mode (and
    equal a torch.func reference); the Hessian blocks refuse with the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).to(F64)
    X, y = _data()
    X = 3 * X  # some units on the flat parts
    loss_fn = nn.CrossEntropyLoss()
    op = BlockDiagCurvature(model, loss_fn, (X, y))
    assert "fwd" in op.engine._states[0]  # the route this test is about
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(params)
    J = torch.cat([J[n].reshape(12, -1) for n in params], 1)
    P = torch.func.functional_call(model, params, (X,)).softmax(1)
    Ho = torch.block_diag(*[torch.diag(p) - torch.outer(p, p) for p in P]) / 6
    _assert_close(op.to_dense(), (J.T @ Ho @ J) * _mask(op), "forward-mode GGN blocks")
    with pytest.raises(ValueError, match="curvature='ggn'"):
        BlockDiagCurvature(model, loss_fn, (X, y), curvature="hessian")


@pytest.mark.parametrize("device", [p for p in DEVICE_PARAMS if p.id == "cuda"])
def test_on_cuda_equals_cpu(device):
    model, (X, y) = _net(), _data()
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(39, 3, dtype=F64)
    for curvature in CURVATURES:
        cpu = BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature) @ v
        gpu = BlockDiagCurvature(model.to(device), loss_fn, (X.to(device), y.to(device)),
                                 curvature=curvature)
        assert gpu.device.type == "cuda" and gpu.engine.vectorize
        _assert_close((gpu @ v.to(device)).cpu(), cpu, f"cuda {curvature}")
        model.cpu()


# ----------------------------------------------------------------- bad input
def test_unknown_names_list_the_valid_ones():
    model, (X, y) = _net(), _data()
    with pytest.raises(ValueError, match="'ggn', 'hessian', 'pch-abs', 'pch-clip'"):
        BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature="pch")
    with pytest.raises(ValueError, match="'parameter', 'layer'"):
        BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), blocks="module")
    with pytest.raises(ValueError, match="hmp"):
        block_product_callables(model, nn.CrossEntropyLoss(), (X, y), "hessian_mp")
    named = dict(model.named_parameters())
    shuffled = {n: named[n] for n in ["0.weight", "2.weight", "0.bias", "2.bias", "4.weight",
                                      "4.bias"]}
    with pytest.raises(ValueError, match="named_parameters"):
        BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), blocks="layer",
                           params=shuffled)
    # per parameter, any order is a layout (the GGN's, for the same params)
    op = BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), params=shuffled)
    assert op.param_space.names == tuple(shuffled)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))  # a functional tanh: not a module


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(torch.sigmoid(self.a(x)))[:, :2]


class _Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.randn(3, 3))
        self.B = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return x @ self.A @ self.B


class _Gram(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return (h.unsqueeze(2) @ h.unsqueeze(1)).flatten(1)[:, :2]  # quadratic in a's params


@pytest.mark.parametrize("make,match", [
    (_Gram, "both depend on"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "LayerNorm"),
    (_Functional, "TanhBackward"),
    (_Tied, "several times"),
])
def test_unsupported_models_are_refused_and_the_ggn_takes_them(make, match):
    torch.manual_seed(0)
    model = make().to(F64)
    X, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    for curvature in ("hessian", "pch-abs"):
        with pytest.raises(ValueError, match=match) as info:
            BlockDiagCurvature(model, loss_fn, (X, y), curvature=curvature)
        assert "curvature='ggn'" in str(info.value)
    op = BlockDiagCurvature(model, loss_fn, (X, y), curvature="ggn")
    full = GGN(model, loss_fn, (X, y)).to_dense()
    _assert_close(op.to_dense(), full * _mask(op), "GGN blocks of an unsupported model")


def test_layer_block_of_a_non_affine_module_is_refused():
    torch.manual_seed(0)
    model = _Product().to(F64)
    X, y = _data()
    with pytest.raises(ValueError, match="blocks='parameter'"):
        BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature="hessian",
                           blocks="layer")
    # per parameter it is exact, and the GGN's layer block too
    op = BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature="hessian")
    full = Hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    _assert_close(op.to_dense(), full * _mask(op), "per-parameter blocks of x A B")
    G = BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), blocks="layer")
    _assert_close(G.to_dense(), GGN(model, nn.CrossEntropyLoss(), (X, y)).to_dense(),
                  "one layer block = the whole GGN")


# ----------------------------------------------------------------- BackPACK
_BACKPACK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from backpack import backpack, extend
    from backpack.extensions import GGNMP, HMP, PCHMP

    inp, out = sys.argv[1], sys.argv[2]
    saved = torch.load(inp, weights_only=False)
    results = {}
    for key, case in saved.items():
        layers = {"flatten": nn.Flatten, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
        mods = [nn.Linear(*a) if kind == "linear" else layers[kind]()
                for kind, a in case["arch"]]
        model = extend(nn.Sequential(*mods).double())
        model.load_state_dict(case["state"])
        loss_fn = extend(nn.CrossEntropyLoss())
        loss = loss_fn(model(case["X"]), case["y"])
        with backpack(HMP(), GGNMP(), PCHMP(savefield="pchmp_abs", modify="abs"),
                      PCHMP(savefield="pchmp_clip", modify="clip")):
            loss.backward()
        results[key] = {
            field: {n: getattr(p, field)(case["V"][n]).detach()
                    for n, p in model.named_parameters()}
            for field in ("hmp", "ggnmp", "pchmp_abs", "pchmp_clip")}
    torch.save(results, out)
""")


@pytest.fixture(scope="module")
def backpack_run(tmp_path_factory):
    """BackPACK's HMP, GGNMP and PCHMP (abs, clip) in one subprocess of its environment,
    on the issue's Sequential(Flatten(), Linear(784, 10)) (3 random V) and on a
    Linear-Sigmoid-Linear-Tanh-Linear MLP 6 → 5 → 4 → 3 (V = the identity: whole blocks)."""
    reason = backpack_missing()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("backpack")
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    layers = {"flatten": nn.Flatten, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    cases = {
        "linear": ([("flatten", ()), ("linear", (784, 10))],
                   torch.randn(4, 1, 28, 28, generator=g, dtype=F64),
                   torch.randint(0, 10, (4,), generator=g)),
        "mlp": ([("linear", (6, 5)), ("sigmoid", ()), ("linear", (5, 4)), ("tanh", ()),
                 ("linear", (4, 3))],
                torch.randn(5, 6, generator=g, dtype=F64),
                torch.randint(0, 3, (5,), generator=g)),
    }
    payload, models = {}, {}
    for key, (arch, X, y) in cases.items():
        model = nn.Sequential(*[nn.Linear(*a) if kind == "linear" else layers[kind]()
                                for kind, a in arch]).to(F64)
        if key == "linear":
            V = {n: torch.randn(3, *p.shape, generator=g, dtype=F64)
                 for n, p in model.named_parameters()}
        else:
            V = {n: torch.eye(p.numel(), dtype=F64).reshape(p.numel(), *p.shape)
                 for n, p in model.named_parameters()}
        payload[key] = {"arch": arch, "state": model.state_dict(), "X": X, "y": y, "V": V}
        models[key] = model
    inp, out, script = tmp / "in.pt", tmp / "out.pt", tmp / "hbp.py"
    torch.save(payload, inp)
    script.write_text(_BACKPACK_SCRIPT)
    proc = subprocess.run([str(PEERS_PYTHON), str(script), str(inp), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return payload, models, torch.load(out, weights_only=False)


@pytest.mark.slow
def test_equals_backpack_hmp_ggnmp_pchmp(backpack_run):
    payload, models, theirs = backpack_run
    for key, case in payload.items():
        # BackPACK's PCHMP squares the gradient in the residual (see the next test): on
        # the MLP only HMP and GGNMP are the same matrices
        compared = ("hmp", "ggnmp") if key == "mlp" else ("hmp", "ggnmp", "pchmp_abs",
                                                          "pchmp_clip")
        for name in compared:
            fns = block_product_callables(models[key], nn.CrossEntropyLoss(),
                                          (case["X"], case["y"]), name)
            for p, f in fns.items():
                _assert_close(f(case["V"][p]), theirs[key][name][p], f"{key} {name} {p}",
                              rtol=1e-9)
    a, b = theirs["mlp"]["hmp"]["0.weight"], theirs["mlp"]["ggnmp"]["0.weight"]
    assert float((a - b).abs().max()) > 1e-6  # the residual terms matter on the MLP


@pytest.mark.slow
def test_backpack_pchmp_squares_the_gradient_and_ours_follows_the_paper(backpack_run):
    """BackPACK 1.7.1's PCHMP differs from its paper: the residual it modifies is
    ``σ''(h) (∂L/∂z)²`` (``pchmpbase.py`` multiplies ``hessian_diagonal(...)``, which
    already includes ``∂L/∂z``, by ``g_out[0]`` again), so it is not even invariant to
    rescaling the loss. BackPACK's blocks equal a dense construction with that residual;
    ours equal the paper's (``σ''(h) ∂L/∂z``, as in ``HMP``, whose residual BackPACK gets
    right), which the dense test above checks too."""
    payload, models, theirs = backpack_run
    model, X, y = models["mlp"], payload["mlp"]["X"], payload["mlp"]["y"]
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for modify in ("abs", "clip"):
        ref_bp = _pch_reference(model, X, y, modify, backpack_residual=True)
        ref = _pch_reference(model, X, y, modify)
        op = BlockDiagCurvature(model, nn.CrossEntropyLoss(), (X, y), curvature=f"pch-{modify}")
        for b, name, s, n in zip(op.blocks, names, starts, sizes):
            bp = theirs["mlp"][f"pchmp_{modify}"][name].reshape(n, n)
            _assert_close(bp, ref_bp[s:s + n, s:s + n], f"BackPACK {modify} {name}", 1e-9)
            _assert_close(b.to_dense(), ref[s:s + n, s:s + n], f"ours {modify} {name}")
        assert float((ref_bp - ref).abs().max()) > 1e-4  # the two conventions differ here
