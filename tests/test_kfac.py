"""K-FAC, KFLR, KFRA and EKFAC (``linops.curvature.kfac``) against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import solvers
from linops import I_like, KroneckerEigen, is_psd
from linops.curvature import EKFAC, GGN, KFAC, quantities
from linops.curvature.losses import loss_curvature

F64 = torch.float64


def _block(dense, space, name):
    start = 0
    for n, k in zip(space.names, space.numels):
        if n == name:
            return dense[start:start + k, start:start + k]
        start += k
    raise KeyError(name)


def _reference_factors(model, layer, loss_fn, X, y):
    """A = Σ aaᵀ/N and G = (1/c) Σₙ Jₙᵀ Hₙ Jₙ for ``layer`` (2-D inputs): its input from a
    hook, Jₙ = ∂(model output)/∂(layer output) by torch.func.jacrev of the rest of the net."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.update(a=i[0].detach(),
                                                                 h=o.detach()))
    out = model(X).detach()
    h.remove()
    a, hout = store["a"], store["h"]
    lc = loss_curvature(loss_fn)
    st = lc.prepare(out, y)
    c = float(lc.count(st)) if loss_fn.reduction == "mean" else 1.0

    def tail(hn, n):  # the model output of sample n as a function of the layer output
        def repl(m, i, o):
            return hn.unsqueeze(0)
        hk = layer.register_forward_hook(repl)
        try:
            return model(X[n:n + 1])[0]
        finally:
            hk.remove()

    G = 0
    for n in range(X.shape[0]):
        J = torch.func.jacrev(lambda hn, n=n: tail(hn, n))(hout[n])  # (C, out)
        Hn = torch.func.hessian(lambda o, n=n: lc.summed_loss(o.unsqueeze(0), y[n:n + 1],
                                                              lc.prepare(o.unsqueeze(0).detach(),
                                                                         y[n:n + 1])))(out[n])
        G = G + J.T @ Hn @ J
    return G / c, a.T @ a / X.shape[0]


def _mlp(act=nn.Tanh):
    return nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)).to(F64)


def test_factors_against_torch_func():
    torch.manual_seed(0)
    model = _mlp()
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    q = quantities(model, loss, (X, y), ["kflr"])["kflr"]
    for i in (0, 2):
        G, A = _reference_factors(model, model[i], loss, X, y)
        torch.testing.assert_close(q[f"{i}.weight"][0], G, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q[f"{i}.weight"][1], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q[f"{i}.bias"][0], G, rtol=1e-10, atol=1e-12)
        assert len(q[f"{i}.bias"]) == 1


@pytest.mark.parametrize("case", ["single-layer", "one-sample", "deep-linear"])
def test_kflr_is_the_exact_block_where_theory_says_so(case):
    torch.manual_seed(1)
    if case == "single-layer":
        model, N, loss = nn.Linear(4, 3).to(F64), 7, nn.MSELoss()
    elif case == "one-sample":
        model, N, loss = _mlp(), 1, nn.CrossEntropyLoss()
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3)).to(F64)
        N, loss = 6, nn.MSELoss()
    X = torch.randn(N, 4, dtype=F64)
    y = torch.randn(N, 3, dtype=F64) if isinstance(loss, nn.MSELoss) else torch.randint(0, 3,
                                                                                       (N,))
    K = KFAC(model, loss, (X, y), fisher="exact")
    G = GGN(model, loss, (X, y))
    dense = G.to_dense()
    for name, fs in K.factors.items():
        block = torch.kron(fs[0], fs[1]) if len(fs) == 2 else fs[0]
        torch.testing.assert_close(block, _block(dense, G.param_space, name), rtol=1e-9,
                                   atol=1e-12)


def test_kfac_converges_to_kflr_and_mc_is_reproducible():
    torch.manual_seed(2)
    model = _mlp()
    X, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    exact = KFAC(model, loss, (X, y), fisher="exact").to_dense()
    a = KFAC(model, loss, (X, y), mc_samples=3, seed=4).to_dense()
    assert torch.equal(a, KFAC(model, loss, (X, y), mc_samples=3, seed=4).to_dense())
    errs = [float((KFAC(model, loss, (X, y), mc_samples=S, seed=0).to_dense() - exact).norm()
                  / exact.norm()) for S in (4, 3000)]
    assert errs[1] < 0.05 and errs[1] < errs[0] / 4, errs


