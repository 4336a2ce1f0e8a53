"""Spectral diagnostics on the reference MLP and CNN, beside PyHessian and curvlinops.

Measured in one run (ratios inside one process, medians over interleaved rounds):

* ``density/products``: ``spectral_density(H, 3 probes, 60 steps)`` over the time of the
  products it makes (60 products with 3 columns, timed alone in the same rounds); and over
  180 single products. Target ≤ 1.2.
* top-1 Hessian eigenvalue: ``eigmax(H, Lanczos(tol=1e-3))`` — its products and its error
  against a tight reference (``Lanczos(tol=1e-9)``, ``max_iters=400``) — beside PyHessian's
  power iteration at its default tolerance and scipy ``eigsh(tol=1e-3)`` on curvlinops'
  ``HessianLinearOperator.to_scipy()`` (each with its products counted). Target: error ≤
  1e-3 in fewer products than PyHessian, and at least as accurate as eigsh.

* ``--trace``: the issue's trace target. On small tanh networks (dense float64 references;
  products through ``linops.curvature.Hessian`` / ``GGN``), the mean absolute trace error of
  Hutchinson, Hutch++ and XTrace at 100 products over seeds 0–49, their ratios, and the
  share of ‖A‖_F² outside the 50 largest |eigenvalues| (what XTrace, with 50 test vectors,
  cannot sketch). Target: XTrace ≤ Hutch++ and ≥ 20× below Hutchinson.

Problems: the reference MLP (``solvers/problems.py``: spirals, 2→200→200→5 SiLU, 41,805
parameters, full batch of 500; the MLP fast path) and the reference CNN
(Conv2d(1,20,5)-ReLU-MaxPool-Conv2d(20,50,5)-ReLU-MaxPool-Linear(800,500)-ReLU-Linear(500,10),
431,080 parameters, autograd path) on 64 of scikit-learn's digits resized to 28×28.

Usage::

    python benchmarks/spectral_bench.py [--rounds 3] [--problems mlp,cnn] [--no-peers]
    python benchmarks/spectral_bench.py --trace [--seeds 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import linops  # noqa: E402
from solvers import Lanczos, eigmax  # noqa: E402
from solvers.diagnostics import spectral_density  # noqa: E402

PEERS_PYTHON = HERE / ".envs" / "peers" / "bin" / "python"


def mlp_problem():
    from solvers.problems import reference_problem

    p = reference_problem()
    return "mlp", p.model, p.X, p.y


def cnn_problem(n_images=64):
    from linops.data import load_digits

    torch.manual_seed(0)
    X, y = load_digits(size=28, train=True).tensors
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    return "cnn", model, X[:n_images], y[:n_images]


def measure(name, model, X, y, rounds, peers):
    loss_fn = nn.CrossEntropyLoss()
    H = linops.curvature.Hessian(model, loss_fn, (X, y))
    n = H.shape[0]
    g = torch.Generator().manual_seed(0)
    V3 = torch.randn(n, 3, generator=g)
    v1 = V3[:, :1].contiguous()
    H @ V3, H @ v1  # warm-up

    def dens():
        spectral_density(H, 3, 60, seed=0)

    def block():
        for _ in range(60):
            H @ V3

    def single():
        for _ in range(180):
            H @ v1

    times = {"density": [], "block60x3": [], "single180": []}
    fns = {"density": dens, "block60x3": block, "single180": single}
    order = list(fns)
    for r in range(rounds):
        for key in order[r % 3:] + order[: r % 3]:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    rec = {"problem": name, "n_params": n, "route": "fast path" if H.fast_path else "autograd",
           "median_s": med,
           "density_over_its_products": med["density"] / med["block60x3"],
           "density_over_180_single_products": med["density"] / med["single180"]}
    ref = eigmax(H, alg=Lanczos(tol=1e-9, max_iters=400, seed=123, on_failure="ignore"))
    ours = eigmax(H, alg=Lanczos(tol=1e-3, seed=0))
    rec["eigmax_reference"] = float(ref)
    rec["eigmax_reference_converged"] = ref.solution.converged
    rec["eigmax_ours"] = float(ours)
    rec["eigmax_ours_products"] = ours.solution.info["products"]
    rec["eigmax_ours_rel_error"] = abs(float(ours) / float(ref) - 1)
    if peers and PEERS_PYTHON.exists():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "problem.pt"
            torch.save({"model": model, "X": X, "y": y, "name": name}, path)
            out = subprocess.run([str(PEERS_PYTHON), str(HERE / "peers" / "spectral_peers.py"),
                                  "--problem", str(path)], capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        try:
            peer = json.loads(line)
        except json.JSONDecodeError:
            peer = {"error": out.stderr[-500:]}
        for key in ("pyhessian_eigmax", "curvlinops_eigsh"):
            if isinstance(peer.get(key), float):
                peer[key + "_rel_error"] = abs(peer[key] / float(ref) - 1)
        rec["peers"] = peer
    elif peers:
        rec["peers"] = "benchmarks/.envs/peers missing: bash benchmarks/setup_peers.sh peers"
    return rec


#: (name, data, network seed, Adam steps): the networks of the trace table, all of them
#: tanh MLPs d → h → h → 3 in float64 with cross-entropy (or MSE where said).
TRACE_NETWORKS = [
    ("gauss10 h40 init", "gaussian", 0, 0),
    ("gauss10 h40 mse 30 steps", "gaussian-mse", 0, 30),
    ("spirals h20 init", "spirals", 0, 0),
    ("spirals h20 100 steps", "spirals", 0, 100),
    ("spirals h20 100 steps, seed 1", "spirals", 1, 100),
    ("spirals h20 100 steps, seed 2", "spirals", 2, 100),
    ("spirals h20 300 steps", "spirals", 0, 300),
]


def tanh_network(data: str, seed: int, steps: int):
    """The networks of tests/_spectral_nets.py: 10-D Gaussian inputs (64 points, random
    classes or the regression sin(X W), hidden 40: 2,203 parameters) or 3 spirals of 21
    points (hidden 20: 543 parameters), after ``steps`` full-batch Adam steps (lr 1e-2)."""
    from solvers.problems import make_spirals

    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, h = (2, 20) if data == "spirals" else (10, 40)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                          nn.Linear(h, 3)).to(f64)
    loss_fn = nn.CrossEntropyLoss()
    if data == "spirals":
        X, y = make_spirals(n_per_class=21, n_classes=3, seed=seed)
        X = X.to(f64)
    else:
        X = torch.randn(64, d, dtype=f64, generator=g)
        if data == "gaussian":
            y = torch.randint(0, 3, (64,), generator=g)
        else:
            y = torch.sin(X @ torch.randn(d, 3, dtype=f64, generator=g))
            loss_fn = nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
    return model.eval(), loss_fn, X, y, loss


def measure_trace(seeds: int):
    """The trace table (see the module docstring)."""
    from solvers import Hutchinson, HutchPP, XTrace, trace

    rows = []
    for name, data, seed, steps in TRACE_NETWORKS:
        model, loss_fn, X, y, loss = tanh_network(data, seed, steps)
        for curv in ("hessian", "ggn"):
            cls = linops.curvature.Hessian if curv == "hessian" else linops.curvature.GGN
            A = cls(model, loss_fn, (X, y))
            dense = A.to_dense()
            dense = (dense + dense.T) / 2
            ref = float(dense.trace())
            lam = torch.linalg.eigvalsh(dense).abs().sort(descending=True).values
            tail = float((lam[50:] ** 2).sum() / (lam ** 2).sum())
            algs = {"hutchinson": lambda s: Hutchinson(100, batch=100, seed=s),
                    "hutchpp": lambda s: HutchPP(100, seed=s),
                    "xtrace": lambda s: XTrace(100, seed=s)}
            err = {k: statistics.mean(abs(float(trace(A, make(s))) - ref) for s in range(seeds))
                   for k, make in algs.items()}
            row = {"network": name, "curvature": curv, "n_params": A.shape[0],
                   "loss": round(loss, 4), "trace": ref, "tail50_fro2": tail,
                   "mean_abs_error": err,
                   "hutchinson_over_xtrace": err["hutchinson"] / err["xtrace"],
                   "hutchpp_over_xtrace": err["hutchpp"] / err["xtrace"]}
            row["target_met"] = row["hutchinson_over_xtrace"] >= 20 and \
                row["hutchpp_over_xtrace"] >= 1
            print(f"{name:32s} {curv:8s} n={A.shape[0]:5d} tail50={tail:8.2e} "
                  f"Hutchinson/XTrace {row['hutchinson_over_xtrace']:10.1f}  "
                  f"Hutch++/XTrace {row['hutchpp_over_xtrace']:7.2f}  "
                  f"{'met' if row['target_met'] else 'not met'}", flush=True)
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", default="mlp,cnn")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="the trace-estimator table instead of the timings")
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.trace:
        rows = measure_trace(args.seeds)
        out = Path(args.out or HERE / "spectral_trace_results.json")
        out.write_text(json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=1))
        return
    args.out = args.out or str(HERE / "spectral_results.json")
    builders = {"mlp": mlp_problem, "cnn": cnn_problem}
    results = []
    for key in args.problems.split(","):
        rec = measure(*builders[key](), rounds=args.rounds, peers=not args.no_peers)
        print(json.dumps(rec, indent=1), flush=True)
        results.append(rec)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "loadavg": load,
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
