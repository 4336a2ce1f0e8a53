"""Curvature operators on the architectures people train (issue 13): a tiny transformer
language model, a residual block with batch norm in eval mode, an LSTM classifier, a CNN,
a functional ``scaled_dot_product_attention`` and a transformer decoder layer.

GGN, Hessian, empirical and Monte-Carlo Fisher products are compared with float64
ground truth computed with ``torch.func`` under the differentiable reference kernels
(math attention, multi-head-attention fast path off, native RNN), and that ground truth
is itself checked against central differences. PyTorch's fused fast paths are left at
their defaults in every test (the operators switch them during their own passes), and
the user's backend settings are checked unchanged after every call.
"""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp

from linops.curvature import GGN, EmpiricalFisher, Hessian, MCFisher
from linops.params import ParamSpace

F64 = torch.float64
K = 3


# ----------------------------------------------------------------------------- settings
def backend_settings() -> dict:
    """Every global switch the operators may touch during their passes."""
    s = {
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math_sdp": torch.backends.cuda.math_sdp_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "cudnn": torch.backends.cudnn.enabled,
        "grad": torch.is_grad_enabled(),
    }
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        s["cudnn_sdp"] = torch.backends.cuda.cudnn_sdp_enabled()
    return s


@contextlib.contextmanager
def reference_kernels():
    """The differentiable reference kernels, for the ground truth (public torch API)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration")
            mkldnn_off = torch.backends.mkldnn.flags(enabled=False)
            mkldnn_off.__enter__()
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TF32 acceleration")
                mkldnn_off.__exit__(None, None, None)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


class Watch:
    """Calls through ``Watch.call`` must leave the backend settings as they were."""

    def __init__(self):
        self.before = backend_settings()

    def __call__(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            assert backend_settings() == self.before


# ----------------------------------------------------------------------------- models
class TinyLM(nn.Module):
    """Embedding, one transformer encoder layer (self-attention, LayerNorm), a final
    LayerNorm and a head; the logits of every token, flattened to (batch·seq, vocab)."""

    def __init__(self, vocab=7, d=4, heads=2, ff=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(self.enc(self.emb(x)))).flatten(0, 1)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def tiny_resnet():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                          ResBlock(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


class LSTMClassifier(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 3))


class CausalSDPA(nn.Module):
    """Attention written with ``F.scaled_dot_product_attention`` (seen only in the graph)."""

    def __init__(self, d=4, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(B, T, d)).flatten(0, 1)


class TinyDecoder(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(d, 2, dim_feedforward=6, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.dec(x, x)).flatten(0, 1)


def problem(name, dtype=F64):
    """``(model, X, y)``: tiny, in eval mode, of ``dtype``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "transformer":
        model, X = TinyLM(), torch.randint(0, 7, (2, 3), generator=g)
        y = torch.randint(0, 7, (6,), generator=g)
    elif name == "resnet":
        model, X = tiny_resnet(), torch.randn(3, 2, 4, 4, generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
    elif name in ("lstm", "gru"):
        model = LSTMClassifier(nn.LSTM if name == "lstm" else nn.GRU)
        X, y = torch.randn(3, 4, 3, generator=g), torch.randint(0, 3, (3,), generator=g)
    elif name == "cnn":
        model, X = tiny_cnn(), torch.randn(3, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
    elif name == "sdpa":
        model, X = CausalSDPA(), torch.randn(2, 3, 4, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
    elif name == "decoder":
        model, X = TinyDecoder(), torch.randn(2, 3, 4, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
    model = model.to(dtype).eval()
    if X.is_floating_point():
        X = X.to(dtype)
    return model, X, y


# ----------------------------------------------------------------------------- ground truth
class Reference:
    """Float64 ground truth under the reference kernels, checked by central differences."""

    def __init__(self, model, X, y, loss_fn):
        model = model.to(F64)
        self.X = X.to(F64) if X.is_floating_point() else X
        self.y = y
        self.model, self.loss_fn = model, loss_fn
        self.space = ParamSpace(dict(model.named_parameters()))
        self.theta = self.space.flatten(dict(model.named_parameters())).detach().to(F64)
        with reference_kernels():
            self.J = jacrev(self.output)(self.theta)  # (N, C, P)
            out = self.output(self.theta).detach()
            self.H_out = torch.func.hessian(lambda o: loss_fn(o, y))(out)  # (N, C, N, C)
        self.out = out

    def output(self, theta):
        return functional_call(self.model, self.space.unflatten(theta), (self.X,))

    def loss(self, theta):
        return self.loss_fn(self.output(theta), self.y)

    def hvp(self, V):
        """Reverse-over-reverse ``H V`` (columns of V)."""
        with reference_kernels():
            _, pull = vjp(grad(self.loss), self.theta)
            return torch.stack([pull(v)[0] for v in V.T], 1)

    def check_against_central_differences(self, V, eps=1e-5):
        """The ground truth itself: J V and H V against central differences (float64)."""
        with reference_kernels():
            g = grad(self.loss)
            for v in V.T:
                fd_j = (self.output(self.theta + eps * v) - self.output(self.theta - eps * v))
                jv = torch.einsum("ncp,p->nc", self.J, v)
                _close(fd_j / (2 * eps), jv, 1e-6)
                fd_h = (g(self.theta + eps * v) - g(self.theta - eps * v)) / (2 * eps)
                _close(fd_h, self.hvp(v[:, None])[:, 0], 1e-6)

    def ggn(self):
        N, C, P = self.J.shape
        J = self.J.reshape(N * C, P)
        return J.T @ self.H_out.reshape(N * C, N * C) @ J

    def _scale(self):
        return 1.0 / self.J.shape[0] if self.loss_fn.reduction == "mean" else 1.0

    def empirical_fisher(self):
        r = torch.func.grad(lambda o: self.loss_fn(o, self.y))(self.out) / self._scale()
        G = torch.einsum("nc,ncp->np", r, self.J)  # per-sample gradients
        return self._scale() * G.T @ G

    def mc_fisher(self, R):
        """From the operator's drawn output gradients ``R`` (S, N, C), already / √S."""
        A = torch.einsum("snc,ncp->snp", R.to(F64), self.J)
        return self._scale() * torch.einsum("snp,snq->pq", A, A)


def _close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    scale = max(float(b.abs().max()), 1e-12)
    assert err <= tol * scale, f"max error {err:.3g} against scale {scale:.3g}"


def _products(op, V, watch):
    """``op @ V`` column by column (forward mode's dual tensors) and as one block."""
    V = V.to(op.dtype)
    one = torch.stack([watch(op.__matmul__, v) for v in V.T], 1)
    block = watch(op.__matmul__, V)
    return one.to(F64), block.to(F64)


ARCHS = ["transformer", "resnet", "lstm", "cnn"]
# float32 for the LSTM: only there does PyTorch run oneDNN's LSTM (no forward-mode rule)
DTYPES = {"lstm": torch.float32}


@pytest.mark.parametrize("arch", ARCHS)
def test_curvature_products_match_the_float64_ground_truth(arch):
    dtype = DTYPES.get(arch, F64)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    model, X, y = problem(arch, dtype)
    loss_fn = nn.CrossEntropyLoss()
    ref = Reference(problem(arch)[0], X, y, loss_fn)
    V = torch.randn(ref.theta.numel(), K, dtype=F64, generator=torch.Generator().manual_seed(3))
    ref.check_against_central_differences(V[:, :1])
    watch = Watch()
    expected = {
        "ggn": ref.ggn() @ V,
        "hessian": ref.hvp(V),
        "ef": ref.empirical_fisher() @ V,
    }
    # the CNN is a convolutional chain: the GGN family takes the hand-written chain
    # (_chain.py) by default; fast_path=False checks its autograd route too
    for key, Op in (("ggn", GGN), ("hessian", Hessian), ("ef", EmpiricalFisher)):
        for fast in (None, False) if arch == "cnn" else (None,):
            op = watch(Op, model, loss_fn, (X, y), fast_path=fast)
            for got in _products(op, V, watch):
                _close(got, expected[key], tol)
            info = watch(lambda o=op: o.info)
            if arch == "cnn" and key != "hessian" and fast is None:
                assert info.path == "chain" and op.fast_path
                continue
            assert info.path == "autograd"
            jvp_route = "double backward" if arch == "transformer" else "forward mode"
            if key == "hessian":
                assert info.products == "reverse-over-reverse"
            else:
                assert info.products == jvp_route
            # on the transformer blocks of columns take forward mode's vmapped pass
            assert info.columns == ("forward mode" if arch == "transformer"
                                    and key != "hessian" else None)
            if info.columns:
                assert "blocks of columns: forward mode" in str(info)
    F = watch(MCFisher, model, loss_fn, (X, y), mc_samples=2, seed=0)
    expected_mc = ref.mc_fisher(F._states[0]["R"]) @ V
    for got in _products(F, V, watch):
        _close(got, expected_mc, tol)
    # the GGN's gradient and loss agree with plain autograd
    G = watch(GGN, model, loss_fn, (X, y))
    with reference_kernels():
        g_ref = grad(ref.loss)(ref.theta)
    _close(watch(lambda: G.gradient).to(F64), g_ref, tol)


def test_the_kernel_switches_are_needed_and_reported():
    # with PyTorch's fused kernels kept, the transformer fails and the error names the
    # attention module and the fix; by default the switch is made and reported
    model, X, y = problem("transformer")
    watch = Watch()
    G = watch(GGN, model, nn.CrossEntropyLoss(), (X, y), reference_kernels=False)
    named = r"self_attn' \(MultiheadAttention\).*reference_kernels=None"
    with pytest.raises(RuntimeError, match=named):
        watch(G.__matmul__, torch.ones(G.shape[1], dtype=F64))
    H = watch(Hessian, model, nn.CrossEntropyLoss(), (X, y), reference_kernels=False)
    with pytest.raises(RuntimeError, match=r"self_attn' \(MultiheadAttention\)"):
        watch(H.__matmul__, torch.ones(H.shape[1], dtype=F64))
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    G = watch(GGN, model, nn.CrossEntropyLoss(), (X, y))
    handle.remove()
    assert len(calls) == 1, "the modules announce attention: no second forward pass"
    assert "attention" in " ".join(G.info.kernels)
    assert "math scaled_dot_product_attention" in str(G.info)
    # an LSTM in float32 (oneDNN) switches the native RNN in; a CNN switches nothing
    model, X, y = problem("lstm", torch.float32)
    assert any("RNN" in k for k in GGN(model, nn.CrossEntropyLoss(), (X, y)).info.kernels)
    model, X, y = problem("cnn")
    assert GGN(model, nn.CrossEntropyLoss(), (X, y)).info.kernels == ()


@pytest.mark.parametrize("arch", ["sdpa", "decoder", "gru"])
def test_functional_attention_decoder_and_gru(arch):
    # functional scaled_dot_product_attention is found in the graph of the first forward
    # pass (no module announces it); the decoder layer and a GRU through their modules
    model, X, y = problem(arch)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    ref = Reference(model, X, y, loss_fn)
    V = torch.randn(ref.theta.numel(), 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    watch = Watch()
    G = watch(GGN, model, loss_fn, (X, y))
    _close(watch(G.__matmul__, V), ref.ggn() @ V, 1e-8)
    H = watch(Hessian, model, loss_fn, (X, y))
    _close(watch(H.__matmul__, V), ref.hvp(V), 1e-8)
    if arch != "gru":
        assert any("attention" in k for k in G.info.kernels)


@pytest.mark.parametrize("route", ["double backward", "linearize", "forward mode"])
def test_every_jvp_route_gives_the_ggn(route):
    model, X, y = problem("transformer")
    loss_fn = nn.CrossEntropyLoss()
    ref = Reference(model, X, y, loss_fn)
    V = torch.randn(ref.theta.numel(), K, dtype=F64, generator=torch.Generator().manual_seed(5))
    watch = Watch()
    G = watch(GGN, model, loss_fn, (X, y), route=route)
    for got in _products(G, V, watch):
        _close(got, ref.ggn() @ V, 1e-8)
    assert G.info.products == route and G.info.requested == route


def test_hessian_routes_and_route_validation():
    model, X, y = problem("cnn")
    loss_fn = nn.CrossEntropyLoss()
    ref = Reference(model, X, y, loss_fn)
    V = torch.randn(ref.theta.numel(), 2, dtype=F64)
    H = Hessian(model, loss_fn, (X, y), route="forward-over-reverse")
    _close(H @ V, ref.hvp(V), 1e-8)
    assert H.info.products == "forward-over-reverse"
    assert Hessian(model, loss_fn, (X, y), route="reverse_over_reverse").info.products == \
        "reverse-over-reverse"
    with pytest.raises(ValueError, match="route must be one of 'auto', 'reverse-over-reverse'"):
        Hessian(model, loss_fn, (X, y), route="double backward")
    with pytest.raises(ValueError, match="route must be one of 'auto', 'forward mode'"):
        GGN(model, loss_fn, (X, y), route="reverse-over-reverse")
    with pytest.raises(TypeError, match="reference_kernels must be None, True or False"):
        GGN(model, loss_fn, (X, y), reference_kernels="yes")


# ----------------------------------------------------------------------------- bad input
class TupleModel(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.as_dict = as_dict

    def forward(self, x):
        logits = self.lin(x)
        return {"logits": logits, "hidden": x} if self.as_dict else (logits, x)


def test_models_with_tuple_or_dict_outputs():
    X, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    loss_fn = nn.CrossEntropyLoss()
    for as_dict, fix in ((False, r"output_fn=lambda out: out\[0\]"),
                         (True, r"output_fn=lambda out: out\['logits'\]")):
        model = TupleModel(as_dict).double()
        with pytest.raises(TypeError, match=fix):
            GGN(model, loss_fn, (X, y))
        with pytest.raises(TypeError, match=fix):
            Hessian(model, loss_fn, (X, y))
        pick = (lambda out: out["logits"]) if as_dict else (lambda out: out[0])
        ref = GGN(model.lin, loss_fn, (X, y), fast_path=False).to_dense()
        for Op in (GGN, EmpiricalFisher, Hessian):
            op = Op(model, loss_fn, (X, y), output_fn=pick)
            dense = op.to_dense()
            if Op is GGN:
                _close(dense, ref, 1e-10)
            assert dense.shape == (8, 8)
    model = TupleModel().double()
    with pytest.raises(TypeError, match="output_fn returned a tuple"):
        GGN(model, loss_fn, (X, y), output_fn=lambda out: out)
    with pytest.raises(TypeError, match="output_fn must be a callable"):
        GGN(model, loss_fn, (X, y), output_fn="logits")
    lin = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="fast_path=True .* cannot apply output_fn"):
        GGN(lin, loss_fn, (X, y), fast_path=True, output_fn=lambda o: o)


class _OnceCube(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class OnceCube(nn.Module):
    def forward(self, x):
        return _OnceCube.apply(x)


def test_a_module_no_route_can_differentiate_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), OnceCube(), nn.Flatten(), nn.Linear(32, 3))
    model = model.double()
    X, y = torch.randn(2, 1, 6, 6, dtype=F64), torch.randint(0, 3, (2,))
    G = GGN(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(RuntimeError, match=r"module '1' \(OnceCube\).*neither in forward mode"):
        G @ torch.ones(G.shape[1], dtype=F64)
    H = Hessian(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(RuntimeError, match=r"module '1' \(OnceCube\)"):
        H @ torch.ones(H.shape[1], dtype=F64)
    # the gradient needs first derivatives only
    assert torch.isfinite(G.gradient).all()


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("Op", [GGN, Hessian, EmpiricalFisher, MCFisher])
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_an_operator_is_freed_by_reference_counting_alone(Op, arch):
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 3, (5,))
    else:
        model, X, y = problem("cnn")
    gc.collect()
    gc.disable()
    try:
        op = Op(model, nn.CrossEntropyLoss(), (X, y))
        op @ torch.ones(op.shape[1], dtype=F64)
        op @ torch.ones(op.shape[1], 2, dtype=F64)
        assert op.gradient.shape == (op.shape[1],) and op.loss.ndim == 0 and op.info
        ref = weakref.ref(op)
        leaf = weakref.ref(next(v for k, v in op._states[0].items()
                                if k in ("lin", "graph", "mlp", "chain")))
        del op
        assert ref() is None, "the operator outlived its last reference (a reference cycle)"
        assert leaf() is None, "its linearization outlived it"
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- settings
def test_the_users_own_settings_are_restored_not_the_defaults():
    # a user who switched things off themselves finds them off again after every call
    from linops.curvature._routes import RNN_CPU, RNN_CUDA, KernelSwitch

    model, X, y = problem("transformer")
    old_fast = torch.backends.mha.get_fastpath_enabled()
    old_flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        watch = Watch()
        assert watch.before["mha_fastpath"] is False and watch.before["flash_sdp"] is False
        G = watch(GGN, model, nn.CrossEntropyLoss(), (X, y), cache=True)
        watch(G.__matmul__, torch.ones(G.shape[1], 2, dtype=F64))
    finally:
        torch.backends.mha.set_fastpath_enabled(old_fast)
        torch.backends.cuda.enable_flash_sdp(old_flash)
    # the cuDNN and oneDNN switches (on a GPU and on a CPU): off inside, restored after,
    # also when the pass raises
    for switch, flag in ((RNN_CUDA, lambda: torch.backends.cudnn.enabled),
                         (RNN_CPU, lambda: torch.backends.mkldnn.enabled)):
        before = flag()
        with pytest.raises(ZeroDivisionError):
            with KernelSwitch((switch,))():
                assert flag() is False
                1 / 0  # noqa: B018
        assert flag() == before


def test_several_batches_without_a_cache():
    # the transformer over two batches, re-linearized at every product, equals one batch
    model, X, y = problem("transformer")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batches = [(X[:1], y[:3]), (X[1:], y[3:])]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64)
    for Op in (GGN, Hessian):
        whole = Op(model, loss_fn, (X, y)) @ V
        split = Op(model, loss_fn, batches)
        assert not split.cached
        _close(split @ V, whole, 1e-10)


def test_blocks_of_columns_fall_back_where_forward_mode_fails():
    # prefer_columns: a block goes through forward mode's vmapped pass; where an operation
    # has no forward-mode rule the block is taken column by column by the double backward,
    # with the same values
    from linops.autodiff._linearization import Linearization

    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    A = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, dtype=F64, requires_grad=True)
    for fn, works in ((torch.sin, True), (NoJvp.apply, False)):
        def f(ts, fn=fn):
            return fn(A @ ts[0])

        lin = Linearization(f([x]), [x], ["x"], rerun=f, route="auto",
                            prefer="double backward", prefer_columns=True)
        V = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
        J = torch.cos(A @ x.detach())[:, None] * A
        torch.testing.assert_close(lin.jvp([V], 3), V @ J.T, rtol=1e-12, atol=1e-13)
        assert lin.columns_route_used == ("forward mode" if works else None)
        torch.testing.assert_close(lin.jvp([V[:1]], 1), V[:1] @ J.T, rtol=1e-12, atol=1e-13)
        assert lin.route_used == "double backward"