def test_ekfac_is_at_least_as_close_as_kfac():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(),
                          nn.Linear(5, 3)).to(F64)
    X, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    loss = nn.CrossEntropyLoss()
    G = GGN(model, loss, (X, y))
    dense = G.to_dense()
    K = KFAC(model, loss, (X, y), fisher="exact")
    E = EKFAC(model, loss, (X, y), fisher="exact")
    assert is_psd(E) and isinstance(E.blocks[0], KroneckerEigen)
    for i, name in enumerate(K.param_space.names):
        ref = _block(dense, G.param_space, name)
        dk = float((K.blocks[i].to_dense() - ref).norm())
        de = float((E.blocks[i].to_dense() - ref).norm())
        assert de <= dk * (1 + 1e-10) + 1e-14, (name, de, dk)
        if name.endswith("weight"):
            assert de < dk  # strictly better here
    # EKFAC with exact damping stays exact: its inverse is in the same eigenbasis
    b = torch.randn(E.shape[0], dtype=F64)
    Ed = E + 0.1 * I_like(E)
    torch.testing.assert_close(solvers.inv(Ed) @ b, torch.linalg.solve(Ed.to_dense(), b))


def test_damped_inverses_logdet_and_pi_damping():
    torch.manual_seed(4)
    model = _mlp()
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    K = KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
    lam = 1e-2
    Kd = K + lam * I_like(K)
    dense = Kd.to_dense()
    b = torch.randn(K.shape[0], 3, dtype=F64)
    inv = solvers.inv(Kd)
    assert not hasattr(inv, "solution")  # structural, no iterative solve
    torch.testing.assert_close(inv @ b, torch.linalg.solve(dense, b))
    torch.testing.assert_close(solvers.logdet(Kd), torch.logdet(dense))
    torch.testing.assert_close(K.damped(lam).to_dense(), dense)
    P = K.damped(lam, "pi")
    G, A = K.factors["0.weight"]
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    ref = torch.kron(G + lam**0.5 / pi * torch.eye(5, dtype=F64),
                     A + lam**0.5 * pi * torch.eye(4, dtype=F64))
    torch.testing.assert_close(P.blocks[0].to_dense(), ref)
    torch.testing.assert_close(solvers.inv(P) @ b, torch.linalg.solve(P.to_dense(), b))
    with pytest.raises(ValueError, match="positive"):
        K.damped(0.0)
    with pytest.raises(ValueError, match="'exact' or 'pi'"):
        K.damped(1.0, "trace")


def test_kfra_equals_kflr_for_one_sample_and_on_the_last_layer():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(F64)
    loss = nn.CrossEntropyLoss()
    X, y = torch.randn(1, 4, dtype=F64), torch.randint(0, 3, (1,))
    kfra = quantities(model, loss, (X, y), ["kfra", "kflr"])
    for p in kfra["kflr"]:
        for a, b in zip(kfra["kfra"][p], kfra["kflr"][p]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    X, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    q = quantities(model, loss, (X, y), ["kfra", "kflr"])
    torch.testing.assert_close(q["kfra"]["2.weight"][0], q["kflr"]["2.weight"][0])
    # the first layer: Ḡ = E[σ'σ'ᵀ] ⊙ (Wᵀ Ḡ_out W), by hand
    W = model[2].weight.detach()
    h = model[0](X).detach()
    s = torch.sigmoid(h)
    d = s * (1 - s)
    ref = (W.T @ q["kflr"]["2.weight"][0] @ W) * (d.T @ d) / 7
    torch.testing.assert_close(q["kfra"]["0.weight"][0], ref)
    with pytest.raises(ValueError, match="kfra=True needs a chain"):
        KFAC(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3)).to(F64), loss,
             (torch.randn(3, 1, 4, dtype=F64), torch.randint(0, 3, (3,))), kfra=True)


