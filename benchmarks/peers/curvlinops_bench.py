"""curvlinops (and BackPACK's Hessian-free products) on the reference problem.

Runs in ``benchmarks/.envs/peers``. curvlinops: ``GGNLinearOperator`` and
``HessianLinearOperator`` over the full batch ``[(X, y)]``, built with
``check_deterministic=False`` for the timed figures (its default, ``True``, runs extra
passes at every construction; ``ggn_build_checked`` times that). curvlinops has no damped
solve of its own that takes our stopping rule (its ``CGInverseLinearOperator`` wraps
GPyTorch's ``linear_cg``, whose tolerance is defined differently), so its Gauss-Newton step
is: gradient, operator, then the plain torch CG of ``_harness.torch_cg`` on
``v ↦ G v + λ v`` with ``‖r‖ ≤ 1e-3‖g‖`` and at most 20 iterations, the rule of the notebook.

BackPACK: ``ggn_vector_product_from_plist`` on a kept forward graph (R-op, loss Hessian,
L-op by double backward); ``backpack_ggn_build`` is the forward pass it needs.

Prints one JSON line. Usage::

    benchmarks/.envs/peers/bin/python benchmarks/peers/curvlinops_bench.py [--reps 7]
"""

import importlib.metadata

import torch
from _harness import (
    emit,
    error_text,
    load_problems,
    medians,
    peer_args,
    time_round_robin,
    timed_once,
    torch_cg,
)


def main() -> None:
    args = peer_args(__doc__)

    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    problems = load_problems()
    setup = problems.GAUSS_NEWTON_SETUP
    model, X, y, loss_fn = problems.reference_problem(setup)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    data = [(X, y)]

    def build_ggn(check=False):
        return GGNLinearOperator(model, loss_fn, params, data, check_deterministic=check)

    def build_hessian(check=False):
        return HessianLinearOperator(model, loss_fn, params, data, check_deterministic=check)

    def flat_gradient():
        loss = loss_fn(model(X), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    def gn_step():
        g = flat_gradient()
        G = build_ggn()
        x, iters, relres = torch_cg(lambda v: G @ v + setup.gn_damping * v, g,
                                    tol=setup.cg_tol, max_iters=setup.cg_max_iters)
        return x, iters, relres

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n_params, generator=gen)
    V = torch.randn(n_params, args.k, generator=gen)
    G = build_ggn()

    contenders = {
        "grad": gradient,
        "ggn_build": build_ggn,
        "ggn_mv": lambda: G @ v,
        "ggn_mm_k": lambda: G @ V,
        "gn_step": gn_step,
    }
    try:
        H = build_hessian()
        contenders["hessian_mv"] = lambda: H @ v
    except Exception as exc:  # noqa: BLE001
        hessian_error = error_text(exc)
    else:
        hessian_error = None

    # BackPACK: a kept graph, products by double backward.
    v_list = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]),
                                           params, strict=True)]
    holder = {}

    def backpack_build():
        output = model(X)
        holder["output"], holder["loss"] = output, loss_fn(output, y)

    backpack_build()
    contenders["backpack_ggn_build"] = backpack_build
    contenders["backpack_ggn_mv"] = lambda: ggn_vector_product_from_plist(
        holder["loss"], holder["output"], params, v_list)

    timed = time_round_robin(contenders, reps=args.reps, warmup=args.warmup)
    record = {
        "peer": "curvlinops",
        "versions": {name: importlib.metadata.version(name) for name in
                     ("curvlinops-for-pytorch", "backpack-for-pytorch", "torch")},
        "threads": args.threads, "reps": args.reps, "k": args.k, "n_params": n_params,
    }
    record.update(medians(timed))
    if hessian_error is not None:
        record["hessian_mv"] = "error: " + hessian_error

    # Construction with curvlinops' default determinism checks (few repetitions: slow).
    checked = time_round_robin({"ggn_build_checked": lambda: build_ggn(check=True)},
                               reps=3, warmup=0)
    record.update(medians(checked))

    try:
        _, iters, relres = gn_step()
        record["gn_step_iters"], record["gn_step_relres"] = iters, relres
    except Exception as exc:  # noqa: BLE001
        record["gn_step_iters"] = "error: " + error_text(exc)

    # Largest eigenvalue through scipy's ARPACK on curvlinops' scipy export (for reference).
    try:
        from scipy.sparse.linalg import eigsh

        with torch.no_grad():
            value, seconds = timed_once(
                lambda: eigsh(G.to_scipy(), k=1, which="LA", tol=setup.eigmax_tol)[0][0])
        record["eigmax_scipy_eigsh"], record["eigmax_scipy_eigsh_time"] = float(value), seconds
    except Exception as exc:  # noqa: BLE001
        record["eigmax_scipy_eigsh"] = "error: " + error_text(exc)
    emit(record)


if __name__ == "__main__":
    main()
