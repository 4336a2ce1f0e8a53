"""The convolutional chain fast path (``linops.curvature._chain``): GGN, EmpiricalFisher
and MCFisher products, gradients and losses of chains of convolutions, max pooling,
Flatten, Linear layers and activations against float64 torch.func references, one
column and several, batched and looped; which models take it, and the fallbacks."""

import pytest
import torch
from _helpers import DEVICE_PARAMS
from test_curvature import ref_ef, ref_ggn
from torch import nn
from torch.func import functional_call, grad

from linops.curvature import GGN, EmpiricalFisher, Hessian, MCFisher
from linops.params import ParamSpace

F64 = torch.float64


def _chain(kind):
    """Chains with every option the fast path takes."""
    if kind == "conv2d":  # the reference CNN's shape, overlapping pooling with padding
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=1, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(3, 4, (2, 3), stride=(2, 1),
                                                           dilation=(1, 2), bias=False),
            nn.SiLU(), nn.Dropout(0.3), nn.Flatten(), nn.Identity(), nn.Linear(16, 5),
            nn.Tanh(), nn.Linear(5, 3)), (2, 9, 12)
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.GELU(),
                             nn.MaxPool1d(2, ceil_mode=True), nn.Conv1d(3, 2, 2, stride=2),
                             nn.Flatten(), nn.Linear(4, 3)), (2, 9)
    if kind == "conv3d":
        return nn.Sequential(nn.Conv3d(1, 2, 2), nn.LeakyReLU(0.2),
                             nn.MaxPool3d(2, dilation=1), nn.Flatten(),
                             nn.Linear(16, 3)), (1, 5, 5, 5)
    if kind == "batchnorm":  # eval-mode batch norm after convolutions and a Linear layer
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.Conv2d(3, 2, 2),
                             nn.BatchNorm2d(2, affine=False), nn.Tanh(), nn.Flatten(),
                             nn.Linear(18, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), (2, 6, 6)
    if kind == "conv-last":  # a convolution as the last layer, flattened after it
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 1, 2),
                             nn.Flatten()), (1, 5, 5)
    raise ValueError(kind)


def _problem(kind, n=4, seed=0, loss="ce"):
    torch.manual_seed(seed)
    model, shape = _chain(kind)
    model = model.to(F64).eval()
    for m in model.modules():  # running statistics away from (0, 1), affine maps too
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=F64)
    C = model(X).shape[1]
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, C, (n,), generator=g)
    return model, nn.MSELoss(reduction="sum"), X, torch.randn(n, C, generator=g, dtype=F64)


