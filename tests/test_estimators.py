"""Trace and diagonal estimators (Hutchinson, Hutch++, XTrace, XDiag): their records
(standard error, products), exactness where theory says so, accuracy against float64
references, and the budget and input errors."""

import numpy as np
import pytest
import torch
from _helpers import F64, randn, spectrum_matrix

import solvers
from linops import PSD, Dense, LinearOperator, SelfAdjoint
from solvers import Estimate, Hutchinson, HutchPP, XDiag, XTrace, diag, trace


class Opaque(LinearOperator):
    """A dense matrix behind a bare ``_matmat`` (no cheap diagonal); counts the columns it
    multiplies in ``.count[0]`` (shared with the tagged copies PSD(...) makes)."""

    def __init__(self, M):
        super().__init__(M.dtype, M.shape, M.device)
        self.M, self.count = M, [0]

    @property
    def products(self):
        return self.count[0]

    def _matmat(self, X):
        self.count[0] += X.shape[1]
        return self.M @ X


def decaying(n=400, rate=0.9, seed=0):
    return spectrum_matrix(rate ** torch.arange(n, dtype=F64), seed)


# ------------------------------------------------------------------ records
@pytest.mark.parametrize("alg", [Hutchinson(samples=40), HutchPP(samples=40), XTrace(samples=40)],
                         ids=["hutchinson", "hutchpp", "xtrace"])
def test_trace_estimates_carry_their_record(alg):
    M = decaying()
    op = Opaque(M)
    t = trace(PSD(op), alg)
    rec = t.estimate
    assert isinstance(rec, Estimate) and rec.algorithm is alg
    assert rec.products == 40 == op.products
    assert float(rec.std_error) > 0 and torch.equal(rec.value, t)
    assert abs(float(t) - float(M.trace())) <= 5 * float(rec.std_error)


@pytest.mark.parametrize("alg", [Hutchinson(samples=40), XDiag(samples=40)], ids=["hutch", "xdiag"])
def test_diag_estimates_carry_per_entry_errors(alg):
    M = decaying()
    op = Opaque(M)
    d = diag(PSD(op), alg)
    rec = d.estimate
    assert tuple(rec.std_error.shape) == (400,) and rec.products == 40 == op.products
    z = (d - M.diagonal()) / rec.std_error
    assert float((z.abs() <= 3).double().mean()) >= 0.9  # calibrated errors


def test_exact_structure_gives_a_zero_error_record():
    t = trace(Dense(torch.eye(3, dtype=F64)), XTrace(samples=4))
    assert float(t) == 3.0 and t.estimate.products == 0 and float(t.estimate.std_error) == 0


def test_sums_and_scalars_combine_the_records():
    M = decaying()
    A = PSD(Opaque(M))
    t = trace(2.0 * A + Dense(torch.eye(400, dtype=F64)), XTrace(samples=40))
    one = trace(A, XTrace(samples=40))
    assert abs(float(t) - (2 * float(one) + 400)) < 1e-9
    assert t.estimate.products == 40
    assert abs(float(t.estimate.std_error) - 2 * float(one.estimate.std_error)) < 1e-12


# ------------------------------------------------------------------ exactness
def test_xtrace_and_xdiag_are_exact_below_their_rank():
    U = randn(300, 6, seed=3)
    M = U @ U.T
    t = trace(PSD(Opaque(M)), XTrace(samples=20, seed=1))
    assert abs(float(t) - float(M.trace())) < 1e-9 * float(M.trace())
    d = diag(PSD(Opaque(M)), XDiag(samples=20, seed=1))
    assert float((d - M.diagonal()).abs().max()) < 1e-9 * float(M.diagonal().abs().max())


