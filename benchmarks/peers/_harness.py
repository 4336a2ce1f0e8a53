"""Timing harness shared by every benchmark process (ours and the peers').

Plain torch and the standard library only: each peer runs in its own virtual environment and
imports this file as a sibling module (``benchmarks/peers`` is on ``sys.path`` when a script
there runs); ``benchmarks/run_benchmarks.py`` loads it by path.

Timing rule: every contender gets ``warmup`` untimed calls, then ``reps`` rounds; in each
round every contender runs once, in a rotated order, so slow drifts of the machine (another
process, thermal state) hit all contenders alike. The figure reported is the median of a
contender's rounds, in seconds. A contender that raises is dropped from later rounds and its
error is reported instead of a time.
"""

import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PROBLEMS_PATH = REPO / "solvers" / "problems.py"


def load_problems() -> ModuleType:
    """Import ``solvers/problems.py`` by path, without importing the ``solvers`` package."""
    name = "linops_reference_problems"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROBLEMS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def time_round_robin(
    contenders: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 2
) -> dict[str, dict]:
    """Time each callable ``reps`` times, interleaved; return medians or errors.

    Returns:
        name -> ``{"median": s, "times": [...]}`` or ``{"error": "Type: message"}``.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    errors: dict[str, str] = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
                errors[name] = error_text(exc)
                traceback.print_exc(file=sys.stderr)
                break
    alive = [name for name in contenders if name not in errors]
    times: dict[str, list[float]] = {name: [] for name in alive}
    for rep in range(reps):
        shift = rep % max(len(alive), 1)
        for name in alive[shift:] + alive[:shift]:
            if name in errors:
                continue
            start = time.perf_counter()
            try:
                contenders[name]()
            except Exception as exc:  # noqa: BLE001
                errors[name] = error_text(exc)
                continue
            times[name].append(time.perf_counter() - start)
    result: dict[str, dict] = {}
    for name in contenders:
        if name in errors:
            result[name] = {"error": errors[name]}
        else:
            result[name] = {"median": statistics.median(times[name]), "times": times[name]}
    return result


def medians(timed: dict[str, dict]) -> dict[str, float | str]:
    """Flatten ``time_round_robin``'s answer to name -> median seconds or ``"error: ..."``."""
    return {name: (entry["median"] if "median" in entry else "error: " + entry["error"])
            for name, entry in timed.items()}


def emit(record: dict) -> None:
    """Print the process's one result line (JSON) on stdout."""
    print(json.dumps(record, sort_keys=True), flush=True)


def timed_once(fn: Callable[[], object]) -> tuple[object, float]:
    """Run ``fn`` once and return its value and its wall time in seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def torch_cg(matvec: Callable, b, tol: float = 1e-3, max_iters: int = 20):
    """Plain conjugate gradients for a peer that has no solver of its own.

    Solves ``A x = b`` from ``x0 = 0`` for a symmetric positive definite ``A`` given by
    ``matvec``; stops when ``‖b − A x‖ ≤ tol·‖b‖`` or after ``max_iters`` products (one
    product per iteration, the recursive residual is used for the test).

    Returns:
        ``(x, iterations, relative_residual)``.
    """
    x = b.new_zeros(b.shape)
    r = b.clone()
    p = r.clone()
    rr = r.dot(r)
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return x, 0, 0.0
    iterations = 0
    for iterations in range(1, max_iters + 1):  # noqa: B007 - the count is returned
        Ap = matvec(p)
        alpha = rr / p.dot(Ap)
        x.add_(p, alpha=float(alpha))
        r.sub_(Ap, alpha=float(alpha))
        rr_new = r.dot(r)
        if float(rr_new.sqrt()) <= tol * b_norm:
            rr = rr_new
            break
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return x, iterations, float(rr.sqrt()) / b_norm


def peer_args(doc: str, **extra):
    """Parse the options every peer script takes (``--reps``, ``--warmup``, ``--threads``,
    ``--k``) plus ``extra`` ones given as ``name=(type, default, help)``, and set torch's
    thread count."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    for name, (typ, default, help_) in extra.items():
        parser.add_argument(f"--{name}", type=typ, default=default, help=help_)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args

