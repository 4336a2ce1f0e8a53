"""solvers.optim: one step of each optimizer against a hand-written float64 reference of the
same update (dense GGN / Hessian from torch.func), state_dict round trips, parameter groups,
frozen parameters, and the bad inputs."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import linops
import solvers
from solvers import CG, NotConvergedError, NotConvergedWarning
from solvers.optim import CGNewton, DiagGGN, GaussNewton

DT = torch.float64


# ---------------------------------------------------------------------- the problem
def _problem(seed=0, n=12, loss="ce"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    X = torch.randn(n, 3, generator=g, dtype=DT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, 4, (n,), generator=g)
    return model, nn.MSELoss(), X, torch.randn(n, 4, generator=g, dtype=DT)


def _dense(model, loss_fn, X, y, names=None):
    """Flat parameters, loss, gradient, GGN and Hessian (float64, torch.func), in the order of
    ``names`` (default: every parameter)."""
    allp = dict(model.named_parameters())
    names = list(allp) if names is None else list(names)
    shapes = [allp[n].shape for n in names]
    sizes = [allp[n].numel() for n in names]
    flat0 = torch.cat([allp[n].detach().reshape(-1) for n in names])
    rest = {n: p.detach() for n, p in allp.items() if n not in names}

    def unflat(f):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(f, sizes), shapes)}

    def logits(f):
        return functional_call(model, {**rest, **unflat(f)}, (X,))

    def loss(f):
        return loss_fn(logits(f), y)

    out = logits(flat0).detach()
    J = torch.func.jacrev(logits)(flat0).reshape(out.numel(), -1)
    Hz = torch.func.hessian(lambda z: loss_fn(z.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ Hz @ J
    H = torch.func.hessian(loss)(flat0)
    g = torch.func.grad(loss)(flat0)
    return dict(flat=flat0, loss=loss(flat0).detach(), g=g, G=G, H=H, out=out,
                names=names, sizes=sizes)


def _flat(model, names=None):
    allp = dict(model.named_parameters())
    names = list(allp) if names is None else names
    return torch.cat([allp[n].detach().reshape(-1) for n in names])


def _slices(ref, groups):
    """index tensors of the named blocks: groups = list of lists of parameter names."""
    starts, s = {}, 0
    for n, k in zip(ref["names"], ref["sizes"]):
        starts[n] = (s, s + k)
        s += k
    return [torch.cat([torch.arange(*starts[n]) for n in grp]) for grp in groups]


# ---------------------------------------------------------------------- GaussNewton
TIGHT = CG(tol=1e-13, max_iters=500)


@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gauss_newton_step_matches_reference(fisher, loss):
    model, loss_fn, X, y = _problem(loss=loss)
    ref = _dense(model, loss_fn, X, y)
    lr, lam = 0.7, 0.1
    expected = ref["flat"] - lr * torch.linalg.solve(ref["G"] + lam * torch.eye(44, dtype=DT),
                                                     ref["g"])
    opt = GaussNewton(model, loss_fn, lr=lr, damping=lam, fisher=fisher, alg=TIGHT)
    value, outputs = opt.step((X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(value, ref["loss"])
    torch.testing.assert_close(outputs, ref["out"])
    assert opt.last["converged"] and opt.last["extra_forward"] is False
    assert opt.last["directional_derivative"] < 0


def test_gauss_newton_monte_carlo_fisher_and_its_seed():
    model, loss_fn, X, y = _problem()
    F = linops.curvature.MCFisher(model, loss_fn, (X, y), mc_samples=3, seed=5).to_dense()
    ref = _dense(model, loss_fn, X, y)
    expected = ref["flat"] - 0.5 * torch.linalg.solve(F + 0.2 * torch.eye(44, dtype=DT),
                                                      ref["g"])
    opt = GaussNewton(model, loss_fn, lr=0.5, damping=0.2, fisher=True, mc_samples=3, seed=5,
                      alg=TIGHT)
    opt.step((X, y))
    assert opt.last["seed"] == 5
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
    opt.step((X, y))
    assert opt.last["seed"] == 6  # step t uses seed + t − 1


def test_gauss_newton_groups_lr_and_damping():
    model, loss_fn, X, y = _problem()
    ref = _dense(model, loss_fn, X, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.3, "damping": 0.05},
              {"params": list(model[2].parameters()), "lr": 1.1}]
    opt = GaussNewton(model, loss_fn, lr=0.9, damping=0.4, params=groups, alg=TIGHT)
    lam = torch.cat([torch.full((20,), 0.05, dtype=DT), torch.full((24,), 0.4, dtype=DT)]).to(DT)
    lrs = torch.cat([torch.full((20,), 0.3, dtype=DT), torch.full((24,), 1.1, dtype=DT)]).to(DT)
    d = torch.linalg.solve(ref["G"] + torch.diag(lam), ref["g"])
    opt.step((X, y))
    torch.testing.assert_close(_flat(model), ref["flat"] - lrs * d, rtol=1e-9, atol=1e-11)


def test_gauss_newton_frozen_and_restricted_parameters():
    model, loss_fn, X, y = _problem()
    opt = GaussNewton(model, loss_fn, lr=1.0, damping=0.1, alg=TIGHT)
    model[0].weight.requires_grad_(False)  # frozen after the optimizer was built
    frozen = model[0].weight.detach().clone()
    names = ["0.bias", "2.weight", "2.bias"]
    ref = _dense(model, loss_fn, X, y, names)
    n = ref["flat"].numel()
    expected = ref["flat"] - torch.linalg.solve(ref["G"] + 0.1 * torch.eye(n, dtype=DT),
                                                ref["g"])
    opt.step((X, y))
    assert torch.equal(model[0].weight, frozen)
    torch.testing.assert_close(_flat(model, names), expected, rtol=1e-9, atol=1e-11)
    # params= restricts the optimizer to a subset: the others do not move
    model, loss_fn, X, y = _problem(seed=1)
    before = _flat(model, ["0.weight", "0.bias"])
    ref = _dense(model, loss_fn, X, y, ["2.weight", "2.bias"])
    GaussNewton(model, loss_fn, params=model[2].parameters(), damping=0.1, alg=TIGHT).step(
        (X, y))
    assert torch.equal(_flat(model, ["0.weight", "0.bias"]), before)
    expected = ref["flat"] - torch.linalg.solve(ref["G"] + 0.1 * torch.eye(24, dtype=DT),
                                                ref["g"])
    torch.testing.assert_close(_flat(model, ["2.weight", "2.bias"]), expected, rtol=1e-9,
                               atol=1e-11)


# ---------------------------------------------------------------------- CGNewton
BLOCKS = {
    "parameter": [["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"]],
    "layer": [["0.weight", "0.bias"], ["2.weight", "2.bias"]],
    "full": [["0.weight", "0.bias", "2.weight", "2.bias"]],
}


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_newton_step_matches_reference(curvature, blocks):
    model, loss_fn, X, y = _problem(seed=2)
    ref = _dense(model, loss_fn, X, y)
    C = ref["G"] if curvature == "ggn" else ref["H"]
    alpha, lr = (0.02, 0.3) if curvature == "ggn" else (0.6, 0.3)
    expected = ref["flat"].clone()
    for idx in _slices(ref, BLOCKS[blocks]):
        A = (1 - alpha) * C[idx][:, idx] + alpha * torch.eye(len(idx), dtype=DT)
        assert torch.linalg.eigvalsh(A).min() > 0  # the reference system is definite
        expected[idx] += lr * torch.linalg.solve(A, -ref["g"][idx])
    opt = CGNewton(model, loss_fn, lr=lr, alpha=alpha, cg_tol=1e-13, cg_maxiter=500,
                   curvature=curvature, blocks=blocks)
    value, outputs = opt.step((X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(value, ref["loss"])
    torch.testing.assert_close(outputs, ref["out"])
    last = opt.last
    assert len(last["blocks"]) == len(BLOCKS[blocks]) and all(last["converged"])
    assert last["negative_curvature"] == [] and last["directional_derivative"] < 0
    # all blocks' CG run together: one (multi-column) product per iteration, plus the
    # true-residual confirmation(s)
    assert len(last["solutions"]) == 1
    assert last["products"] <= max(last["iterations"]) + 3


def test_cg_newton_groups_with_different_settings_per_parameter_block():
    model, loss_fn, X, y = _problem(seed=3)
    ref = _dense(model, loss_fn, X, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.2, "alpha": 0.5},
              {"params": list(model[2].parameters()), "lr": 0.7}]
    opt = CGNewton(model, loss_fn, lr=0.1, alpha=0.1, cg_tol=1e-13, cg_maxiter=500,
                   params=groups)
    expected = ref["flat"].clone()
    for idx, a, lr in zip(_slices(ref, BLOCKS["parameter"]), (0.5, 0.5, 0.1, 0.1),
                          (0.2, 0.2, 0.7, 0.7)):
        A = (1 - a) * ref["G"][idx][:, idx] + a * torch.eye(len(idx), dtype=DT)
        expected[idx] += lr * torch.linalg.solve(A, -ref["g"][idx])
    opt.step((X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
    # one block, two settings: an error naming the fix
    groups2 = [{"params": [model[0].weight], "alpha": 0.3}, {"params": [model[0].bias]}]
    with pytest.raises(ValueError, match="form one block"):
        CGNewton(model, loss_fn, params=groups2, blocks="layer").step((X, y))


def test_cg_newton_hessian_free_adapts_damping():
    model, loss_fn, X, y = _problem(seed=4)
    ref = _dense(model, loss_fn, X, y)
    alpha, lr = 0.2, 1.0
    A = (1 - alpha) * ref["G"] + alpha * torch.eye(44, dtype=DT)
    d = torch.linalg.solve(A, -ref["g"])
    q = ref["g"] @ (lr * d) + 0.5 * (lr * d) @ ref["G"] @ (lr * d)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(ref["flat"] + lr * d, probe.parameters())
    with torch.no_grad():
        rho = (loss_fn(probe(X), y) - ref["loss"]) / q
    lam = alpha / (1 - alpha)
    lam = lam * 1.5 if rho < 0.25 else (lam * 2 / 3 if rho > 0.75 else lam)
    opt = CGNewton(model, loss_fn, lr=lr, alpha=alpha, cg_tol=1e-13, cg_maxiter=500,
                   blocks="full", adapt_damping=True)
    opt.step((X, y))
    torch.testing.assert_close(_flat(model), ref["flat"] + lr * d, rtol=1e-9, atol=1e-11)
    assert opt.last["rho"] == pytest.approx(float(rho), rel=1e-8)
    assert opt.param_groups[0]["alpha"] == pytest.approx(lam / (1 + lam), rel=1e-12)
    assert opt.param_groups[0]["alpha"] != alpha


class _Prod(nn.Module):
    """f(x) = w₀ w₁ x: at w = (0.1, 0.1) with target 1 the Hessian of (f − 1)² is
    2[[w₁², 2w₀w₁ − 1], [2w₀w₁ − 1, w₀²]], indefinite, and −g lies along its negative
    eigenvector (1, 1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.1, 0.1], dtype=DT))

    def forward(self, x):
        return self.w[0] * self.w[1] * x