def _first_block(op):
    """Wrap ``op._matmat`` so that the first block it multiplies (the test vectors Ω) is kept."""
    seen, inner = [], op._matmat
    op._matmat = lambda X: (seen.append(X.clone()) if not seen else None, inner(X))[1]
    return seen


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
def test_xtrace_and_xdiag_follow_their_definition(symmetric):
    """The O(n m²) downdates against the paper's definition computed one test vector at a
    time: Qᵢ = orth(A Ω₋ᵢ); XTrace tᵢ = tr(Qᵢᵀ A Qᵢ) + ω̂ᵢᵀ A ω̂ᵢ with ω̂ᵢ = (I − QᵢQᵢᵀ)ωᵢ
    scaled to length √(n − m + 1) and ‖ωᵢ‖ = √n; XDiag dᵢ = diag(QᵢQᵢᵀ A) + ωᵢ ⊙ (I − QᵢQᵢᵀ)
    A ωᵢ with ±1 entries; estimate mean(tᵢ), standard error std(tᵢ)/√m."""
    n, m = 60, 8
    M = decaying(n=n, rate=0.7, seed=4)
    if not symmetric:
        M = M + 0.1 * randn(n, n, seed=6) @ torch.diag(0.7 ** torch.arange(n, dtype=F64))
    ests = {}
    for name, alg in (("xt", XTrace(2 * m, seed=3)), ("xd", XDiag(2 * m, seed=3))):
        op = Opaque(M)
        seen = _first_block(op)
        A = SelfAdjoint(op) if name == "xd" else op
        ests[name] = (trace if name == "xt" else diag)(A, alg).estimate
        Om = seen[0]
        if name == "xt":
            assert torch.allclose(Om.norm(dim=0), torch.full((m,), n ** 0.5, dtype=F64))
        else:
            assert bool((Om.abs() == 1).all())
        Y, terms = M @ Om, []
        for i in range(m):
            Qi = torch.linalg.qr(Y[:, [j for j in range(m) if j != i]]).Q
            w = Om[:, i]
            r = w - Qi @ (Qi.T @ w)
            if name == "xt":
                r = r * (n - m + 1) ** 0.5 / r.norm()
                terms.append((Qi * (M @ Qi)).sum() + r @ M @ r)
            else:
                terms.append(((Qi @ Qi.T) * M.T).sum(1) + w * (M @ w - Qi @ (Qi.T @ (M @ w))))
        T = torch.stack(terms, -1)
        rec = ests[name]
        assert torch.allclose(rec.value, T.mean(-1), rtol=1e-10, atol=1e-12), name
        assert torch.allclose(rec.std_error, T.std(-1) / m ** 0.5, rtol=1e-8, atol=1e-12), name
        if not symmetric:
            break  # XDiag needs a self-adjoint A


def test_xtrace_full_budget_is_exact():
    M = spectrum_matrix(torch.linspace(-1, 3, 30, dtype=F64), seed=2)
    t = trace(SelfAdjoint(Opaque(M)), XTrace(samples=60))
    assert abs(float(t) - float(M.trace())) < 1e-9


def test_xtrace_works_for_a_non_symmetric_matrix():
    M = randn(200, 200, seed=5) @ torch.diag(0.8 ** torch.arange(200, dtype=F64))
    errs = [abs(float(trace(Opaque(M), XTrace(samples=60, seed=s))) - float(M.trace()))
            for s in range(10)]
    hut = [abs(float(trace(Opaque(M), Hutchinson(samples=60, seed=s))) - float(M.trace()))
           for s in range(10)]
    assert np.mean(errs) < np.mean(hut) / 3


# ------------------------------------------------------------------ accuracy over seeds
def test_xtrace_beats_hutchpp_and_hutchinson_on_a_decaying_spectrum():
    M = decaying(rate=0.9)  # measured: XTrace 6× below Hutch++, 60× below Hutchinson
    ref = float(M.trace())
    err = {name: [] for name in ("hutch", "hpp", "xt")}
    for s in range(50):
        err["hutch"].append(abs(float(trace(PSD(Opaque(M)), Hutchinson(100, seed=s))) - ref))
        err["hpp"].append(abs(float(trace(PSD(Opaque(M)), HutchPP(100, seed=s))) - ref))
        err["xt"].append(abs(float(trace(PSD(Opaque(M)), XTrace(100, seed=s))) - ref))
    m = {k: np.mean(v) for k, v in err.items()}
    assert m["xt"] <= m["hpp"] and m["xt"] * 20 <= m["hutch"]


