"""BackPACK's KFAC/KFLR and curvlinops' KFACLinearOperator on the reference CNN (issue 8).

Runs in ``benchmarks/.envs/peers``; builds the CNN and batch of
``backpack_quantities.make_problem("cnn")`` (same seed, same tensors as our side). Times,
interleaved (``_harness.time_round_robin``): ``grad`` (a plain forward + backward, the
unit), BackPACK's ``KFAC(mc_samples=1)`` and ``KFLR()`` (forward + backward inside
``with backpack(...)``), curvlinops' ``KFACLinearOperator`` built with ``fisher_type="mc"``
and ``"type-2"`` (its exact Fisher, KFLR), and a product with curvlinops' inverse (damping
1e-3). Prints one JSON line of medians (seconds).

    benchmarks/.envs/peers/bin/python benchmarks/peers/kfac_peers.py [--reps 5]
"""

import copy
import importlib.util
from pathlib import Path

import torch
from _harness import emit, medians, peer_args, time_round_robin

HERE = Path(__file__).resolve().parent


def _problem():
    spec = importlib.util.spec_from_file_location("bq", HERE / "backpack_quantities.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_problem("cnn")


def main():
    args = peer_args(__doc__)
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    model, X, y, loss_fn = _problem()
    plain = copy.deepcopy(model)
    ext_model, ext_loss = extend(model), extend(copy.deepcopy(loss_fn))
    params = [p for p in plain.parameters() if p.requires_grad]

    def grad():
        plain.zero_grad()
        loss_fn(plain(X), y).backward()

    def bp(ext):
        def run():
            ext_model.zero_grad()
            with backpack(ext):
                ext_loss(ext_model(X), y).backward()
        return run

    def cl(fisher):
        def run():
            K = KFACLinearOperator(plain, loss_fn, params, [(X, y)], fisher_type=fisher,
                                   mc_samples=1, check_deterministic=False)
            K.compute_kronecker_factors() if hasattr(K, "compute_kronecker_factors") else None
            return K
        return run

    K = cl("mc")()
    Kinv = KFACInverseLinearOperator(K, damping=1e-3)
    v = torch.randn(sum(p.numel() for p in params))

    timed = time_round_robin({
        "grad": grad, "backpack_kfac": bp(KFAC(mc_samples=1)), "backpack_kflr": bp(KFLR()),
        "curvlinops_kfac": cl("mc"), "curvlinops_kflr": cl("type-2"),
        "curvlinops_inverse_product": lambda: Kinv @ v,
    }, reps=args.reps, warmup=args.warmup)
    emit({"seconds": medians(timed)})


if __name__ == "__main__":
    main()
