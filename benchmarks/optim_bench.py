"""Time per optimizer step, as a ratio to one SGD step, beside the same update in BackPACK.

Every figure is a ratio of two medians measured in the same process, interleaved (each
round runs every contender once, in a rotated order; ``peers/_harness.time_round_robin``):

- ``diag_ggn_mc/sgd``: one ``solvers.optim.DiagGGN`` step (Monte-Carlo, 1 sample: the
  layer-wise engine's one forward and one backward pass with the sampled cotangents, then
  ``p ← p − lr·g/(diag + λ)``) over one SGD step (``zero_grad``, forward, ``backward``,
  ``torch.optim.SGD.step``) on BackPACK's example CNN (Conv2d(1,20,5)-ReLU-MaxPool-
  Conv2d(20,50,5)-ReLU-MaxPool-Linear(800,500)-ReLU-Linear(500,10), batch 128, 28×28);
- ``kfac/sgd``, ``kfac_pi/sgd``: one ``solvers.optim.KFAC`` step (MC Fisher, 1 sample,
  lr 1e-2, damping 1, ``update_every=10``; exact damping by the factors'
  eigendecompositions, or the π heuristic with explicit inverse factors) on the same CNN,
  amortized: a timed call runs 10 steps (one refresh of the factors and their
  decompositions, nine steps on the cached inverse) and the figure is its median over 10;
- ``cg_newton/sgd``: one ``solvers.optim.CGNewton`` step (GGN, parameter blocks, the HBP
  tutorial's lr=0.1, alpha=0.02, cg_tol=0.1, cg_maxiter=50) over one SGD step on
  ``Linear(784, 10)``, batch 500;
- ``gauss_newton/sgd``: one ``solvers.optim.GaussNewton`` step (CG, tol 1e-3, ≤ 20
  iterations) over one SGD step on the reference MLP of CoLA's notebook (full batch).

The BackPACK side runs the same models and batches in ``benchmarks/.envs/peers`` (made by
``bash benchmarks/setup_peers.sh peers``) as a subprocess of this script: BackPACK's
``DiagGGNMC`` example optimizer (``p.grad / (p.diag_ggn_mc + damping)``, after
``extend(model)`` and a backward pass ``with backpack(DiagGGNMC())``) and its CG-Newton
example (per-parameter CG on ``GGNMP`` products), each over an SGD step in that process.
Rounds alternate our process's measurements and BackPACK's.

The CG steps' iteration counts depend on the data; the data here are random tensors of the
right shapes with random labels (seeded), the same in both processes.

Usage::

    python benchmarks/optim_bench.py [--rounds 3] [--reps 7] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_PYTHON = HERE / ".envs" / "peers" / "bin" / "python"


def _harness():
    spec = importlib.util.spec_from_file_location("_optim_harness", HERE / "peers" /
                                                  "_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- problems
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 20, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 50, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(4 * 4 * 50, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 10))


def batch(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd_step_fn(model, X, y, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        return loss

    return step


# ----------------------------------------------------------------------------- ours
def ours(reps: int, warmup: int) -> dict:
    sys.path.insert(0, str(REPO))
    import linops
    from solvers.optim import KFAC, CGNewton, DiagGGN, GaussNewton

    h = _harness()
    record = {"side": "linops"}
    Xc, yc = batch(128, (1, 28, 28))
    Xl, yl = batch(500, (784,))
    contenders = {"sgd_cnn": sgd_step_fn(cnn(), Xc, yc),
                  "sgd_linear": sgd_step_fn(linear(), Xl, yl)}
    if hasattr(linops.curvature, "DiagGGN"):
        m = cnn()
        opt = DiagGGN(m, nn.CrossEntropyLoss(), lr=0.05, damping=1.0, seed=0)
        contenders["diag_ggn_mc"] = lambda: opt.step((Xc, yc))
    else:
        record["diag_ggn_mc"] = "skipped: linops.curvature.DiagGGN (the layer-wise engine) " \
                                "is not in this linops yet"
    # K-FAC with update_every=10: one timed call is a window of 10 steps (one refresh of
    # the factors and their eigendecompositions, nine steps on the cached inverse), so its
    # median over rounds divided by 10 is the amortized time per step
    for name, kind in (("kfac", "exact"), ("kfac_pi", "pi")):
        kfac = KFAC(cnn(), nn.CrossEntropyLoss(), lr=1e-2, damping=1.0, update_every=10,
                    seed=0, damping_kind=kind)

        def kfac_window(kfac=kfac):
            for _ in range(10):
                kfac.step((Xc, yc))

        contenders[f"{name}_x10"] = kfac_window
    lm = linear()
    cgn = CGNewton(lm, nn.CrossEntropyLoss(), lr=0.1, alpha=0.02, cg_tol=0.1, cg_maxiter=50,
                   on_failure="ignore")
    contenders["cg_newton"] = lambda: cgn.step((Xl, yl))
    problems = h.load_problems()
    setup = problems.GAUSS_NEWTON_SETUP
    mlp, Xs, ys, _ = problems.reference_problem(setup)
    mlp_sgd = problems.reference_problem(setup)[0]
    contenders["sgd_mlp"] = sgd_step_fn(mlp_sgd, Xs, ys)
    from solvers import CG

    gn = GaussNewton(mlp, nn.CrossEntropyLoss(), lr=0.2, damping=2e-4,
                     alg=CG(tol=1e-3, max_iters=20, on_failure="ignore"))
    contenders["gauss_newton"] = lambda: gn.step((Xs, ys))
    record.update(h.medians(h.time_round_robin(contenders, reps=reps, warmup=warmup)))
    for name in ("kfac", "kfac_pi"):
        window = record.pop(f"{name}_x10")
        record[name] = window / 10 if isinstance(window, float) else window
    record["cg_newton_iterations"] = cgn.last["iterations"]
    record["gauss_newton_iterations"] = gn.last["iterations"]
    return record


# ----------------------------------------------------------------------------- BackPACK
def backpack_side(reps: int, warmup: int) -> dict:
    """Runs in the peers' environment (imports BackPACK, not linops)."""
    import importlib.metadata

    from backpack import backpack, extend
    from backpack.extensions import GGNMP, DiagGGNMC

    h = _harness()
    record = {"side": "backpack", "version": importlib.metadata.version("backpack-for-pytorch")}
    Xc, yc = batch(128, (1, 28, 28))
    Xl, yl = batch(500, (784,))
    contenders = {"sgd_cnn": sgd_step_fn(cnn(), Xc, yc),
                  "sgd_linear": sgd_step_fn(linear(), Xl, yl)}

    model = extend(cnn())
    loss_fn = extend(nn.CrossEntropyLoss())

    def diag_step(lr=0.05, damping=1.0):
        model.zero_grad()
        loss = loss_fn(model(Xc), yc)
        with backpack(DiagGGNMC()):
            loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad / (p.diag_ggn_mc + damping), alpha=-lr)
        return loss

    contenders["diag_ggn_mc"] = diag_step

    lmodel = extend(linear())
    lloss = extend(nn.CrossEntropyLoss())

    def cg_newton_step(lr=0.1, alpha=0.02, tol=0.1, maxiter=50):
        lmodel.zero_grad()
        loss = lloss(lmodel(Xl), yl)
        with backpack(GGNMP()):
            loss.backward()
        with torch.no_grad():
            for p in lmodel.parameters():
                def matvec(v, p=p):
                    return alpha * v + (1 - alpha) * p.ggnmp(v.view(1, *p.shape)).view(-1)
                d, _, _ = h.torch_cg(matvec, -p.grad.reshape(-1), tol=tol, max_iters=maxiter)
                p.add_(d.view_as(p), alpha=lr)
        return loss

    contenders["cg_newton"] = cg_newton_step
    record.update(h.medians(h.time_round_robin(contenders, reps=reps, warmup=warmup)))
    return record


