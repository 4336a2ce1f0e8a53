"""PyHessian and curvlinops on the spectral benchmarks; runs in ``benchmarks/.envs/peers``.

Reads the problem the driver saved (``torch.save``: the model itself, X, y, its name) from
``--problem``. PyHessian: ``hessian(model, criterion, data=(X, y))``, then
``eigenvalues(top_n=1)`` at its default tolerance (power iteration, stops when the Rayleigh
quotient changes by less than 1e-3 relative, at most 100 iterations) with its Hessian-vector
products counted, and ``density(iter=60, n_v=3)`` (its SLQ, timed or its error reported).
curvlinops: ``HessianLinearOperator`` exported to scipy and ``eigsh(k=1, which='LA',
tol=1e-3)`` with its products counted. Torch's global generator is seeded with 0.

Prints one JSON line. Usage::

    benchmarks/.envs/peers/bin/python benchmarks/peers/spectral_peers.py --problem FILE
"""

import importlib.metadata
import time

import torch
from _harness import emit, error_text, peer_args


def main() -> None:
    args = peer_args(__doc__, problem=(str, "", "file the driver saved with torch.save"))
    saved = torch.load(args.problem, weights_only=False)
    model, X, y = saved["model"], saved["X"], saved["y"]
    loss_fn = torch.nn.CrossEntropyLoss()
    record = {"peer": "spectral_peers", "problem": saved["name"],
              "versions": {n: importlib.metadata.version(n) for n in
                           ("PyHessian", "curvlinops-for-pytorch", "torch")}}

    ph = importlib.import_module("pyhessian.hessian")  # the module (its class shadows it)

    counted = {"n": 0}
    original = ph.hessian_vector_product

    def counting(gradsH, params, v):
        counted["n"] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counting
    torch.manual_seed(0)
    try:
        comp = ph.hessian(model, loss_fn, data=(X, y), cuda=False)
        start = time.perf_counter()
        values, _ = comp.eigenvalues(top_n=1)
        record["pyhessian_eigmax"] = float(values[0])
        record["pyhessian_eigmax_products"] = counted["n"]
        record["pyhessian_eigmax_time"] = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        record["pyhessian_eigmax"] = "error: " + error_text(exc)
    try:
        counted["n"] = 0
        start = time.perf_counter()
        comp.density(iter=60, n_v=3)
        record["pyhessian_density_time"] = time.perf_counter() - start
        record["pyhessian_density_products"] = counted["n"]
    except Exception as exc:  # noqa: BLE001
        record["pyhessian_density"] = "error: " + error_text(exc)

    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh

        params = [p for p in model.parameters() if p.requires_grad]
        H = HessianLinearOperator(model, loss_fn, params, [(X, y)], check_deterministic=False)
        S = H.to_scipy()
        calls = {"n": 0}

        def mv(v):
            calls["n"] += 1
            return S @ v

        L = LinearOperator(S.shape, matvec=mv, dtype=S.dtype)
        start = time.perf_counter()
        val = eigsh(L, k=1, which="LA", tol=1e-3)[0][0]
        record["curvlinops_eigsh"] = float(val)
        record["curvlinops_eigsh_products"] = calls["n"]
        record["curvlinops_eigsh_time"] = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        record["curvlinops_eigsh"] = "error: " + error_text(exc)
    emit(record)


if __name__ == "__main__":
    main()
