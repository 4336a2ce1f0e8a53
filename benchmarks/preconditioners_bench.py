"""Curvature preconditioners for CG on a damped GGN: iterations and time per Gauss-Newton
step, unpreconditioned against each preconditioner, measured in one run.

    python benchmarks/preconditioners_bench.py [--rounds 3] [--problems mlp cnn]

Each step solves ``(G + λI) d = g`` (``g`` the gradient) by CG to ``tol=1e-3`` (at most
``--max-iters`` products) on a fresh ``GGN`` of the batch, with ``inv(C + λI)`` as the
preconditioner built from the same batch (``solvers.curvature_preconditioner``). The
contenders run interleaved, round after round; the table shows medians. Problems: the
reference MLP of the Gauss-Newton notebook (2→200→200→5, SiLU, 41,805 parameters, 500
points) and the reference CNN of the diagonal-GGN example (431,080 parameters, batch 128 of
28×28 inputs: the offline digits when scikit-learn is installed, else Gaussian noise), at
initialization (``cnn``) and after 200 Adam steps on the digits (``cnn-trained``); the MLP
also after 300 full-batch Adam steps (``mlp-trained``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import solvers
from linops import I_like
from linops.curvature import GGN
from solvers.problems import reference_problem

KINDS = [None, "diag", "diag-mc", "kfac", "kfac-mc", "ekfac"]


def _cnn_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500),
                          nn.ReLU(), nn.Linear(500, 10))
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        X = torch.tensor(d.images[:128], dtype=torch.float32)[:, None] / 16
        X = torch.nn.functional.interpolate(X, size=(28, 28), mode="bilinear")
        y = torch.tensor(d.target[:128])
        source = "digits"
    except ImportError:
        X, y, source = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)), "noise"
    return model, X, y, nn.CrossEntropyLoss(), source


def _trained_cnn_problem(steps: int = 200):
    """The reference CNN after ``steps`` Adam steps (lr 1e-3, batch 128, seeded) on the
    whole offline digits set: a Gauss-Newton step in the middle of training, where the
    GGN is far more ill-conditioned than at initialization."""
    model, X, y, loss_fn, source = _cnn_problem()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return model, X, y, loss_fn, source + ", untrained (no scikit-learn)"
    d = load_digits()
    XA = torch.nn.functional.interpolate(
        torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=(28, 28),
        mode="bilinear")
    yA = torch.tensor(d.target)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(yA), (128,), generator=gen)
        opt.zero_grad()
        loss_fn(model(XA[idx]), yA[idx]).backward()
        opt.step()
    return model, X, y, loss_fn, f"{source}, after {steps} Adam steps"


def _trained_mlp_problem(steps: int = 300):
    """The reference MLP after ``steps`` full-batch Adam steps (lr 1e-2): loss about 0.02."""
    p = reference_problem()
    opt = torch.optim.Adam(p.model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        p.loss_fn(p.model(p.X), p.y).backward()
        opt.step()
    return p.model, p.X, p.y, p.loss_fn, f"spirals, after {steps} Adam steps"


def _problems(names):
    out = {}
    if "mlp" in names:
        p = reference_problem()
        out["mlp"] = (p.model, p.X, p.y, p.loss_fn, "spirals")
    if "mlp-trained" in names:
        out["mlp-trained"] = _trained_mlp_problem()
    if "cnn" in names:
        out["cnn"] = _cnn_problem()
    if "cnn-trained" in names:
        out["cnn-trained"] = _trained_cnn_problem()
    return out


def _step(model, X, y, loss_fn, kind, lam, max_iters, mu_factor=1.0):
    t0 = time.perf_counter()
    G = GGN(model, loss_fn, (X, y))
    g = G.gradient
    t1 = time.perf_counter()
    P = None if kind is None else solvers.curvature_preconditioner(G, kind, mu_factor * lam)
    t2 = time.perf_counter()
    Ainv = solvers.inv(G + lam * I_like(G),
                       alg=solvers.CG(tol=1e-3, max_iters=max_iters, preconditioner=P))
    Ainv @ g
    t3 = time.perf_counter()
    sol = Ainv.solution
    # one product with G and one with the preconditioner, untimed in the step above
    t4 = time.perf_counter()
    G @ g
    t5 = time.perf_counter()
    if P is not None:
        P @ g
    t6 = time.perf_counter()
    return {"iterations": sol.iterations, "status": sol.status.name, "build": t2 - t1,
            "solve": t3 - t2, "step": t3 - t0, "product": t5 - t4,
            "apply": t6 - t5 if P is not None else 0.0}


def dense_check(lam: float = 1e-4, steps: int = 300):
    """The trained MLP's finding on a twin small enough for dense matrices (2→20→20→5,
    665 parameters, float64, the same spirals, 300 full-batch Adam steps): CG iterations to
    1e-3 by a dense CG written out here and by ours, and the condition number of the
    (preconditioned) damped GGN, with none, the exact diagonal and KFLR."""
    from linops.curvature import KFAC, DiagGGN

    torch.manual_seed(0)
    p = reference_problem()
    X, y = p.X.double(), p.y
    model = nn.Sequential(nn.Linear(2, 20), nn.SiLU(), nn.Linear(20, 20), nn.SiLU(),
                          nn.Linear(20, 5)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        p.loss_fn(model(X), y).backward()
        opt.step()
    G = GGN(model, p.loss_fn, (X, y))
    g = G.gradient
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    A = G.to_dense() + lam * eye

    def cg_iters(Pm, tol=1e-3, maxit=2000):
        x, r = torch.zeros_like(g), g.clone()
        z = r if Pm is None else Pm @ r
        d, rz = z.clone(), r @ z
        for i in range(maxit):
            Ad = A @ d
            a = rz / (d @ Ad)
            x += a * d
            r -= a * Ad
            if r.norm() / g.norm() < tol:
                return i + 1
            z = r if Pm is None else Pm @ r
            rz, rz_old = r @ z, rz
            d = z + rz / rz_old * d
        return maxit

    approx = {"none": None, "diag": torch.diag(DiagGGN(model, p.loss_fn, (X, y)).d),
              "kfac": KFAC(model, p.loss_fn, (X, y), fisher="exact").to_dense()}
    print(f"\ndense check: 665-parameter MLP after {steps} Adam steps, damping {lam:g}")
    for kind, C in approx.items():
        Pm = None if C is None else torch.linalg.inv(C + lam * eye)
        P = None if C is None else solvers.curvature_preconditioner(G, kind, lam)
        Ainv = solvers.inv(G + lam * I_like(G), alg=solvers.CG(
            tol=1e-3, max_iters=2000, preconditioner=P, on_failure="ignore"))
        Ainv @ g
        L = None if Pm is None else torch.linalg.cholesky(Pm)
        ev = torch.linalg.eigvalsh(A if L is None else L.T @ A @ L)
        print(f"{kind:>6}: dense CG {cg_iters(Pm)} iterations, ours "
              f"{Ainv.solution.iterations}, condition number {float(ev.max() / ev.min()):.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", nargs="+",
                    default=["mlp", "mlp-trained", "cnn", "cnn-trained"])
    ap.add_argument("--damping", nargs="+", type=float, default=[1e-3, 1e-4])
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--mu-factors", nargs="+", type=float, default=[1.0],
                    help="the preconditioners' damping μ as multiples of λ (a row each; "
                         "μ changes CG's iterations, not the solution)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("preconditioners.json")))
    ap.add_argument("--dense-check", action="store_true",
                    help="only the dense twin of the trained MLP (iterations, conditioning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dense_check:
        dense_check()
        return
    results = {}
    for pname, (model, X, y, loss_fn, source) in _problems(args.problems).items():
        for lam in args.damping:
            contenders = [(None, 1.0)] + [(k, f) for f in args.mu_factors for k in KINDS[1:]]
            label = {(k, f): str(k) if f == 1.0 else f"{k} μ={f:g}λ" for k, f in contenders}
            runs = {label[c]: [] for c in contenders}
            _step(model, X, y, loss_fn, None, lam, args.max_iters)  # warm-up
            for _ in range(args.rounds):
                for kind, f in contenders:  # interleaved
                    runs[label[kind, f]].append(
                        _step(model, X, y, loss_fn, kind, lam, args.max_iters, f))
            base = statistics.median(r["step"] for r in runs["None"])
            print(f"\n{pname} ({source}), damping {lam:g}, CG tol 1e-3:")
            print(f"{'preconditioner':>15} {'CG iters':>9} {'build s':>8} {'solve s':>8} "
                  f"{'step s':>8} {'step / plain':>12} {'apply / product':>15}")
            for kind, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs)
                       for k in ("iterations", "build", "solve", "step", "product", "apply")}
                status = ",".join(sorted({r["status"] for r in rs}))
                med["status"] = status
                results[f"{pname}/{lam:g}/{kind}"] = med
                print(f"{kind:>15} {med['iterations']:>9.0f} {med['build']:>8.2f} "
                      f"{med['solve']:>8.2f} {med['step']:>8.2f} {med['step'] / base:>12.2f}"
                      f"{med['apply'] / med['product']:>16.2f}"
                      f"{'' if status == 'CONVERGED' else '  ' + status}")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
