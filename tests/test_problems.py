"""The reference problem: the data and networks of CoLA's Gauss-Newton notebook."""

import numpy as np
import pytest
import torch

from solvers.problems import (
    GAUSS_NEWTON_SETUP,
    make_mlp,
    make_spirals,
    notebook_models,
    reference_problem,
)


def test_spirals_follow_the_formula_and_the_legacy_stream():
    n, C, noise = 7, 3, 0.1
    X, y = make_spirals(n_per_class=n, n_classes=C, noise=noise, seed=5)
    rng = np.random.RandomState(5)
    radius = np.linspace(0.0, 1.0, n)
    for c in range(C):
        angle = np.linspace(c * 4 * np.pi / C, (c + 1) * 4 * np.pi / C, n) + noise * rng.randn(n)
        expected = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
        np.testing.assert_allclose(X[c * n:(c + 1) * n].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [c for c in range(C) for _ in range(n)]


def test_int_seed_equals_global_seed_and_leaves_global_state_alone():
    np.random.seed(0)
    X_global, _ = make_spirals(seed=None)
    state = np.random.get_state()
    X_private, _ = make_spirals(seed=0)
    assert torch.equal(X_global, X_private)
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_mlp_size_reproducibility_and_isolation():
    before = torch.random.get_rng_state()
    a, b = make_mlp(seed=0), make_mlp(seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert sum(p.numel() for p in a.parameters()) == 41805
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, make_mlp(seed=1)[0].weight)
    assert isinstance(a[1], torch.nn.SiLU) and a(torch.zeros(4, 2)).shape == (4, 5)


def test_notebook_models_are_the_first_two_draws():
    first, second = notebook_models()
    torch.manual_seed(GAUSS_NEWTON_SETUP.torch_seed)
    m1, m2 = make_mlp(seed=None), make_mlp(seed=None)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), m1.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(second.parameters(), m2.parameters()))
    assert not torch.equal(first[0].weight, second[0].weight)


def test_reference_problem_is_make_mlp_seed_0():
    model, X, y, loss_fn = reference_problem()
    assert X.shape == (500, 2) and y.shape == (500,)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), make_mlp(seed=0).parameters()))
    assert reference_problem(dtype=torch.float64).X.dtype == torch.float64


@pytest.mark.parametrize("kwargs, error", [
    (dict(n_per_class=0), ValueError), (dict(n_classes=2.5), ValueError),
    (dict(noise=-0.1), ValueError), (dict(noise=float("nan")), ValueError),
    (dict(seed=np.random.default_rng(0)), TypeError), (dict(seed=-1), ValueError),
])
def test_spirals_bad_input(kwargs, error):
    with pytest.raises(error):
        make_spirals(**kwargs)


def test_mlp_bad_input():
    with pytest.raises(ValueError):
        make_mlp(hidden=0)
    with pytest.raises(TypeError):
        make_mlp(seed=1.5)
