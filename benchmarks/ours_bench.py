"""Our side of the benchmark: linops and a hand-tuned torch.func baseline, in one process.

``run_benchmarks.py`` imports this module and calls ``measure_ours`` in its own process; the
record has the keys of the peers' records (see ``benchmarks/README.md``). Run alone it prints
that record as one JSON line::

    python benchmarks/ours_bench.py [--reps 15] [--threads 2]
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))

from _harness import (  # noqa: E402
    error_text,
    load_problems,
    medians,
    time_round_robin,
    timed_once,
    torch_cg,
)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _torch_func_gn_step(model, loss_fn, X, y, damping, tol, max_iters):
    """Hand-tuned baseline: torch.func jvp + vjp, closed-form softmax Hessian, plain CG.

    One vjp (forward pass kept) per step; each CG product is a forward-mode jvp (which
    re-runs the forward in dual numbers), the softmax cross-entropy Hessian in closed form
    ``(diag(p) − p pᵀ)/N`` per row, and a vjp through the kept graph.
    """
    from torch.func import functional_call, jvp, vjp

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    p0 = _flat(p.detach() for p in model.parameters())
    n = X.shape[0]

    def logits_of(flat):
        pieces = torch.split(flat, sizes)
        return functional_call(model, {nm: t.view(sh) for nm, t, sh in
                                       zip(names, pieces, shapes, strict=True)}, (X,))

    logits, vjp_fn = vjp(logits_of, p0)
    with torch.no_grad():
        probs = logits.softmax(-1)
        onehot = nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
        g = vjp_fn((probs - onehot) / n)[0]

        def matvec(v):
            jv = jvp(logits_of, (p0,), (v,))[1]
            hjv = (probs * jv - probs * (probs * jv).sum(-1, keepdim=True)) / n
            return vjp_fn(hjv)[0] + damping * v

        return torch_cg(matvec, g, tol=tol, max_iters=max_iters)


def _add_linops_contenders(contenders, record, build_ggn, build_hessian, gn_step, cg, auto,
                           v, V):
    """Register our operators' timings; a piece that fails is recorded as its error."""
    G = None
    try:
        G = build_ggn()
        contenders.update({
            "ggn_build": build_ggn,
            "ggn_mv": lambda: G @ v,
            "ggn_mm_k": lambda: G @ V,
            "gn_step": lambda: gn_step(cg),
            "gn_step_auto": lambda: gn_step(auto),
        })
    except Exception as exc:  # noqa: BLE001
        record["ggn_mv"] = "error: " + error_text(exc)
    try:
        H = build_hessian()
        contenders.update({"hessian_build": build_hessian, "hessian_mv": lambda: H @ v})
    except Exception as exc:  # noqa: BLE001
        record["hessian_mv"] = "error: " + error_text(exc)
    return G