# ----------------------------------------------------------------------------- driver
def ratios(rec: dict) -> dict:
    out = {}
    for key, base in (("diag_ggn_mc", "sgd_cnn"), ("kfac", "sgd_cnn"), ("kfac_pi", "sgd_cnn"),
                      ("cg_newton", "sgd_linear"),
                      ("gauss_newton", "sgd_mlp")):
        a, b = rec.get(key), rec.get(base)
        if isinstance(a, float) and isinstance(b, float):
            out[f"{key}/sgd"] = a / b
    return out


def run_backpack(reps, warmup, threads, timeout=1200) -> dict:
    if not PEERS_PYTHON.exists():
        return {"side": "backpack", "skipped": f"{PEERS_PYTHON} not found: run bash "
                                               "benchmarks/setup_peers.sh peers"}
    cmd = [str(PEERS_PYTHON), str(Path(__file__).resolve()), "--side", "backpack",
           "--reps", str(reps), "--warmup", str(warmup), "--threads", str(threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"side": "backpack", "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"side": "backpack", "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=["driver", "ours", "backpack"], default="driver")
    parser.add_argument("--no-backpack", action="store_true")
    parser.add_argument("--out", default=None, help="write the records and ratios as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side == "backpack":
        print(json.dumps(backpack_side(args.reps, args.warmup)), flush=True)
        return None
    if args.side == "ours":
        print(json.dumps(ours(args.reps, args.warmup)), flush=True)
        return None
    h = _harness()
    load = importlib.util.spec_from_file_location("_bench_load", HERE / "_load.py")
    load_mod = importlib.util.module_from_spec(load)
    load.loader.exec_module(load_mod)
    rounds = []
    for r in range(args.rounds):
        entry = {}
        with load_mod.LoadMeter() as meter:
            entry["linops"] = ours(args.reps, args.warmup)
        entry["linops"]["background_cores"] = meter.cores
        if not args.no_backpack:
            with load_mod.LoadMeter() as meter:
                entry["backpack"] = run_backpack(args.reps, args.warmup, args.threads)
            entry["backpack"]["background_cores"] = meter.cores
        for side in list(entry):
            entry[side]["ratios"] = ratios(entry[side])
        rounds.append(entry)
        print(f"round {r + 1}: " + json.dumps({s: e["ratios"] for s, e in entry.items()}),
              flush=True)
    summary = {}
    for side in ("linops", "backpack"):
        keys = {k for e in rounds if side in e for k in e[side]["ratios"]}
        summary[side] = {k: statistics.median(e[side]["ratios"][k] for e in rounds
                                              if k in e.get(side, {}).get("ratios", {}))
                         for k in sorted(keys)}
    vs = {}
    for k, v in summary["linops"].items():
        if k in summary["backpack"]:
            vs[k.replace("/sgd", "") + " linops/backpack"] = v / summary["backpack"][k]
    summary["linops_over_backpack"] = vs
    h.emit({"summary": summary})
    print("\nmedian over rounds (each ratio to that process's own SGD step):")
    for side in ("linops", "backpack"):
        for k, v in summary[side].items():
            print(f"  {side:9s} {k:20s} {v:7.2f}")
    for k, v in vs.items():
        print(f"  {k:30s} {v:7.2f}")
    if args.out:
        meta = {"torch": torch.__version__, "python": platform.python_version(),
                "threads": args.threads, "reps": args.reps, "rounds": args.rounds}
        Path(args.out).write_text(json.dumps({"meta": meta, "rounds": rounds,
                                              "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
