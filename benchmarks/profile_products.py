"""Cost of curvature products relative to one gradient, on the reference problem.

The reference problem of the CoLA Gauss-Newton notebook: 5 spirals × 100 points, an MLP
2 → 200 → 200 → 5 with SiLU (41,805 parameters), full batch, mean cross entropy.

Our operators take the MLP fast path (hand-written products on raw tensors,
``linops/curvature/_mlp.py``); the rows marked ``autograd:`` are the same operators with
``fast_path=False`` (products through autograd on a kept graph), for comparison.

Each operation is timed interleaved (one round runs every operation once, in turn) so that
machine noise hits them alike. Printed: the median and the minimum time over rounds, the
median over rounds of the ratio to the gradient (``loss.backward()``) timed in the same
round, and the ratio of the minima (the better estimate on a machine shared with other
jobs, where slow rounds are interference):

    python benchmarks/profile_products.py [--threads 2] [--rounds 30] [--k 10]
                                          [--quiet-wait 300]

Timings of millisecond-sized CPU kernels are ruined when other jobs take the cores, so the
script first waits (at most ``--quiet-wait`` seconds) until less than a third of a core is
busy elsewhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from linops.curvature import GGN, EmpiricalFisher, Hessian
from solvers import problems


def reference_problem():
    """The problem of ``solvers.problems``: (model, loss_fn, X, y)."""
    problem = problems.reference_problem()
    return problem.model, problem.loss_fn, problem.X, problem.y


def measure(threads: int = 2, rounds: int = 30, k: int = 10):
    """Per operation: median seconds, minimum seconds, median per-round ratio to a gradient
    and ratio of the minima."""
    torch.set_num_threads(threads)
    model, loss_fn, X, y = reference_problem()
    n = sum(p.numel() for p in model.parameters())
    data = (X, y)
    G = GGN(model, loss_fn, data)  # the MLP fast path (raw tensor operations)
    H = Hessian(model, loss_fn, data)
    F = EmpiricalFisher(model, loss_fn, data)
    Ga = GGN(model, loss_fn, data, fast_path=False, vectorize=False)  # autograd
    Gav = GGN(model, loss_fn, data, fast_path=False, vectorize=True)
    Ha = Hessian(model, loss_fn, data, fast_path=False, vectorize=False)
    Hav = Hessian(model, loss_fn, data, fast_path=False, vectorize=True)
    assert G.fast_path and H.fast_path and not Ga.fast_path and not Ha.fast_path
    v = torch.randn(n)
    V = torch.randn(n, k)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    ops = {
        "gradient (loss.backward())": gradient,
        "forward (no grad)": lambda: torch.no_grad()(model)(X),
        "GGN build": lambda: GGN(model, loss_fn, data),
        "GGN build + G.gradient": lambda: GGN(model, loss_fn, data).gradient,
        "GGN product": lambda: G @ v,
        f"GGN product, k={k}": lambda: G @ V,
        "Hessian build (+ gradient)": lambda: Hessian(model, loss_fn, data),
        "Hessian product": lambda: H @ v,
        f"Hessian product, k={k}": lambda: H @ V,
        "EmpiricalFisher product": lambda: F @ v,
        "autograd: GGN build": lambda: GGN(model, loss_fn, data, fast_path=False),
        "autograd: GGN product": lambda: Ga @ v,
        f"autograd: GGN product, k={k} (loop)": lambda: Ga @ V,
        f"autograd: GGN product, k={k} (vmap)": lambda: Gav @ V,
        "autograd: Hessian build": lambda: Hessian(model, loss_fn, data, fast_path=False),
        "autograd: Hessian product": lambda: Ha @ v,
        f"autograd: Hessian product, k={k} (loop)": lambda: Ha @ V,
        f"autograd: Hessian product, k={k} (vmap)": lambda: Hav @ V,
    }
    for f in ops.values():  # warm up
        f()
        f()
    times = {name: [] for name in ops}
    for _ in range(rounds):
        for name, f in ops.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    grad = times["gradient (loss.backward())"]
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = {
        name: statistics.median(a / b for a, b in zip(t, grad)) for name, t in times.items()
    }
    low = {name: min(t) for name, t in times.items()}
    low_ratio = {name: t / low["gradient (loss.backward())"] for name, t in low.items()}
    return med, low, ratio, low_ratio, n


def _busy_cores(interval: float = 1.0) -> float | None:
    """Cores busy over ``interval`` seconds, from /proc/stat (None where unavailable)."""

    def sample():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def wait_for_quiet(limit: float = 0.3, max_wait: float = 300.0) -> float | None:
    """Wait until fewer than ``limit`` cores are busy, at most ``max_wait`` seconds."""
    deadline = time.monotonic() + max_wait
    load = _busy_cores()
    while load is not None and load > limit and time.monotonic() < deadline:
        time.sleep(2.0)
        load = _busy_cores()
    return load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quiet-wait", type=float, default=300.0)
    args = parser.parse_args()
    load = wait_for_quiet(max_wait=args.quiet_wait)
    if load is not None:
        print(f"cores busy elsewhere before measuring: {load:.2f}")
    med, low, ratio, low_ratio, n = measure(args.threads, args.rounds, args.k)
    print(f"reference problem: {n} parameters, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"  {'operation':42s} {'median':>9s} {'min':>9s}  {'× gradient (median, min)':>24s}")
    for name in med:
        print(f"  {name:42s} {med[name] * 1e3:6.2f} ms {low[name] * 1e3:6.2f} ms  "
              f"{ratio[name]:10.2f} {low_ratio[name]:10.2f}")
    k = args.k
    for op in ("GGN", "Hessian"):
        for prefix, mode in (("", ""), ("autograd: ", " (loop)"), ("autograd: ", " (vmap)")):
            key = f"{prefix}{op} product, k={k}{mode}"
            one = f"{prefix}{op} product"
            r_med = ratio[key] / (k * ratio[one])
            r_min = low[key] / (k * low[one])
            print(f"  {key} / (k × one product): median {r_med:.2f}, min {r_min:.2f}")

if __name__ == "__main__":
    main()