def measure_ours(reps: int, warmup: int, k: int, threads: int) -> dict:
    """Our side, in this process: one record with the same keys as the peers'."""
    torch.set_num_threads(threads)
    record: dict = {"peer": "linops", "threads": threads, "reps": reps, "k": k}
    try:
        import linops
        import solvers
        from linops.curvature import GGN, Hessian
    except Exception as exc:  # noqa: BLE001 - a missing piece is reported, not fatal
        record["error"] = "linops.curvature or solvers not importable: " + error_text(exc)
        linops = None
    problems = load_problems()
    setup = problems.GAUSS_NEWTON_SETUP
    model, X, y, loss_fn = problems.reference_problem(setup)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    record["n_params"] = n_params
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n_params, generator=gen)
    V = torch.randn(n_params, k, generator=gen)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    def build_ggn():
        return GGN(model, nn.CrossEntropyLoss(), (X, y))

    def build_hessian():
        return Hessian(model, nn.CrossEntropyLoss(), (X, y))

    def flat_gradient():
        return _flat(torch.autograd.grad(loss_fn(model(X), y), params))

    def gn_step(alg):
        # As an optimizer does it: the operator's own forward pass gives the loss and the
        # gradient (G.gradient, one Jᵀr), so no separate forward and loss.backward().
        G = build_ggn()
        g = G.gradient
        Ainv = solvers.inv(G + setup.gn_damping * linops.I_like(G), alg=alg)
        return Ainv @ g, Ainv

    def gn_step_backward(alg):
        # The same step with its gradient from a separate forward and backward pass.
        g = flat_gradient()
        G = build_ggn()
        Ainv = solvers.inv(G + setup.gn_damping * linops.I_like(G), alg=alg)
        return Ainv @ g, Ainv

    contenders = {"grad": gradient}
    G = None
    if linops is not None:
        cg = solvers.CG(tol=setup.cg_tol, max_iters=setup.cg_max_iters, on_failure="ignore")
        auto = solvers.Auto(tol=setup.cg_tol, max_iters=setup.cg_max_iters,
                            on_failure="ignore")
        G = _add_linops_contenders(contenders, record, build_ggn, build_hessian, gn_step,
                                   cg, auto, v, V)
        if G is not None:
            Ga = GGN(model, nn.CrossEntropyLoss(), (X, y), fast_path=False)
            Ha = Hessian(model, nn.CrossEntropyLoss(), (X, y), fast_path=False)
            contenders.update({
                "gn_step_backward": lambda: gn_step_backward(cg),
                "ggn_mv_autograd": lambda: Ga @ v,
                "hessian_mv_autograd": lambda: Ha @ v,
            })
    contenders["torchfunc_gn_step"] = lambda: _torch_func_gn_step(
        model, loss_fn, X, y, setup.gn_damping, setup.cg_tol, setup.cg_max_iters)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence in 20 iterations is expected
        timed = time_round_robin(contenders, reps=reps, warmup=warmup)
        record.update(medians(timed))
        if G is not None:
            try:
                x, Ainv = gn_step(cg)
                g = flat_gradient()
                r = (G @ x + setup.gn_damping * x) - g
                record["gn_step_relres"] = float(r.norm() / g.norm())
                sol = getattr(Ainv, "solution", None)
                if sol is not None:
                    record["gn_step_iters"] = int(sol.iterations)
                    record["gn_step_status"] = str(sol.status)
            except Exception as exc:  # noqa: BLE001
                record["gn_step_relres"] = "error: " + error_text(exc)
            try:
                value, seconds = timed_once(lambda: solvers.eigmax(
                    G, alg=solvers.Lanczos(tol=setup.eigmax_tol)))
                record["eigmax"], record["eigmax_time"] = float(value), seconds
            except Exception as exc:  # noqa: BLE001
                record["eigmax"] = "error: " + error_text(exc)
        _, tf_iters, tf_relres = _torch_func_gn_step(
            model, loss_fn, X, y, setup.gn_damping, setup.cg_tol, setup.cg_max_iters)
        record["torchfunc_gn_step_iters"], record["torchfunc_gn_step_relres"] = (
            tf_iters, tf_relres)
    return record


# ------------------------------------------------------------------ the dense reference
def dense_top_eigenvalues(count: int = 4) -> list[float]:
    """Largest eigenvalues of the reference GGN, exactly, in float64.

    GGN = Σₙ Jₙᵀ Hₙ Jₙ with Jₙ the 5 × 41805 Jacobian of sample n's logits and
    Hₙ = (diag(pₙ) − pₙpₙᵀ)/N. With Hₙ = LₙLₙᵀ and B the 2500 × 41805 stack of LₙᵀJₙ,
    GGN = BᵀB shares its non-zero eigenvalues with the 2500 × 2500 matrix BBᵀ.
    """
    from torch.func import functional_call, jacrev, vmap

    problems = load_problems()
    model, X, y, _ = problems.reference_problem(dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def logits_one(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(logits_one), in_dims=(None, 0))(params, X)
    J = torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in jac.values()], dim=2)
    probs = functional_call(model, params, (X,)).softmax(-1)
    H = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]) / X.shape[0]
    evals, evecs = torch.linalg.eigh(H)
    L = evecs * evals.clamp_min(0).sqrt()[:, None, :]
    B = torch.einsum("nck,ncp->nkp", L, J).reshape(-1, J.shape[2])
    top = torch.linalg.eigvalsh(B @ B.T).flip(0)[:count]
    return [float(t) for t in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dense", action="store_true", help="also the exact eigenvalues")
    args = parser.parse_args()
    record = measure_ours(args.reps, args.warmup, args.k, args.threads)
    if args.dense:
        record["dense_top_eigenvalues"] = dense_top_eigenvalues()
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
