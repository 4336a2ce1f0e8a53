"""K-FAC and KFLR factors on the reference CNN, beside BackPACK and curvlinops (issue 8).

    python benchmarks/kfac_bench.py [--reps 5]

Our side (this process): a plain forward + backward (the unit), the factors through
``quantities(..., ["kfac"])`` (1 MC sample) and ``["kflr"]``, the ``KFAC`` operator with
``fisher="mc"``, and a product with ``inv(K + 1e-3·I)`` (exact, by the factors'
eigendecompositions, eigendecompositions done once and not timed), all interleaved; the
peers in ``benchmarks/.envs/peers`` (``peers/kfac_peers.py``) with their own unit measured
in their own process. Ratios are to one forward + backward of the same process; medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEERS_PY = HERE / ".envs" / "peers" / "bin" / "python"
sys.path.insert(0, str(HERE / "peers"))


def _problem():
    spec = importlib.util.spec_from_file_location("bq", HERE / "peers" / "backpack_quantities.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_problem("cnn")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from _harness import medians, time_round_robin

    import solvers
    from linops import I_like
    from linops.curvature import KFAC, quantities

    model, X, y, loss_fn = _problem()

    def grad():
        model.zero_grad()
        loss_fn(model(X), y).backward()

    K = KFAC(model, loss_fn, (X, y), fisher="mc", seed=0)
    Kinv = solvers.inv(K + 1e-3 * I_like(K))
    v = torch.randn(K.shape[0])
    ours = medians(time_round_robin({
        "grad": grad,
        "kfac": lambda: quantities(model, loss_fn, (X, y), ["kfac"], seed=0),
        "kflr": lambda: quantities(model, loss_fn, (X, y), ["kflr"]),
        "KFAC operator": lambda: KFAC(model, loss_fn, (X, y), fisher="mc", seed=0),
        "inverse product": lambda: Kinv @ v,
    }, reps=args.reps))
    peers = {}
    if PEERS_PY.exists():
        out = subprocess.run([str(PEERS_PY), str(HERE / "peers" / "kfac_peers.py"), "--reps",
                              str(args.reps), "--threads", str(args.threads)],
                             capture_output=True, text=True, timeout=1800)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        peers = json.loads(line[-1])["seconds"] if line else {"error": out.stderr[-500:]}
    print(f"reference CNN, batch 128; ratios to one forward + backward (ours: "
          f"{ours['grad'] * 1e3:.0f} ms; peers' process: "
          f"{peers.get('grad', float('nan')) * 1e3:.0f} ms)")

    def ratio(d, k):
        return d[k] / d["grad"] if isinstance(d.get(k), float) else d.get(k, "n/a")

    rows = [("KFAC (MC, 1 sample) factors", ratio(ours, "kfac"), ratio(peers, "backpack_kfac"),
             ratio(peers, "curvlinops_kfac")),
            ("KFLR factors", ratio(ours, "kflr"), ratio(peers, "backpack_kflr"),
             ratio(peers, "curvlinops_kflr")),
            ("KFAC operator (MC)", ratio(ours, "KFAC operator"), "", ""),
            ("inverse-KFAC product (λ = 1e-3)", ratio(ours, "inverse product"), "",
             ratio(peers, "curvlinops_inverse_product"))]
    print(f"{'':34} {'linops':>8} {'BackPACK':>9} {'curvlinops':>11}")
    for name, *vals in rows:
        print(f"{name:34} " + " ".join(f"{v:>8.2f}" if isinstance(v, float) else f"{v!s:>8}"
                                       for v in vals))
    (HERE / "kfac.json").write_text(json.dumps({"ours": ours, "peers": peers}, indent=1))


if __name__ == "__main__":
    main()