def _params(model, which):
    named = dict(model.named_parameters())
    if which == "all":
        return None, named
    # from the second parameterized layer on: the chain starts later, its first layer
    # gets an input tangent of zero and computes no input cotangent
    first = next(iter(named)).split(".")[0]
    sub = {n: p for n, p in named.items() if not n.startswith(first + ".")}
    return sub, sub


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "conv3d", "conv-last", "batchnorm"])
@pytest.mark.parametrize("which", ["all", "later"])
@pytest.mark.parametrize("op_key", ["ggn", "ef"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_products_match_the_float64_reference(kind, which, op_key, vectorize):
    loss = "mse" if kind == "conv-last" else "ce"
    model, loss_fn, X, y = _problem(kind, loss=loss)
    params, named = _params(model, which)
    Op = GGN if op_key == "ggn" else EmpiricalFisher
    op = Op(model, loss_fn, (X, y), params=params, vectorize=vectorize)
    assert op.fast_path and op.info.path == "chain", op.info
    ref = (ref_ggn if op_key == "ggn" else ref_ef)(model, loss_fn, X, y, named)
    V = torch.randn(ref.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], ref @ V[:, 0], rtol=1e-10, atol=1e-12)
    # and the autograd path of the same operator agrees
    auto = Op(model, loss_fn, (X, y), params=params, fast_path=False)
    assert auto.info.path == "autograd"
    torch.testing.assert_close(op @ V, auto @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
def test_gradient_loss_and_mc_fisher(kind):
    model, loss_fn, X, y = _problem(kind, n=5)
    G = GGN(model, loss_fn, (X, y))
    space = ParamSpace(dict(model.named_parameters()))
    theta = space.flatten({n: p.detach() for n, p in model.named_parameters()})

    def loss(t):
        return loss_fn(functional_call(model, space.unflatten(t), (X,)), y)

    torch.testing.assert_close(G.gradient, grad(loss)(theta), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(G.loss, loss(theta).detach())
    # MCFisher: the chain and autograd draw the same labels (same seed) and agree
    F = MCFisher(model, loss_fn, (X, y), mc_samples=3, seed=2)
    Fa = MCFisher(model, loss_fn, (X, y), mc_samples=3, seed=2, fast_path=False)
    assert F.info.path == "chain" and Fa.info.path == "autograd"
    V = torch.randn(F.shape[0], 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(F @ V, Fa @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_float32_and_devices_track_the_float64_reference(device):
    model, loss_fn, X, y = _problem("conv2d", n=6)
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    m32 = model.to(device=device, dtype=torch.float32)
    G = GGN(m32, loss_fn, (X.to(device, torch.float32), y.to(device)))
    assert G.info.path == "chain"
    V = torch.randn(ref.shape[0], 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = (G @ V.to(device, torch.float32)).cpu().to(F64)
    torch.testing.assert_close(got, ref @ V, rtol=1e-4, atol=1e-5 * float((ref @ V).abs().max()))


def test_many_columns_are_split_into_chunks(monkeypatch):
    import linops.curvature._chain as chain

    model, loss_fn, X, y = _problem("conv2d")
    G = GGN(model, loss_fn, (X, y), vectorize=True)
    V = torch.randn(G.shape[0], 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    whole = G @ V
    monkeypatch.setattr(chain, "COLUMN_BUDGET", 1)  # one column per chunk
    torch.testing.assert_close(G @ V, whole, rtol=1e-12, atol=1e-13)


def test_which_models_take_the_chain():
    model, loss_fn, X, y = _problem("conv2d")
    # the Hessian needs second derivatives: autograd
    assert Hessian(model, loss_fn, (X, y)).info.path == "autograd"
    # an MLP keeps the MLP fast path
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(216, 3)).to(F64)
    assert GGN(mlp, loss_fn, (X, y)).info.path == "mlp"
    # a grouped convolution: autograd, and fast_path=True says why
    m = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).to(F64).eval()
    yy = torch.randint(0, m(X).shape[1], (X.shape[0],))
    assert not GGN(m, loss_fn, (X, yy)).fast_path
    with pytest.raises(ValueError, match="groups"):
        GGN(m, loss_fn, (X, yy), fast_path=True)
    # pooling that returns its indices (a tuple output) is refused by name
    m = nn.Sequential(nn.Conv2d(2, 2, 3), nn.MaxPool2d(2, return_indices=True)).to(F64)
    with pytest.raises(ValueError, match="returns its indices"):
        GGN(m, loss_fn, (X, y), fast_path=True)
    # a hook on a module: autograd (the hook must run)
    calls = []
    h = model[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        G = GGN(model, loss_fn, (X, y))
        assert G.info.path == "autograd" and calls
    finally:
        h.remove()


def test_a_batch_the_chain_does_not_take_falls_back_to_autograd():
    # a Linear layer on (N, L, d) inputs: the batch goes through autograd (fast_path=None)
    # and is refused with fast_path=True
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Linear(4, 3)).to(F64).eval()
    X = torch.randn(4, 2, 5, dtype=F64)
    loss_fn = nn.MSELoss()
    y = torch.randn(4, 3, 3, dtype=F64)
    G = GGN(model, loss_fn, (X, y))
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    v = torch.randn(ref.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(G @ v, ref @ v, rtol=1e-10, atol=1e-12)
    assert G.info.path == "autograd"
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        GGN(model, loss_fn, (X, y), fast_path=True)


@pytest.mark.parametrize("layers", [
    # pooling and a convolution met by an input PyTorch takes as one unbatched sample
    lambda: [nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(24, 8), nn.MaxPool1d(2),
             nn.Linear(4, 3)],
    lambda: [nn.Conv1d(2, 3, 2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)],
    lambda: [nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Unflatten(1, (3, 8)),
             nn.Conv1d(3, 2, 2), nn.Flatten(), nn.Linear(14, 3)],
])
def test_inputs_of_another_rank_go_through_autograd(layers):
    model = nn.Sequential(*layers()).to(F64).eval()
    X = torch.randn(5, 2, 9, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    loss_fn = nn.CrossEntropyLoss()
    G = GGN(model, loss_fn, (X, y))
    ref = ref_ggn(model, loss_fn, X, y, dict(model.named_parameters()))
    v = torch.randn(ref.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(G @ v, ref @ v, rtol=1e-10, atol=1e-12)
    assert G.info.path == "autograd"


def test_first_convolution_without_kept_patches(monkeypatch):
    # the first convolution's weight gradient by a GEMM with its kept patches, or (over
    # the budget) by oneDNN's weight gradient: the same products
    import linops.curvature._chain as chain

    model, loss_fn, X, y = _problem("conv2d")
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64,
                    generator=torch.Generator().manual_seed(0))
    kept = GGN(model, loss_fn, (X, y)) @ V
    monkeypatch.setattr(chain, "UNFOLD_BUDGET", 0)
    G = GGN(model, loss_fn, (X, y))
    torch.testing.assert_close(G @ V, kept, rtol=1e-12, atol=1e-13)
    first = next(s for s in G._states[0]["chain"].layers if getattr(s, "first", False))
    assert first.unfold_tried and first.unfolded is None


def test_batch_norm_in_training_mode_is_not_a_chain():
    # batch statistics couple the samples: autograd (and allow_train_mode's operator)
    model, loss_fn, X, y = _problem("batchnorm")
    model[1].train()
    G = GGN(model, loss_fn, (X, y), allow_train_mode=True)
    assert not G.fast_path
    with pytest.raises(ValueError, match="batch statistics"):
        GGN(model, loss_fn, (X, y), allow_train_mode=True, fast_path=True)