def _errors_over_seeds(M, seeds, estimators=("hutch", "hpp", "xt")):
    """Mean absolute trace error of each estimator at 100 products over ``seeds``."""
    ref, A = float(M.trace()), SelfAdjoint(Opaque(M))
    make = {"hutch": lambda s: Hutchinson(100, batch=100, seed=s),
            "hpp": lambda s: HutchPP(100, seed=s), "xt": lambda s: XTrace(100, seed=s)}
    return {k: float(np.mean([abs(float(trace(A, make[k](s))) - ref) for s in seeds]))
            for k in estimators}


#: The network of the issue's target: the tanh MLP 2 → 20 → 20 → 3 (543 parameters) on three
#: spirals of 21 points after 100 full-batch Adam steps (cross-entropy 0.14). Measured over
#: seeds 0–49 at 100 products: Hessian, Hutchinson / XTrace 39.6×, Hutch++ / XTrace 1.60×;
#: GGN 1.6e4× and 13×. Network seeds 1 and 2 give 55× and 57× on the Hessian; the Hessians at
#: initialization and of 10-D Gaussian inputs miss 20× (benchmarks/README.md, `--trace`).
SPIRALS_TRAINED = dict(hidden=20, data="spirals", train_steps=100)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_xtrace_on_a_network_over_50_seeds(curvature):
    """The issue's target, on dense float64 matrices from torch.func: at 100 products over
    seeds 0–49, XTrace's mean error ≤ Hutch++'s and ≥ 20× below Hutchinson's."""
    from _spectral_nets import small_network

    net = small_network(**SPIRALS_TRAINED)
    m = _errors_over_seeds(net["G" if curvature == "ggn" else "H"], range(50))
    assert m["xt"] <= m["hpp"], m
    assert m["xt"] * 20 <= m["hutch"], m


def test_xtrace_gains_nothing_without_spectral_decay():
    """The target's check can fail: the same network's Hessian at initialization, whose
    indefinite bulk carries most of its Frobenius norm (the top 50 of 543 eigenvalues hold
    81 % of ‖H‖_F²), leaves XTrace within 3× of Hutchinson (measured 1.5×)."""
    from _spectral_nets import small_network

    net = small_network(**{**SPIRALS_TRAINED, "train_steps": 0})
    m = _errors_over_seeds(net["H"], range(20), ("hutch", "xt"))
    assert m["hutch"] < 3 * m["xt"], m


def test_xdiag_beats_hutchinson_diag_on_a_decaying_spectrum():
    M = decaying(rate=0.9)
    ref = M.diagonal()
    ex = np.mean([float((diag(PSD(Opaque(M)), XDiag(100, seed=s)) - ref).norm())
                  for s in range(10)])
    eh = np.mean([float((diag(PSD(Opaque(M)), Hutchinson(100, seed=s)) - ref).norm())
                  for s in range(10)])
    assert ex * 5 <= eh


def test_half_precision_estimates_run_in_float32():
    M = decaying().to(torch.bfloat16)
    t = trace(PSD(Opaque(M)), XTrace(samples=40))
    assert t.dtype == torch.bfloat16
    assert abs(float(t) - float(M.double().trace())) < 0.1 * float(M.double().trace())


# ------------------------------------------------------------------ budgets and misuse
def test_budgets_smaller_than_needed_are_errors():
    for bad, match in ((lambda: Hutchinson(samples=1), "needs"),
                       (lambda: HutchPP(samples=3), "needs"),
                       (lambda: XTrace(samples=2), "needs"),
                       (lambda: XTrace(samples=7), "even"),
                       (lambda: XDiag(samples=3), "needs"),
                       (lambda: XTrace(samples=0), "needs")):
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(TypeError):
        XTrace(samples=10.0)
    with pytest.raises(ValueError, match="exceed the size"):
        trace(PSD(Opaque(decaying(n=10))), XTrace(samples=40))


def test_wrong_estimator_and_non_self_adjoint_are_errors():
    M = randn(20, 20)
    with pytest.raises(ValueError, match="self-adjoint"):
        diag(Opaque(M), XDiag(samples=10))
    with pytest.raises(TypeError, match="trace cannot run XDiag"):
        trace(Opaque(M), XDiag(samples=10))
    with pytest.raises(TypeError, match="diag cannot run XTrace"):
        diag(Opaque(M), XTrace(samples=10))
    assert solvers.estimators.XTrace is XTrace  # the old import path still works
    from solvers.estimators import hutchinson_trace  # noqa: F401
