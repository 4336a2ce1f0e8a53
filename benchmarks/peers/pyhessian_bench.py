"""PyHessian on the reference problem; runs in ``benchmarks/.envs/peers``.

PyHessian's ``hessian(model, criterion, data=(X, y), cuda=False)`` runs one forward and one
``backward(create_graph=True)`` when built (``hessian_build``); each Hessian-vector product
is then one more backward through that gradient graph (``hessian_mv``, through
``pyhessian.utils.hessian_vector_product``). Its spectral tools are timed once:
``eigenvalues(top_n=1)`` (power iteration, relative change of the Rayleigh quotient below
``tol``) and ``trace()`` (Hutchinson with Rademacher vectors, stops when the running mean
changes by less than ``tol`` relative). Both use torch's global random generator, seeded
here with 0.

Prints one JSON line. Usage::

    benchmarks/.envs/peers/bin/python benchmarks/peers/pyhessian_bench.py [--reps 7]
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
)


def main() -> None:
    args = peer_args(__doc__, tol=(float, 1e-3, "tolerance of PyHessian's eigenvalue and "
                                               "trace loops"))

    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    problems = load_problems()
    model, X, y, loss_fn = problems.reference_problem()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)

    def build():
        model.zero_grad(set_to_none=True)
        return hessian(model, loss_fn, data=(X, y), cuda=False)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n_params, generator=gen)
    v_list = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]),
                                           params, strict=True)]
    comp = build()
    record = {"peer": "pyhessian",
              "versions": {name: importlib.metadata.version(name) for name in
                           ("PyHessian", "torch")},
              "threads": args.threads, "reps": args.reps, "n_params": n_params}
    timed = time_round_robin(
        {"grad": gradient, "hessian_build": build,
         "hessian_mv": lambda: hessian_vector_product(comp.gradsH, comp.params, v_list)},
        reps=args.reps, warmup=args.warmup)
    record.update(medians(timed))

    comp = build()
    torch.manual_seed(0)
    try:
        (values, _), seconds = timed_once(lambda: comp.eigenvalues(top_n=1, tol=args.tol))
        record["hessian_eigmax"], record["hessian_eigmax_time"] = float(values[0]), seconds
    except Exception as exc:  # noqa: BLE001
        record["hessian_eigmax"] = "error: " + error_text(exc)
    try:
        estimates, seconds = timed_once(lambda: comp.trace(tol=args.tol))
        record["hessian_trace"] = float(sum(estimates) / len(estimates))
        record["hessian_trace_samples"], record["hessian_trace_time"] = len(estimates), seconds
    except Exception as exc:  # noqa: BLE001
        record["hessian_trace"] = "error: " + error_text(exc)
    emit(record)


if __name__ == "__main__":
    main()
