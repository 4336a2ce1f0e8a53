"""A user registers solver rules for their own operator type on linops' dispatcher."""

import torch

import linops
import solvers
from linops import LinearOperator, dispatch


class Doubling(LinearOperator):
    def __init__(self, n):
        super().__init__(torch.float64, (n, n))

    def _matmat(self, X):
        return 2 * X


@dispatch
def psd_rule(A: Doubling) -> bool:
    return True


@dispatch
def inv_rule(A: Doubling, alg: object):
    return 0.5 * linops.I_like(A)


def test_user_rules_are_used():
    A = Doubling(4)
    assert linops.is_psd(A) and linops.is_self_adjoint(A)
    Ainv = solvers.inv(A)
    assert isinstance(Ainv, linops.ScalarMul)  # the user's rule, not a generic solve
    b = torch.arange(4.0, dtype=torch.float64)
    torch.testing.assert_close(Ainv @ b, b / 2)
    # the generic functions see the user's PSD rule: CG runs on it under Auto
    assert type(solvers.Auto(dense_threshold=0).select(A)).__name__ == "CG"
    torch.testing.assert_close(solvers.eigmax(A, alg=solvers.Lanczos()), torch.tensor(2.0,
                               dtype=torch.float64))
