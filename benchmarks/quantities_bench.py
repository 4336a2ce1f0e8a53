"""``linops.curvature.quantities`` beside BackPACK's extensions on issue 7's two models.

For each reference model (``benchmarks/peers/backpack_quantities.py``'s ``make_problem``:
the CNN Conv2d(1,20,5)-ReLU-MaxPool2d(2)-Conv2d(20,50,5)-ReLU-MaxPool2d(2)-Flatten-
Linear(800,500)-ReLU-Linear(500,10) at batch 128, and Sequential(Flatten(), Linear(784, 10))
at batch 512; 28 × 28 random inputs, ``CrossEntropyLoss()``, float32) and every name, the
time of one call as a ratio to one plain forward + ``loss.backward()`` measured in the same
process:

- ours: ``quantities(model, loss_fn, (X, y), [name], mc_samples=1)``, a worker process of
  this script in the development environment (``--worker bench``);
- BackPACK: a forward pass and ``loss.backward()`` inside ``with backpack(Extension()):``
  (BatchGrad, BatchL2Grad, SumGradSquared, Variance, DiagGGNExact, BatchDiagGGNExact,
  DiagGGNMC, BatchDiagGGNMC, DiagHessian, BatchDiagHessian, SqrtGGNExact, SqrtGGNMC; MC
  ones with ``mc_samples=1``) on the extended model, ``backpack_quantities.py --bench 1`` in
  ``benchmarks/.envs/peers``; its unit is a copy of the model that BackPACK has not
  extended.

Inside each process every contender (the unit and each name) runs ``--warmup`` times, then
``--reps`` rounds round-robin in a rotating order (``peers/_harness.time_round_robin``);
a figure is the median of its rounds, as wall time and as process CPU time (all threads).
A run is ``--rounds`` rounds of the two processes per model, in an order that alternates;
the table shows the median over rounds of each process's ratios. ``_load.LoadMeter``
records how many cores other programs kept busy during each process.

Memory: after the timing, each name (and the plain forward + backward) runs once more in a
fresh process per contender (``--worker memory`` / ``--memory NAME``): the growth of the
process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) over one call on
the full batch, after a warm-up call on two samples. It is the memory the call needs
beyond what the process held (model, data, imports), its results included; CPU only
(on CUDA one would read ``torch.cuda.max_memory_allocated``).

Usage::

    python benchmarks/quantities_bench.py                      # both models, writes JSON
    python benchmarks/quantities_bench.py --problems linear --rounds 1 --no-memory

Targets (issue 7): every name ≤ 0.8 × BackPACK's ratio; ``batch_l2``,
``sum_grad_squared``, ``variance`` ≤ 1.3 and ``diag_ggn_mc`` ≤ 1.7 forward + backward
(on the CNN; shown for both). The results are described in ``benchmarks/README.md``.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_SCRIPT = HERE / "peers" / "backpack_quantities.py"
PEERS_PYTHON = HERE / ".envs" / "peers" / "bin" / "python"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

from _load import LoadMeter  # noqa: E402


def _load_peer_script():
    spec = importlib.util.spec_from_file_location("backpack_quantities_script", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BQ = _load_peer_script()
NAMES = BQ.NAMES
PROBLEMS = tuple(BQ.BATCH)
#: absolute targets, × one forward + backward
ABSOLUTE_TARGETS = {"batch_l2": 1.3, "sum_grad_squared": 1.3, "variance": 1.3,
                    "diag_ggn_mc": 1.7}
RELATIVE_TARGET = 0.8  # × BackPACK's ratio


# ----------------------------------------------------------------------------- our worker
#: the layer-wise engine's files under linops/curvature (others there do not run here)
ENGINE_FILES = ("quantities.py", "_records.py", "_data.py", "_mlp.py", "losses.py",
                "layers/*.py")


def engine_source_hash() -> str:
    """sha1 (12 digits) of the engine's source files as this process read them: tells
    whether every round of a run measured the same code (the working tree may change)."""
    import hashlib

    base = REPO / "linops" / "curvature"
    h = hashlib.sha1()
    for path in sorted(p for pattern in ENGINE_FILES for p in base.glob(pattern)):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def git_head() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=REPO, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "linops"],
                               capture_output=True, text=True, cwd=REPO, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + (" + uncommitted changes in linops/" if dirty.stdout.strip()
                                 else "")


class _OursRunner:
    def __init__(self, problem: str, mc_samples: int):
        from linops.curvature import quantities

        self.quantities = quantities
        self.model, self.X, self.y, self.loss_fn = BQ.make_problem(problem)
        self.mc_samples = mc_samples

    def grad(self):
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.X), self.y).backward()

    def call(self, name: str):
        return self.quantities(self.model, self.loss_fn, (self.X, self.y), [name],
                               mc_samples=self.mc_samples)


def worker(args) -> None:
    import torch
    from _harness import emit, error_text, medians, time_round_robin

    torch.set_num_threads(args.threads)
    source = engine_source_hash()  # before the import: what the process runs
    runner = _OursRunner(args.problem, args.mc_samples)
    record = {"contender": "linops", "problem": args.problem, "batch": runner.X.shape[0],
              "threads": args.threads, "mc_samples": args.mc_samples,
              "versions": {"torch": torch.__version__}, "engine_source": source}
    if args.worker == "memory":
        name = args.memory
        record["name"] = name
        fn = runner.grad if name == "grad" else (lambda: runner.call(name))
        try:
            record.update(BQ.peak_rss_growth(fn, runner))
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            record["error"] = error_text(exc)
        emit(record)
        return
    contenders = {"grad": runner.grad}
    for name in args.names.split(","):
        contenders[name] = (lambda n=name: runner.call(n))
    contenders, cpu = BQ.with_cpu_times(contenders)
    timed = time_round_robin(contenders, reps=args.reps, warmup=args.warmup)
    record["reps"], record["warmup"] = args.reps, args.warmup
    record["seconds"] = medians(timed)
    record["cpu_seconds"] = BQ.cpu_medians(cpu, args.warmup)
    emit(record)


# ----------------------------------------------------------------------------- the driver
def run_json(cmd: list[str], timeout: int) -> dict:
    """Run ``cmd``, return its last JSON line (plus the load of other programs during it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with LoadMeter() as load:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=REPO, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s", "cmd": cmd}
    record = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            record = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if record is None:
        record = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    record["background_cores_during"] = load.cores
    record["wall_s"] = time.perf_counter() - start
    return record


def contender_cmd(contender: str, problem: str, args, *, memory: str | None = None):
    common = ["--problem", problem, "--threads", str(args.threads),
              "--mc_samples", str(args.mc_samples)]
    reps = str(args.cnn_reps if problem == "cnn" else args.reps)
    if contender == "linops":
        cmd = [sys.executable, str(Path(__file__).resolve())] + common
        if memory:
            return cmd + ["--worker", "memory", "--memory", memory]
        return cmd + ["--worker", "bench", "--names", ",".join(args.names),
                      "--reps", reps, "--warmup", str(args.warmup)]
    cmd = [str(PEERS_PYTHON), str(PEER_SCRIPT)] + common
    if memory:
        return cmd + ["--memory", memory]
    return cmd + ["--bench", "1", "--names", ",".join(args.names), "--reps", reps,
                  "--warmup", str(args.warmup)]


def _ratio(record: dict, key: str, name: str):
    block = record.get(key) or {}
    num, den = block.get(name), block.get("grad")
    if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den > 0:
        return num / den
    return None


def summarize(runs: list[dict], names, limit: float) -> dict:
    """problem -> contender -> name -> {wall, cpu (medians of per-process ratios),
    grad_ms, rounds}; processes with more than ``limit`` background cores are kept
    (the machine is shared) but counted in ``disturbed``."""
    out = {}
    for problem in PROBLEMS:
        for contender in ("linops", "backpack"):
            recs = [r for r in runs if r.get("problem") == problem
                    and r.get("_contender") == contender and "seconds" in r]
            if not recs:
                continue
            entry = {"rounds": len(recs),
                     "disturbed": sum(1 for r in recs
                                      if (r.get("background_cores_during") or 0) > limit),
                     "background_cores": [r.get("background_cores_during") for r in recs],
                     "grad_ms": statistics.median(r["seconds"]["grad"] * 1e3 for r in recs
                                                  if isinstance(r["seconds"].get("grad"),
                                                                float)),
                     "names": {}}
            for name in names:
                wall = [x for x in (_ratio(r, "seconds", name) for r in recs) if x is not None]
                cpu = [x for x in (_ratio(r, "cpu_seconds", name) for r in recs)
                       if x is not None]
                errors = [r["seconds"][name] for r in recs
                          if isinstance(r["seconds"].get(name), str)]
                entry["names"][name] = {
                    "wall": statistics.median(wall) if wall else None,
                    "cpu": statistics.median(cpu) if cpu else None,
                    "wall_rounds": wall, "cpu_rounds": cpu,
                    "ms": statistics.median(r["seconds"][name] * 1e3 for r in recs
                                            if isinstance(r["seconds"].get(name), float))
                    if wall else None,
                    "error": errors[0] if errors else None,
                }
            out.setdefault(problem, {})[contender] = entry
    return out


def verdicts(summary: dict, names) -> dict:
    """problem -> name -> {vs_backpack, target_relative_met, target_absolute,
    target_absolute_met} (wall-time ratios)."""
    out = {}
    for problem, by in summary.items():
        ours = by.get("linops", {}).get("names", {})
        theirs = by.get("backpack", {}).get("names", {})
        for name in names:
            o = (ours.get(name) or {}).get("wall")
            t = (theirs.get(name) or {}).get("wall")
            v = {"vs_backpack": o / t if o is not None and t else None}
            v["relative_met"] = None if v["vs_backpack"] is None else \
                v["vs_backpack"] <= RELATIVE_TARGET
            if name in ABSOLUTE_TARGETS:
                v["absolute_target"] = ABSOLUTE_TARGETS[name]
                v["absolute_met"] = None if o is None else o <= ABSOLUTE_TARGETS[name]
            out.setdefault(problem, {})[name] = v
    return out


def _f(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def _cores(entry):
    return "[" + ", ".join(_f(c) for c in entry.get("background_cores", [])) + "]"


def _mib(x):
    return "—" if x is None else f"{x / 2**20:.0f}"


def print_table(summary, verdict, memory, names) -> None:
    for problem, by in summary.items():
        ours, theirs = by.get("linops", {}), by.get("backpack", {})
        print(f"\n== {problem} (batch {BQ.BATCH[problem]}): one forward + backward = "
              f"{_f(ours.get('grad_ms'), 1)} ms (linops' process), "
              f"{_f(theirs.get('grad_ms'), 1)} ms (BackPACK's); rounds "
              f"{ours.get('rounds', 0)} / {theirs.get('rounds', 0)}, cores busy elsewhere "
              f"{_cores(ours)} / {_cores(theirs)}")
        print(f"{'name':22s} {'linops':>7s} {'BackPACK':>8s} {'ours/BP':>7s} {'≤0.8':>5s} "
              f"{'abs':>9s} | {'cpu lin':>7s} {'cpu BP':>7s} | {'MiB lin':>7s} {'MiB BP':>7s}")
        mem = memory.get(problem, {})
        for name in ["grad"] + list(names):
            if name == "grad":
                o = t = {"wall": 1.0, "cpu": 1.0}
                v = {}
            else:
                o = ours.get("names", {}).get(name, {})
                t = theirs.get("names", {}).get(name, {})
                v = verdict.get(problem, {}).get(name, {})
            rel = {True: "yes", False: "NO", None: "—"}[v.get("relative_met")]
            absolute = ""
            if "absolute_target" in v:
                absolute = f"≤{v['absolute_target']}:" + {True: "yes", False: "NO",
                                                          None: "—"}[v.get("absolute_met")]
            mo = mem.get("linops", {}).get(name)
            mt = mem.get("backpack", {}).get(name)
            label = "grad (fwd+bwd, unit)" if name == "grad" else name
            print(f"{label:22s} {_f(o.get('wall')):>7s} {_f(t.get('wall')):>8s} "
                  f"{_f(v.get('vs_backpack')):>7s} {rel:>5s} {absolute:>9s} | "
                  f"{_f(o.get('cpu')):>7s} {_f(t.get('cpu')):>7s} | "
                  f"{_mib(mo):>7s} {_mib(mt):>7s}")
            for side, entry in (("linops", o), ("BackPACK", t)):
                if entry.get("error"):
                    print(f"    {side} {name}: {entry['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (linear model)")
    parser.add_argument("--cnn-reps", type=int, default=3, help="timed rounds on the CNN")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mc_samples", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-backpack", action="store_true")
    parser.add_argument("--disturbed-cores", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", default=str(HERE / "quantities_results.json"))
    # worker options
    parser.add_argument("--worker", choices=["bench", "memory"])
    parser.add_argument("--problem", default="cnn")
    parser.add_argument("--memory", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    problems = [p for p in args.problems.split(",") if p]
    args.names = [n for n in args.names.split(",") if n]
    bad = [p for p in problems if p not in PROBLEMS] + [n for n in args.names
                                                        if n not in NAMES]
    if bad:
        parser.error(f"unknown {bad}; problems {PROBLEMS}, names {NAMES}")
    contenders = ["linops"]
    note = None
    if not args.no_backpack:
        if PEERS_PYTHON.exists():
            contenders.append("backpack")
        else:
            note = f"{PEERS_PYTHON} not found: run bash benchmarks/setup_peers.sh peers"
            print("BackPACK skipped:", note)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs = []
    for rnd in range(args.rounds):
        for problem in problems:
            order = contenders if rnd % 2 == 0 else contenders[::-1]
            for contender in order:
                rec = run_json(contender_cmd(contender, problem, args), args.timeout)
                rec["_contender"], rec["problem"], rec["round"] = contender, problem, rnd
                runs.append(rec)
                print(f"round {rnd} {problem} {contender}: {rec.get('wall_s', 0):.0f} s, "
                      f"cores busy elsewhere {_f(rec.get('background_cores_during'))}"
                      + (f", error {rec['error']}" if "error" in rec else ""), flush=True)
    memory, memory_runs = {}, []
    if not args.no_memory:
        for problem in problems:
            for name in ["grad"] + args.names:
                for contender in contenders:
                    rec = run_json(contender_cmd(contender, problem, args, memory=name),
                                   args.timeout)
                    rec["_contender"], rec["problem"] = contender, problem
                    memory_runs.append(rec)
                    memory.setdefault(problem, {}).setdefault(contender, {})[name] = \
                        rec.get("peak_rss_growth")
            print(f"memory {problem}: done", flush=True)
    sources = sorted({r.get("engine_source") for r in runs + memory_runs
                      if r.get("_contender") == "linops" and r.get("engine_source")})
    if len(sources) > 1:
        print(f"WARNING: the engine's files changed during the run (sources {sources}); "
              "the rounds measured different code.")
    summary = summarize(runs, args.names, args.disturbed_cores)
    verdict = verdicts(summary, args.names)
    print_table(summary, verdict, memory, args.names)
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "threads": args.threads, "mc_samples": args.mc_samples,
        "linops_git": git_head(), "engine_sources": sources,
        "backpack_note": note,
        "summary": summary, "targets": verdict,
        "peak_rss_growth_bytes": memory,
        "runs": runs, "memory_runs": memory_runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