def test_convolution_factors_and_conventions():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(F64)
    X, y = torch.randn(5, 2, 5, 5, dtype=F64), torch.randint(0, 4, (5,))
    loss = nn.CrossEntropyLoss()
    U = F.unfold(X, 3, padding=1, stride=2)  # (N, I, L)
    N, I, L = U.shape
    # G from the bias (whose block is exact): the "backpack" and "reduce" G
    G_bias = KFAC(model, loss, (X, y), fisher="exact").factors["0.bias"][0]
    dense = GGN(model, loss, (X, y))
    torch.testing.assert_close(G_bias, _block(dense.to_dense(), dense.param_space, "0.bias"))
    bp = quantities(model, loss, (X, y), ["kflr"])["kflr"]["0.weight"]
    torch.testing.assert_close(bp[0], G_bias)
    torch.testing.assert_close(bp[1], torch.einsum("nil,njl->ij", U, U) / N)
    red = KFAC(model, loss, (X, y), fisher="exact", kfac_approx="reduce").factors["0.weight"]
    Ubar = U.mean(-1)
    torch.testing.assert_close(red[1], Ubar.T @ Ubar / N)
    exp = KFAC(model, loss, (X, y), fisher="exact", kfac_approx="expand").factors["0.weight"]
    torch.testing.assert_close(exp[1], torch.einsum("nil,njl->ij", U, U) / (N * L))
    # G of "reduce" is that of the bias too; G of "expand" sums the outer products of the
    # cotangents at every position: against the loss Hessian's square root back-propagated
    # by autograd, sample by sample
    torch.testing.assert_close(red[0], G_bias)
    h = conv(X)
    out = model[3](model[2](model[1](h)))
    G_exp = 0
    for n in range(N):
        Hn = torch.func.hessian(lambda o, n=n: loss(o.unsqueeze(0), y[n:n + 1]))(out[n].detach())
        evals, evecs = torch.linalg.eigh(Hn)
        S = evecs * evals.clamp(min=0).sqrt()  # S Sᵀ = Hn
        for c in range(S.shape[1]):
            g = torch.autograd.grad(out[n], h, S[:, c], retain_graph=True)[0][n]  # (O, 3, 3)
            G_exp = G_exp + g.reshape(3, -1) @ g.reshape(3, -1).T
    torch.testing.assert_close(exp[0], G_exp / N)
    assert bp[0].shape == (3, 3) and bp[1].shape == (2 * 9, 2 * 9)


def test_weight_tying_stacks_the_uses():
    torch.manual_seed(7)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)
            self.h = nn.Linear(3, 2)

        def forward(self, x):
            return self.h(self.l(torch.tanh(self.l(x))))

    model = Twice().to(F64)
    X, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    K = KFAC(model, nn.MSELoss(), (X, y), fisher="exact")
    G, A = K.factors["l.weight"]
    a1 = X
    a2 = torch.tanh(model.l(X)).detach()
    torch.testing.assert_close(A, (a1.T @ a1 + a2.T @ a2) / 8)
    # G: the cotangents of both uses, from the exact output Hessian 2I/(N·2)
    W_h, W_l = model.h.weight.detach(), model.l.weight.detach()
    d = 1 - torch.tanh(model.l(X)).detach() ** 2  # (N, 3)
    c = 8.0  # MSE mean over N·2 entries
    g2 = W_h  # (2, 3): output Jacobian of the second use, per sample
    G_ref = 2 * (g2.T @ g2) * 4
    for n in range(4):
        J1 = W_h @ W_l @ torch.diag(d[n])  # output Jacobian of the first use's output
        G_ref = G_ref + 2 * J1.T @ J1
    torch.testing.assert_close(G, G_ref / c)


