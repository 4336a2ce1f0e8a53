"""Non-convergence warnings point at the user's line, not at library internals."""

import warnings

import torch

import linops
import solvers
from solvers.result import NotConvergedWarning


def _warned_here(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    ours = [w for w in caught if issubclass(w.category, NotConvergedWarning)]
    assert ours, "expected a NotConvergedWarning"
    return {w.filename for w in ours}


def test_warnings_point_at_the_caller():
    A = linops.PSD(linops.Dense(torch.diag(torch.arange(1.0, 50.0, dtype=torch.float64))))
    b = torch.ones(49, dtype=torch.float64)
    for fn in (
        lambda: solvers.inv(A, alg=solvers.CG(max_iters=2)) @ b,
        lambda: solvers.eigmax(A, alg=solvers.Lanczos(max_iters=2)),
        lambda: solvers.solve(A, b, alg=solvers.MINRES(max_iters=2)),
    ):
        assert _warned_here(fn) == {__file__}
