"""linops against CoLA, curvlinops, BackPACK and PyHessian on the reference problem.

The reference problem is CoLA's Gauss-Newton notebook (``solvers/problems.py``): 5 spirals of
100 points, an MLP 2 → 200 → 200 → 5 with SiLU (41,805 parameters), full batch, mean
cross-entropy. Every figure is a ratio of two times measured in the same process (a product
over one gradient ``loss.backward()`` of that process), so processes are comparable even when
their absolute speeds differ.

A run is ``--rounds`` rounds; each round measures our side in this process and then each peer
in its own virtual environment as a subprocess (``benchmarks/.envs``, made by
``bash benchmarks/setup_peers.sh``), in an order that rotates from round to round. Inside a
process every contender runs ``--reps`` times round-robin after warm-up and reports its
median; the table shows the median over rounds of each process's ratios.

Usage::

    python benchmarks/run_benchmarks.py                  # full run, writes results.json
    python benchmarks/run_benchmarks.py --rounds 1 --reps 5 --no-dense   # quick look

The figures and their meaning are in ``benchmarks/README.md``.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _load import LoadMeter, wait_for_quiet  # noqa: E402
from ours_bench import dense_top_eigenvalues, measure_ours  # noqa: E402

ENVS = HERE / ".envs"
PEERS = {
    # name: (virtual environment, script)
    "cola": ("cola", "cola_bench.py"),
    "curvlinops": ("peers", "curvlinops_bench.py"),
    "pyhessian": ("peers", "pyhessian_bench.py"),
}


# ----------------------------------------------------------------------------- peers
def run_peer(name: str, reps: int, warmup: int, threads: int, k: int, timeout: int) -> dict:
    env_name, script = PEERS[name]
    python = ENVS / env_name / "bin" / "python"
    if not python.exists():
        return {"peer": name, "skipped": f"{python} not found: run bash benchmarks/setup_peers.sh"}
    cmd = [str(python), str(HERE / "peers" / script), "--reps", str(reps),
           "--warmup", str(warmup), "--threads", str(threads)]
    if name != "pyhessian":
        cmd += ["--k", str(k)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"peer": name, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"peer": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- ratios
def _num(record: dict, key: str):
    value = record.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ratios(record: dict, cola: dict | None) -> dict:
    """The ratios of one process's record (and of its GN step to CoLA's in the same round)."""
    out = {}
    grad = _num(record, "grad")
    k = record.get("k", 10)
    pairs = {
        "ggn_mv/grad": ("ggn_mv", "grad"),
        "hessian_mv/grad": ("hessian_mv", "grad"),
        "ggn_build/grad": ("ggn_build", "grad"),
        "gn_step/grad": ("gn_step", "grad"),
    }
    for label, (num, _) in pairs.items():
        if grad and _num(record, num) is not None:
            out[label] = record[num] / grad
    if _num(record, "ggn_mm_k") is not None and _num(record, "ggn_mv"):
        out["ggn_mm_k/(k*ggn_mv)"] = record["ggn_mm_k"] / (k * record["ggn_mv"])
    if record.get("peer") == "curvlinops":
        for key in ("backpack_ggn_mv", "backpack_ggn_build"):
            if grad and _num(record, key) is not None:
                out[key + "/grad"] = record[key] / grad
    if record.get("peer") == "pyhessian":
        for key in ("hessian_build",):
            if grad and _num(record, key) is not None:
                out[key + "/grad"] = record[key] / grad
    if record.get("peer") == "linops":
        for key in ("gn_step_auto", "gn_step_backward", "torchfunc_gn_step", "hessian_build",
                    "ggn_mv_autograd", "hessian_mv_autograd"):
            if grad and _num(record, key) is not None:
                out[key + "/grad"] = record[key] / grad
    if cola and _num(cola, "gn_step"):
        for key in ("gn_step", "gn_step_auto", "gn_step_backward", "torchfunc_gn_step"):
            if _num(record, key) is not None:
                out[key + "/cola_gn_step"] = record[key] / cola["gn_step"]
    return out


def _clean(record: dict | None, limit: float) -> bool:
    load = None if record is None else record.get("background_cores_during")
    return load is None or load <= limit


def summarize(rounds: list[dict], limit: float) -> dict:
    """Median over rounds of every ratio, per process, over the rounds run undisturbed.

    A process counts when fewer than ``limit`` cores were busy with other programs while it
    ran (GN step/CoLA: when CoLA's process was undisturbed too). Where no round of a process
    was undisturbed, all its rounds are used and ``rounds_used`` says so.
    """
    collected: dict[str, dict[str, list[float]]] = {}
    fallback: dict[str, dict[str, list[float]]] = {}
    for rnd in rounds:
        cola = rnd.get("cola")
        for name, record in rnd.items():
            clean = _clean(record, limit)
            for label, value in ratios(record, cola).items():
                ok = clean and (not label.endswith("/cola_gn_step") or _clean(cola, limit))
                fallback.setdefault(name, {}).setdefault(label, []).append(value)
                if ok:
                    collected.setdefault(name, {}).setdefault(label, []).append(value)
    summary: dict = {}
    for name, table in fallback.items():
        summary[name] = {}
        for label, values in table.items():
            used = collected.get(name, {}).get(label) or values
            summary[name][label] = statistics.median(used)
        summary[name]["rounds_used"] = {
            label: (len(collected.get(name, {}).get(label, [])) or f"all {len(values)} (none "
                    "undisturbed)") for label, values in table.items()}
    return summary


def _fmt(value, digits=2):
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def print_table(summary: dict, last_round: dict, eig: dict) -> None:
    rows = [
        ("linops", "linops", ""),
        ("linops", "torch.func hand-tuned", "torchfunc_"),
        ("cola", "CoLA", ""),
        ("curvlinops", "curvlinops", ""),
        ("curvlinops", "BackPACK", "backpack_"),
        ("pyhessian", "PyHessian", ""),
    ]
    header = (f"{'contender':<22} {'GGN mv/grad':>11} {'Hess mv/grad':>12} "
              f"{'k-mm/(k·mv)':>11} {'build/grad':>10} {'GN step/grad':>12} "
              f"{'GN step/CoLA':>12}")
    print(header)
    print("-" * len(header))
    for proc, label, prefix in rows:
        table = summary.get(proc)
        record = last_round.get(proc, {})
        if table is None:
            reason = record.get("skipped") or record.get("error") or "not run"
            print(f"{label:<22} {reason}")
            continue
        if prefix == "torchfunc_":
            cells = [None, None, None, None, table.get("torchfunc_gn_step/grad"),
                     table.get("torchfunc_gn_step/cola_gn_step")]
        elif prefix == "backpack_":
            cells = [table.get("backpack_ggn_mv/grad"), None, None,
                     table.get("backpack_ggn_build/grad"), None, None]
        else:
            hess = table.get("hessian_mv/grad")
            if hess is None and isinstance(record.get("hessian_mv"), str):
                hess = "fails"
            cells = [table.get("ggn_mv/grad"), hess, table.get("ggn_mm_k/(k*ggn_mv)"),
                     table.get("ggn_build/grad") or table.get("hessian_build/grad"),
                     table.get("gn_step/grad"), table.get("gn_step/cola_gn_step")]
        widths = (11, 12, 11, 10, 12, 12)
        print(f"{label:<22} " + " ".join(f"{_fmt(c):>{w}}" for c, w in zip(cells, widths,
                                                                             strict=True)))
    used = []
    for proc in ("linops", "cola", "curvlinops", "pyhessian"):
        counts = summary.get(proc, {}).get("rounds_used", {})
        key = "ggn_mv/grad" if "ggn_mv/grad" in counts else next(iter(counts), None)
        if key is not None:
            used.append(f"{proc} {counts[key]}")
    if used:
        print("undisturbed rounds in the medians: " + ", ".join(used))
    if eig:
        print()
        for key, value in eig.items():
            print(f"{key:<40} {_fmt(value, 5)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--k", type=int, default=10, help="columns of the block product")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers to run ('' for none)")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the exact float64 eigenvalues (about 15 s, 1 GB)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per peer process")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="start a process only when fewer cores are busy elsewhere")
    parser.add_argument("--disturbed-cores", type=float, default=0.5,
                        help="a process during which other programs kept more cores busy "
                             "is left out of the medians")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="longest wait for a quiet machine before a process, seconds")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
    torch.set_num_threads(args.threads)

    rounds: list[dict] = []
    order = ["linops", *peers]
    for r in range(args.rounds):
        shift = r % len(order)
        rnd: dict = {}
        for name in order[shift:] + order[:shift]:
            load = wait_for_quiet(args.quiet_cores, args.quiet_wait)
            start = time.perf_counter()
            with LoadMeter() as meter:
                if name == "linops":
                    rnd[name] = measure_ours(args.reps, args.warmup, args.k, args.threads)
                else:
                    rnd[name] = run_peer(name, args.reps, args.warmup, args.threads, args.k,
                                         args.timeout)
            rnd[name]["background_cores_before"] = load
            rnd[name]["background_cores_during"] = meter.cores
            print(f"round {r + 1}/{args.rounds}: {name} done in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        rounds.append(rnd)

    eig: dict = {}
    if not args.no_dense:
        top = dense_top_eigenvalues()
        eig["true eigmax (dense float64)"] = top[0]
        eig["next eigenvalues"] = ", ".join(f"{t:.4f}" for t in top[1:])
    for name, key, label in (("linops", "eigmax", "linops eigmax Lanczos(tol=1e-2)"),
                             ("cola", "eigmax", "CoLA eigmax Auto(tol=1e-2)"),
                             ("curvlinops", "eigmax_scipy_eigsh",
                              "scipy eigsh(tol=1e-2) on curvlinops"),
                             ("pyhessian", "hessian_eigmax",
                              "PyHessian Hessian eigmax (power it.)")):
        values = [rnd[name][key] for rnd in rounds
                  if name in rnd and _num(rnd[name], key) is not None]
        if values:
            eig[label] = statistics.median(values)
            if "true eigmax (dense float64)" in eig and name != "pyhessian":
                truth = eig["true eigmax (dense float64)"]
                eig[label + " rel. error"] = abs(eig[label] - truth) / truth
        elif name in rounds[-1]:
            value = rounds[-1][name].get(key)
            if isinstance(value, str):
                eig[label] = value

    summary = summarize(rounds, args.disturbed_cores)
    print_table(summary, rounds[-1], eig)
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "k": args.k,
            "disturbed_cores": args.disturbed_cores,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "summary": summary,
        "eigmax": eig,
        "rounds": rounds,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True,
                                         default=lambda o: None if isinstance(o, float)
                                         and math.isnan(o) else str(o)) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