def test_unsupported_parameters_dense_or_dropped_and_bad_input():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    K = KFAC(model, loss, (X, y), fisher="exact")
    assert K.info["kinds"]["1.weight"] == "dense"
    G = GGN(model, loss, (X, y))
    torch.testing.assert_close(K.factors["1.weight"][0],
                               _block(G.to_dense(), G.param_space, "1.weight"))
    D = KFAC(model, loss, (X, y), fisher="exact", unsupported="drop")
    assert "1.weight" not in D.param_space.names and D.info["kinds"]["1.bias"] == "dropped"
    assert "dropped" in repr(D)
    with pytest.raises(ValueError, match="fisher must be one of"):
        KFAC(model, loss, (X, y), fisher="ggn")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFAC(model, loss, (X, y), kfac_approx="mean")
    with pytest.raises(ValueError, match="Pass params= without it"):
        quantities(model, loss, (X, y), ["kflr"])
    with pytest.raises(ValueError, match="too large for a dense block.*unsupported='drop'"):
        KFAC(nn.Sequential(nn.Embedding(10, 500), nn.Flatten(), nn.Linear(500, 3)).to(F64),
             loss, (torch.randint(0, 10, (4, 1)), torch.randint(0, 3, (4,))))


def test_data_loader_equals_one_batch():
    torch.manual_seed(9)
    model = _mlp()
    X, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss()
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]
    a = KFAC(model, loss, (X, y), fisher="exact")
    b = KFAC(model, loss, loader, fisher="exact")
    torch.testing.assert_close(a.to_dense(), b.to_dense())
    torch.testing.assert_close(a.gradient, GGN(model, loss, (X, y)).gradient)
    torch.testing.assert_close(b.loss, loss(model(X), y).detach())


def test_block_product_names_through_quantities():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(F64)
    X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    q = quantities(model, loss, (X, y), ["hmp", "ggnmp", "pchmp_abs"])
    from linops.curvature import Hessian

    for name, op in (("ggnmp", GGN(model, loss, (X, y))), ("hmp", Hessian(model, loss, (X, y)))):
        dense = op.to_dense()
        for p, shape in zip(op.param_space.names, op.param_space.shapes):
            V = torch.randn(2, *shape, dtype=F64)
            ref = (_block(dense, op.param_space, p) @ V.reshape(2, -1).T).T.reshape(V.shape)
            torch.testing.assert_close(q[name][p](V), ref, rtol=1e-9, atol=1e-12)
    V = torch.randn(3, 5, 4, dtype=F64)
    W = q["pchmp_abs"]["0.weight"](V)
    assert float((V * W).sum(dim=(1, 2)).min()) >= 0  # PSD block: vᵀ C v ≥ 0


def _homogeneous(a):
    """``Σ [a; 1][a; 1]ᵀ / rows`` of inputs ``a`` (rows, in)."""
    ah = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return ah.T @ ah / a.shape[0]


def _joint_dense(G, Ah, d_out, d_in):
    """``G ⊗ Ā`` over ``vec([W | b])`` reordered to the parameters' ``[vec W; b]``."""
    K = torch.kron(G, Ah)  # over (d_out, d_in + 1) row-major
    order = [o * (d_in + 1) + d for o in range(d_out) for d in range(d_in)]
    order += [o * (d_in + 1) + d_in for o in range(d_out)]
    return K[order][:, order]


def test_joint_bias_blocks_against_a_dense_homogeneous_construction():
    """``bias="joint"``: each layer's weight and bias in one block ``G ⊗ Ā`` with Ā the
    homogeneous inputs' second moment, against G from torch.func and Ā from a hook."""
    torch.manual_seed(11)
    model = _mlp(nn.Sigmoid)
    X, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    loss = nn.CrossEntropyLoss()
    K = KFAC(model, loss, (X, y), fisher="exact", bias="joint")
    assert K.info["joint"] == {"0.weight": "0.bias", "2.weight": "2.bias"}
    assert "2 joint weight+bias" in repr(K) and len(K.blocks) == 2
    dense = K.to_dense()
    start = 0
    for i in (0, 2):
        layer = model[i]
        G, _ = _reference_factors(model, layer, loss, X, y)
        store = {}
        h = layer.register_forward_hook(lambda m, inp, o, st=store: st.update(a=inp[0]))
        model(X)
        h.remove()
        Ah = _homogeneous(store["a"].detach())
        torch.testing.assert_close(K.homogeneous[f"{i}.weight"], Ah, rtol=1e-10, atol=1e-12)
        n = layer.weight.numel() + layer.bias.numel()
        ref = _joint_dense(G, Ah, layer.out_features, layer.in_features)
        torch.testing.assert_close(dense[start:start + n, start:start + n], ref, rtol=1e-10,
                                   atol=1e-12)
        start += n
    # the weight blocks are K-FAC's (the factors stay BackPACK's), the coupling is new
    sep = KFAC(model, loss, (X, y), fisher="exact")
    for p in sep.factors:
        for a, b in zip(K.factors[p], sep.factors[p]):
            torch.testing.assert_close(a, b)
    # exact: damped inverse, log-determinant, and the π heuristic with Ā
    lam = 0.05
    M = K + lam * I_like(K)
    ref = dense + lam * torch.eye(dense.shape[0], dtype=F64)
    v = torch.randn(dense.shape[0], dtype=F64)
    torch.testing.assert_close(solvers.inv(M) @ v, torch.linalg.solve(ref, v))
    torch.testing.assert_close(solvers.logdet(M), torch.logdet(ref))
    Gf, Ah = K.factors["0.weight"][0], K.homogeneous["0.weight"]
    pi = (float(Ah.diagonal().mean()) / float(Gf.diagonal().mean())) ** 0.5
    r = lam ** 0.5
    eye = torch.eye(5, dtype=F64)
    pref = _joint_dense(Gf + r / pi * eye, Ah + r * pi * eye, 5, 4)
    torch.testing.assert_close(K.damped(lam, "pi").to_dense()[:25, :25], pref)