def test_cg_newton_reports_negative_curvature_in_a_hessian_block():
    model, loss_fn = _Prod(), nn.MSELoss(reduction="sum")
    X, y = torch.ones(1, 1, dtype=DT), torch.ones(1, 1, dtype=DT)
    H = torch.func.hessian(lambda w: loss_fn(w[0] * w[1] * X, y))(model.w.detach())
    assert torch.linalg.eigvalsh(H).min() < 0
    before = model.w.detach().clone()
    opt = CGNewton(model, loss_fn, alpha=0.0, curvature="hessian")
    with pytest.warns(NotConvergedWarning, match=r"non-positive curvature .*\['w'\]"):
        value, outputs = opt.step((X, y))
    # the Hessian's autograd path keeps no outputs: one extra forward pass, and it says so
    assert opt.last["extra_forward"] is True
    torch.testing.assert_close(outputs, before[0] * before[1] * X)
    torch.testing.assert_close(value, (before[0] * before[1] - 1) ** 2)
    assert opt.last["negative_curvature"] == ["w"] and opt.last["converged"] == [False]
    assert torch.equal(model.w.detach(), before)  # met at the first iteration: no step
    with pytest.raises(NotConvergedError, match="non-positive curvature"):
        CGNewton(model, loss_fn, alpha=0.0, curvature="hessian", on_failure="raise").step(
            (X, y))
    assert torch.equal(model.w.detach(), before)
    # the GGN of the same problem is PSD: no warning, and a step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = CGNewton(model, loss_fn, alpha=0.02, cg_tol=1e-10)
        opt.step((X, y))
    assert opt.last["negative_curvature"] == [] and not torch.equal(model.w.detach(), before)


