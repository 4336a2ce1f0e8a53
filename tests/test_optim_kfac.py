"""``solvers.optim.KFAC`` against a hand-written float64 reference of the same update."""

import copy

import pytest
import torch
from torch import nn

from linops.curvature import KFAC as KFACOperator
from solvers.optim import KFAC

F64 = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    batches = [(torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))) for _ in range(3)]
    return model, nn.CrossEntropyLoss(), batches


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _set(model, vec):
    with torch.no_grad():
        i = 0
        for p in model.parameters():
            p.copy_(vec[i:i + p.numel()].view_as(p))
            i += p.numel()


@pytest.mark.parametrize("kind", ["exact", "pi"])
def test_steps_equal_the_reference_with_a_cached_inverse(kind):
    model, loss_fn, batches = _setup()
    ref = copy.deepcopy(model)
    lr, lam = 0.5, 1e-2
    opt = KFAC(model, loss_fn, lr=lr, damping=lam, update_every=2, fisher="exact",
               damping_kind=kind)
    K = None
    for t, (X, y) in enumerate(batches, start=1):
        if t % 2 == 1:  # steps 1 and 3 refresh
            K = KFACOperator(ref, loss_fn, (X, y), fisher="exact").damped(lam, kind).to_dense()
        value = loss_fn(ref(X), y)
        g = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(value, ref.parameters())])
        expected = _flat(ref) - lr * torch.linalg.solve(K, g)
        loss, out = opt.step((X, y))
        torch.testing.assert_close(loss, value.detach())
        torch.testing.assert_close(out, ref(X).detach())
        assert opt.last["refreshed"] == (t % 2 == 1)
        torch.testing.assert_close(_flat(model), expected, rtol=1e-10, atol=1e-12)
        _set(ref, expected)


def test_state_dict_round_trip_refreshes_and_bad_input():
    model, loss_fn, batches = _setup()
    opt = KFAC(model, loss_fn, lr=0.1, update_every=5, fisher="mc", seed=0)
    opt.step(batches[0])
    opt.step(batches[1])
    assert opt.last["refreshed"] is False
    state = opt.state_dict()
    opt2 = KFAC(model, loss_fn, lr=0.1, update_every=5, fisher="mc", seed=0)
    opt2.load_state_dict(state)
    assert opt2.steps == 2
    opt2.step(batches[2])
    assert opt2.last["refreshed"] is True
    with pytest.raises(ValueError, match="update_every must be a positive integer"):
        KFAC(model, loss_fn, update_every=0)
    with pytest.raises(ValueError, match="damping_kind must be 'exact' or 'pi'"):
        KFAC(model, loss_fn, damping_kind="trace")
    with pytest.raises(ValueError, match="fisher must be one of"):
        KFAC(model, loss_fn, fisher="ggn")
    with pytest.raises(ValueError, match="damping"):
        KFAC(model, loss_fn, damping=0.0)


def test_pi_damping_in_float32_with_small_damping():
    """The π-damped explicit inverse in float32 at damping 1e-4 (factors near singular up to
    the damping): no false alarm from the inverse's check, and the step equals the float64
    one to float32 accuracy; a NaN factor raises instead of stepping."""
    torch.manual_seed(0)
    model64 = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)
    model32 = copy.deepcopy(model64).float()
    X = torch.randn(64, 4, dtype=F64)
    y = torch.randint(0, 3, (64,))
    steps = {}
    for name, model, Xd in (("f64", model64, X), ("f32", model32, X.float())):
        before = _flat(model).double()
        KFAC(model, nn.CrossEntropyLoss(), lr=0.1, damping=1e-4, fisher="exact",
             damping_kind="pi").step((Xd, y))
        steps[name] = _flat(model).double() - before
    torch.testing.assert_close(steps["f32"], steps["f64"], rtol=2e-3,
                               atol=2e-3 * float(steps["f64"].abs().max()))
    from solvers.curvature_preconditioners import spd_inverse as _spd_inverse

    with pytest.raises(FloatingPointError, match="positive definite"):
        _spd_inverse(torch.full((3, 3), float("nan")))
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    ill = Q @ torch.diag(torch.logspace(0, -6, 6, dtype=F64)) @ Q.T
    assert _spd_inverse(ill) is not None  # fine in float64
    assert _spd_inverse(ill.float()) is None  # κ = 1e6: a float32 inverse would be noise
    well = (Q @ torch.diag(torch.logspace(0, -2, 6, dtype=F64)) @ Q.T)
    got = _spd_inverse(well.float())  # κ = 100: the float32 Cholesky inverse, accurate
    assert got.dtype == torch.float32
    c = torch.randn(6, dtype=F64)
    want = torch.linalg.solve(well, c)
    assert float((got @ c.float() - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # ... so that factor is solved with instead, as the generic inverse does
    import linops
    from solvers.curvature_preconditioners import inverse_factor as _inverse_factor

    F = linops.PSD(linops.Dense(ill.float()))
    b = torch.randn(6)
    torch.testing.assert_close(_inverse_factor(F) @ b,
                               torch.linalg.solve(ill, b.double()).float(), rtol=0.05,
                               atol=0.05 * float(torch.linalg.solve(ill, b.double()).abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_are_inverted_in_float64(dtype):
    from solvers.curvature_preconditioners import spd_inverse

    Q = torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0]
    M = Q @ torch.diag(torch.linspace(1, 2, 5, dtype=F64)) @ Q.T
    got = spd_inverse(M.to(dtype))  # (no Cholesky in half precision: float64, then cast)
    assert got is not None and got.dtype == dtype
    c = torch.randn(5, dtype=F64)
    want = torch.linalg.solve(M, c)
    assert float((got @ c.to(dtype)).double().sub(want).abs().max()) <= 0.05 * float(
        want.abs().max())