def test_joint_bias_block_is_exact_for_one_linear_layer():
    """One Linear layer with MSE: the GGN of [W, b] is G ⊗ Ā exactly (the loss Hessian is
    constant), including the weight-bias coupling that separate blocks leave out."""
    torch.manual_seed(12)
    model = nn.Linear(4, 3).to(F64)
    X, y = torch.randn(7, 4, dtype=F64), torch.randn(7, 3, dtype=F64)
    G = GGN(model, nn.MSELoss(), (X, y)).to_dense()
    joint = KFAC(model, nn.MSELoss(), (X, y), fisher="exact", bias="joint")
    torch.testing.assert_close(joint.to_dense(), G, rtol=1e-10, atol=1e-12)
    sep = KFAC(model, nn.MSELoss(), (X, y), fisher="exact").to_dense()
    assert float((sep - G).abs().max()) > 1e-3  # the coupling block is missing there


def test_joint_bias_conv_expand_and_fallbacks():
    torch.manual_seed(13)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    lin = nn.Linear(27, 4, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin).to(F64)
    X, y = torch.randn(5, 2, 5, 5, dtype=F64), torch.randint(0, 4, (5,))
    loss = nn.CrossEntropyLoss()
    K = KFAC(model, loss, (X, y), fisher="exact", bias="joint")
    assert K.info["joint"] == {"0.weight": "0.bias"}  # the bias-free Linear stays Kronecker
    U = F.unfold(X, 3, padding=1, stride=2)  # (N, I, L)
    rows = U.permute(0, 2, 1).reshape(-1, U.shape[1])
    torch.testing.assert_close(K.homogeneous["0.weight"], _homogeneous(rows))
    G = K.factors["0.weight"][0]
    n = conv.weight.numel() + conv.bias.numel()
    torch.testing.assert_close(K.to_dense()[:n, :n],
                               _joint_dense(G, _homogeneous(rows), 3, U.shape[1]))
    red = KFAC(model, loss, (X, y), fisher="exact", bias="joint", kfac_approx="reduce")
    torch.testing.assert_close(red.homogeneous["0.weight"], _homogeneous(U.mean(-1)))
    with pytest.raises(ValueError, match="kfac_approx='expand'"):
        KFAC(model, loss, (X, y), bias="joint", kfac_approx="backpack")
    with pytest.raises(ValueError, match="'separate' or 'joint'"):
        KFAC(model, loss, (X, y), bias="together")
    # a bias listed before its weight is not joined (the blocks follow param_space order)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in ("0.bias", "0.weight", "3.weight")}
    rev = KFAC(model, loss, (X, y), fisher="exact", bias="joint", params=params)
    assert rev.info["joint"] == {}
    torch.testing.assert_close(rev.to_dense(), KFAC(model, loss, (X, y), fisher="exact",
                                                    params=params).to_dense())