def test_cg_newton_unconverged_block_is_reported():
    model, loss_fn, X, y = _problem(seed=5)
    opt = CGNewton(model, loss_fn, cg_tol=1e-12, cg_maxiter=1)
    with pytest.warns(NotConvergedWarning,
                      match=r"did not reach .*\['0.weight', '0.bias', '2.weight', '2.bias'\]"):
        opt.step((X, y))
    assert opt.last["converged"] == [False] * 4
    assert opt.last["iterations"] == [1, 1, 1, 1] and opt.last["products"] == 1
    opt = CGNewton(model, loss_fn, cg_tol=1e-12, cg_maxiter=1, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step((X, y))


# ---------------------------------------------------------------------- DiagGGN
@pytest.fixture
def diag_engine():
    """The layer-wise engine's diagonal (``linops.curvature.DiagGGN``)."""
    return linops.curvature.DiagGGN


def test_diag_ggn_exact_step_matches_reference(diag_engine):
    model, loss_fn, X, y = _problem(seed=6)
    ref = _dense(model, loss_fn, X, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.2, "damping": 0.5},
              {"params": list(model[2].parameters())}]
    opt = DiagGGN(model, loss_fn, lr=0.05, damping=1.0, curvature="exact", params=groups)
    lrs = torch.cat([torch.full((20,), 0.2, dtype=DT), torch.full((24,), 0.05, dtype=DT)]).to(DT)
    lam = torch.cat([torch.full((20,), 0.5, dtype=DT), torch.full((24,), 1.0, dtype=DT)]).to(DT)
    expected = ref["flat"] - lrs * ref["g"] / (torch.diagonal(ref["G"]) + lam)
    value, outputs = opt.step((X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, ref["loss"])
    torch.testing.assert_close(outputs, ref["out"])
    assert opt.last["diag_min"] >= 0


def test_diag_ggn_monte_carlo_step(diag_engine):
    model, loss_fn, X, y = _problem(seed=7)
    ref = _dense(model, loss_fn, X, y)
    mc = diag_engine(model, loss_fn, (X, y), mc_samples=2, seed=11).d
    assert not torch.allclose(mc, torch.diagonal(ref["G"]))  # a sample, not the exact one
    opt = DiagGGN(model, loss_fn, lr=0.05, damping=1.0, mc_samples=2, seed=11)
    opt.step((X, y))
    torch.testing.assert_close(_flat(model), ref["flat"] - 0.05 * ref["g"] / (mc + 1.0),
                               rtol=1e-10, atol=1e-12)
    assert opt.last["seed"] == 11


# ---------------------------------------------------------------------- state_dict
def _make(kind, model, loss_fn):
    if kind == "gn":
        return GaussNewton(model, loss_fn, damping=0.1, fisher=True, mc_samples=1, seed=3,
                           alg=TIGHT)
    if kind == "cgn":
        return CGNewton(model, loss_fn, lr=0.5, alpha=0.3, cg_tol=1e-12, cg_maxiter=500,
                        blocks="full", adapt_damping=True)
    return DiagGGN(model, loss_fn, seed=4)


@pytest.mark.parametrize("kind", ["gn", "cgn", "diag"])
def test_state_dict_round_trip(kind, diag_engine):
    model, loss_fn, X, y = _problem(seed=8)
    opt = _make(kind, model, loss_fn)
    opt.step((X, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    opt.step((X, y))
    opt.step((X, y))
    twin = _problem(seed=8)[0]
    twin.load_state_dict(saved_model)
    opt2 = _make(kind, twin, loss_fn)
    opt2.load_state_dict(saved)
    assert opt2.steps == 1
    if kind == "cgn":
        assert opt2.param_groups[0]["alpha"] == saved["param_groups"][0]["alpha"] != 0.3
    opt2.step((X, y))
    opt2.step((X, y))
    torch.testing.assert_close(_flat(twin), _flat(model), rtol=1e-12, atol=1e-14)
    assert opt2.steps == opt.steps == 3


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", [GaussNewton, CGNewton, DiagGGN])
def test_bad_hyper_parameters(kind):
    model, loss_fn, X, y = _problem()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="lr must be > 0"):
            kind(model, loss_fn, lr=bad)
    if kind is not CGNewton:
        with pytest.raises(ValueError, match="damping must be > 0"):
            kind(model, loss_fn, damping=0.0)
    with pytest.raises(TypeError, match="lr must be a real number"):
        kind(model, loss_fn, lr=True)
    opt = kind(model, loss_fn)
    with pytest.raises(ValueError, match="lr must be > 0"):
        opt.add_param_group({"params": [], "lr": -0.1})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        kind(lambda x: x, loss_fn)
    with pytest.raises(TypeError, match="Unsupported loss"):
        kind(model, nn.L1Loss())


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_cg_newton_alpha_outside_unit_interval(alpha):
    model, loss_fn, _, _ = _problem()
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        CGNewton(model, loss_fn, alpha=alpha)


@pytest.mark.parametrize("variant", ["pch-abs", "pch-clip", "kflr", "kfra"])
def test_cg_newton_pch_and_kronecker_blocks_match_reference(variant):
    from linops.curvature import KFAC, BlockDiagCurvature

    model, loss_fn, X, y = _problem(seed=3)
    ref = _dense(model, loss_fn, X, y)
    if variant.startswith("pch"):
        C = BlockDiagCurvature(model, loss_fn, (X, y), curvature=variant).to_dense()
        kwargs = {"curvature": variant}
    else:
        C = KFAC(model, loss_fn, (X, y), fisher="exact", kfra=variant == "kfra").to_dense()
        kwargs = {"approximation": variant}
    alpha, lr = 0.05, 0.3
    expected = ref["flat"].clone()
    for idx in _slices(ref, BLOCKS["parameter"]):
        A = (1 - alpha) * C[idx][:, idx] + alpha * torch.eye(len(idx), dtype=DT)
        expected[idx] += lr * torch.linalg.solve(A, -ref["g"][idx])
    opt = CGNewton(model, loss_fn, lr=lr, alpha=alpha, cg_tol=1e-13, cg_maxiter=500, **kwargs)
    value, outputs = opt.step((X, y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(value, ref["loss"])
    torch.testing.assert_close(outputs, ref["out"])


def test_cg_newton_options_not_available_yet():
    model, loss_fn, _, _ = _problem()
    with pytest.raises(ValueError, match="block-diagonal by definition.*blocks='parameter'"):
        CGNewton(model, loss_fn, curvature="pch-abs", blocks="full")
    with pytest.raises(ValueError, match="factorizes the GGN.*curvature='ggn'"):
        CGNewton(model, loss_fn, curvature="hessian", approximation="kflr")
    with pytest.raises(ValueError, match="blocks must be one of"):
        CGNewton(model, loss_fn, blocks="kron")
    with pytest.raises(ValueError, match="blocks='full'"):
        CGNewton(model, loss_fn, adapt_damping=True)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        CGNewton(model, loss_fn, alpha=0.0, blocks="full", adapt_damping=True)
    with pytest.raises(ValueError, match="on_failure"):
        CGNewton(model, loss_fn, on_failure="loud")


def test_other_bad_arguments():
    model, loss_fn, X, y = _problem()
    with pytest.raises(ValueError, match="fisher=True"):
        GaussNewton(model, loss_fn, mc_samples=2)
    with pytest.raises(TypeError, match="alg must be an algorithm config"):
        GaussNewton(model, loss_fn, alg=torch.linalg.solve)
    with pytest.raises(ValueError, match="curvature must be 'mc'"):
        DiagGGN(model, loss_fn, curvature="kfac")
    with pytest.raises(ValueError, match="mc_samples applies to curvature='mc'"):
        DiagGGN(model, loss_fn, curvature="exact", mc_samples=3)


@pytest.mark.parametrize("kind", [GaussNewton, CGNewton, DiagGGN])
def test_bad_batches_and_modes(kind, diag_engine):
    model, loss_fn, X, y = _problem()
    opt = kind(model, loss_fn)
    before = _flat(model)
    with pytest.raises(TypeError, match=r"not a closure.*opt.step\(\(X, y\)\)"):
        opt.step(lambda: loss_fn(model(X), y))
    with pytest.raises(TypeError, match="one batch \\(X, y\\).*tuple of length 3"):
        opt.step((X, y, y))
    with pytest.raises(TypeError, match="one batch \\(X, y\\).*Tensor"):
        opt.step(X)
    with pytest.raises(TypeError, match="targets y of the batch must be a tensor"):
        opt.step((X, [0] * 12))
    # parameters not in the model
    other = nn.Linear(3, 4).to(DT)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        kind(model, loss_fn, params=other.parameters())
    with pytest.raises(TypeError, match="not one tensor"):
        kind(model, loss_fn, params=model[0].weight)
    # dropout in training mode
    drop = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 4)).to(DT)
    opt = kind(drop, loss_fn)
    with pytest.raises(ValueError, match=r"training mode with 1 \(Dropout\).*model.eval\(\)"):
        opt.step((X, y))
    # all frozen
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        kind(model, loss_fn, params=list(model.parameters())).step((X, y))
    assert torch.equal(_flat(model), before)


def test_learning_rate_schedulers_drive_the_groups():
    model, loss_fn, X, y = _problem(seed=9)
    opt = GaussNewton(model, loss_fn, lr=1.0, damping=0.1, alg=TIGHT)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step((X, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    ref = _dense(model, loss_fn, X, y)
    opt.step((X, y))
    expected = ref["flat"] - 0.5 * torch.linalg.solve(ref["G"] + 0.1 * torch.eye(44, dtype=DT),
                                                      ref["g"])
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["kfac", "diag-mc", "ekfac"])
def test_gauss_newton_with_a_refreshed_curvature_preconditioner(kind, monkeypatch):
    # every step equals the dense float64 Gauss-Newton step at the current parameters
    # (the preconditioner changes CG's path, not its answer); it is rebuilt at steps 1
    # and 3 (refresh_every=2) and reused, unchanged, at step 2
    import solvers.optim.gauss_newton as gn

    built = []
    real = gn.curvature_preconditioner

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(gn, "curvature_preconditioner", spy)
    model, loss_fn, X, y = _problem()
    opt = GaussNewton(model, loss_fn, lr=0.7, damping=0.1, alg=TIGHT, preconditioner=kind,
                      refresh_every=2, preconditioner_damping=0.3, seed=4)
    refreshed = []
    for _ in range(3):
        ref = _dense(model, loss_fn, X, y)
        expected = ref["flat"] - 0.7 * torch.linalg.solve(
            ref["G"] + 0.1 * torch.eye(44, dtype=DT), ref["g"])
        opt.step((X, y))
        torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)
        refreshed.append(opt.last["preconditioner_refreshed"])
        assert opt.last["converged"]
    assert refreshed == [True, False, True] and len(built) == 2
    assert opt._preconditioner is built[1]


def test_gauss_newton_preconditioner_is_the_one_cg_runs_with():
    # the step's CG runs exactly as CG preconditioned by curvature_preconditioner(C, kind, μ)
    # by hand: the same iterations (unlike unpreconditioned CG) and the same iterate
    model, loss_fn, X, y = _problem(n=40)
    alg = CG(tol=1e-6, max_iters=500)
    C = linops.curvature.GGN(model, loss_fn, (X, y))
    A = C + 1e-3 * linops.I_like(C)
    P = solvers.curvature_preconditioner(C, "kfac", 0.02)
    by_hand = solvers.inv(A, alg=CG(tol=1e-6, max_iters=500, preconditioner=P))
    d = by_hand @ C.gradient
    plain = solvers.inv(A, alg=alg)
    plain @ C.gradient
    flat0 = _flat(model)
    opt = GaussNewton(model, loss_fn, lr=1.0, damping=1e-3, alg=alg, preconditioner="kfac",
                      preconditioner_damping=0.02)
    opt.step((X, y))
    assert opt.last["iterations"] == by_hand.solution.iterations
    assert by_hand.solution.iterations != plain.solution.iterations
    torch.testing.assert_close(_flat(model), flat0 - d, rtol=1e-12, atol=1e-12)


def test_gauss_newton_preconditioner_bad_arguments():
    model, loss_fn, X, y = _problem()
    with pytest.raises(ValueError, match="one of"):
        GaussNewton(model, loss_fn, preconditioner="jacobi")
    with pytest.raises(ValueError, match="takes one"):
        GaussNewton(model, loss_fn, preconditioner="kfac", alg=solvers.Cholesky())
    with pytest.raises(ValueError, match="refresh_every"):
        GaussNewton(model, loss_fn, preconditioner="kfac", refresh_every=0)
    with pytest.raises(ValueError, match="preconditioner_damping"):
        GaussNewton(model, loss_fn, preconditioner="kfac", preconditioner_damping=-1.0)
    with pytest.raises(ValueError, match="pass one of them"):
        GaussNewton(model, loss_fn, preconditioner="kfac",
                    alg=CG(preconditioner=torch.eye(44, dtype=DT)))
    groups = [{"params": list(model[0].parameters()), "damping": 0.05},
              {"params": list(model[2].parameters()), "damping": 0.5}]
    opt = GaussNewton(model, loss_fn, params=groups, preconditioner="diag")
    with pytest.raises(ValueError, match="preconditioner_damping="):
        opt.step((X, y))


def test_gauss_newton_preconditioner_is_rebuilt_when_the_parameters_change():
    # freezing a layer between refreshes: the next step rebuilds the preconditioner for
    # the parameters it steps, and the step is the dense reference's
    model, loss_fn, X, y = _problem()
    opt = GaussNewton(model, loss_fn, lr=0.5, damping=0.1, alg=TIGHT, preconditioner="kfac",
                      refresh_every=5)
    opt.step((X, y))
    model[0].weight.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = _dense(model, loss_fn, X, y, names)
    n = ref["flat"].numel()
    expected = ref["flat"] - 0.5 * torch.linalg.solve(ref["G"] + 0.1 * torch.eye(n, dtype=DT),
                                                      ref["g"])
    opt.step((X, y))
    assert opt.last["preconditioner_refreshed"]
    torch.testing.assert_close(_flat(model, names), expected, rtol=1e-9, atol=1e-11)
