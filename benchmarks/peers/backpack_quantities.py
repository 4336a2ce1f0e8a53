"""BackPACK's first- and second-order extensions on the two reference models of issue 7.

Runs in ``benchmarks/.envs/peers`` (BackPACK 1.7.1). The models and data (``make_problem``)
are plain torch, so ``benchmarks/quantities_bench.py`` (our side, the development
environment) and ``tests/test_quantities_backpack.py`` load this file by path and build the
same networks from the same seeds:

- ``cnn``: Conv2d(1,20,5)-ReLU-MaxPool2d(2)-Conv2d(20,50,5)-ReLU-MaxPool2d(2)-Flatten-
  Linear(800,500)-ReLU-Linear(500,10) on 28 × 28 inputs, batch 128 (the diagonal-GGN
  optimizer example);
- ``linear``: Sequential(Flatten(), Linear(784, 10)), batch 512 (BackPACK's "all
  extensions" tour);

both with ``CrossEntropyLoss()`` (mean), random inputs ``randn(N, 1, 28, 28)`` and random
labels, everything drawn after ``torch.manual_seed(seed)``.

Modes (one per process):

- ``--bench``: times ``grad`` (one plain forward + ``loss.backward()`` of a copy of the
  model that BackPACK has not extended: the unit of every ratio) and, for every name, a
  forward pass and a ``loss.backward()`` inside ``with backpack(Extension()):`` on the
  extended model, interleaved round-robin (``_harness.time_round_robin``); prints one JSON
  line of medians: wall seconds (``seconds``) and process CPU seconds, all threads
  (``cpu_seconds``).
- ``--memory NAME``: one fresh process for one name: after a warm-up call of NAME on the
  first two samples, the growth of the process's peak resident set size
  (``getrusage(RUSAGE_SELF).ru_maxrss``) over one call of NAME on the full batch
  (``peak_rss_growth``); prints one JSON line. ``--memory grad`` is the plain forward +
  backward.
- ``--values PATH``: every name once (float64 unless ``--dtype``), ``torch.save`` of
  ``{name: {param_name: tensor}}`` to PATH; ``torch.manual_seed(--seed)`` before each
  Monte-Carlo name's forward pass (what ``tests/test_quantities_backpack.py`` compares with).

Usage::

    benchmarks/.envs/peers/bin/python benchmarks/peers/backpack_quantities.py --bench 1 \\
        --problem cnn [--reps 5]
    benchmarks/.envs/peers/bin/python benchmarks/peers/backpack_quantities.py \\
        --values /tmp/bp.pt --problem linear --batch 8
"""

import copy
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

#: our names -> (BackPACK extension class name, attribute on each parameter, Monte Carlo)
EXTENSIONS = {
    "grad_batch": ("BatchGrad", "grad_batch", False),
    "batch_l2": ("BatchL2Grad", "batch_l2", False),
    "sum_grad_squared": ("SumGradSquared", "sum_grad_squared", False),
    "variance": ("Variance", "variance", False),
    "diag_ggn_exact": ("DiagGGNExact", "diag_ggn_exact", False),
    "diag_ggn_exact_batch": ("BatchDiagGGNExact", "diag_ggn_exact_batch", False),
    "diag_ggn_mc": ("DiagGGNMC", "diag_ggn_mc", True),
    "diag_ggn_mc_batch": ("BatchDiagGGNMC", "diag_ggn_mc_batch", True),
    "diag_h": ("DiagHessian", "diag_h", False),
    "diag_h_batch": ("BatchDiagHessian", "diag_h_batch", False),
    "sqrt_ggn_exact": ("SqrtGGNExact", "sqrt_ggn_exact", False),
    "sqrt_ggn_mc": ("SqrtGGNMC", "sqrt_ggn_mc", True),
}
NAMES = tuple(EXTENSIONS)

#: problem -> default batch size
BATCH = {"cnn": 128, "linear": 512}


def make_model(problem: str) -> nn.Module:
    if problem == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
        )
    if problem == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    raise ValueError(f"unknown problem {problem!r}; known: {', '.join(BATCH)}")


def make_problem(problem: str, batch: int | None = None, dtype=torch.float32, seed: int = 0):
    """``(model, X, y, loss_fn)``: the model in eval mode, inputs (N, 1, 28, 28), labels in
    0..9, ``CrossEntropyLoss()``; the same tensors in every environment for a seed."""
    N = BATCH[problem] if batch is None else batch
    torch.manual_seed(seed)
    model = make_model(problem).to(dtype).eval()
    X = torch.randn(N, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, 10, (N,))
    return model, X, y, nn.CrossEntropyLoss()


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ----------------------------------------------------------------------------- BackPACK
class BackpackRunner:
    """The model and loss extended by BackPACK, and one call per name."""

    def __init__(self, model, X, y, loss_fn, mc_samples: int = 1):
        from backpack import extend

        self.plain = copy.deepcopy(model)
        self.model = extend(model)
        self.loss_fn = extend(loss_fn)
        self.plain_loss = nn.CrossEntropyLoss(reduction=loss_fn.reduction)
        self.X, self.y, self.mc_samples = X, y, mc_samples

    def extension(self, name: str):
        import backpack.extensions as ext

        cls_name, _, mc = EXTENSIONS[name]
        cls = getattr(ext, cls_name)
        return cls(mc_samples=self.mc_samples) if mc else cls()

    def grad(self):
        self.plain.zero_grad(set_to_none=True)
        self.plain_loss(self.plain(self.X), self.y).backward()

    def call(self, name: str, seed: int | None = None) -> dict:
        from backpack import backpack

        attr = EXTENSIONS[name][1]
        self.model.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        loss = self.loss_fn(self.model(self.X), self.y)
        with backpack(self.extension(name)):
            loss.backward()
        out = {}
        for pname, p in self.model.named_parameters():
            out[pname] = getattr(p, attr)
            delattr(p, attr)
        return out


def peak_rss_growth(fn, runner) -> dict:
    """Peak-RSS growth of one call of ``fn`` on the full batch, after a warm-up call on
    the first two samples (code paths, lazy initialisations, thread pools; little memory).

    ``ru_maxrss`` is the process's high-water mark, so the growth is how far the call
    raised the peak above everything the process had held before it (model, data, the
    warm-up's buffers): the memory the call needs beyond that, its results included.
    """
    X, y = runner.X, runner.y
    runner.X, runner.y = X[:2], y[:2]
    try:
        fn()
    finally:
        runner.X, runner.y = X, y
    before = max_rss_bytes()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    after = max_rss_bytes()
    return {"peak_rss_before": before, "peak_rss_growth": after - before, "seconds": seconds}


def with_cpu_times(contenders: dict):
    """Wrap each callable to record its process CPU time per call (all threads)."""
    cpu = {name: [] for name in contenders}

    def wrap(name, fn):
        def call():
            start = time.process_time()
            value = fn()
            cpu[name].append(time.process_time() - start)
            return value
        return call

    return {name: wrap(name, fn) for name, fn in contenders.items()}, cpu


def cpu_medians(cpu: dict, warmup: int) -> dict:
    """Median CPU seconds of the timed calls (the first ``warmup`` calls are dropped)."""
    import statistics

    return {name: statistics.median(ts[warmup:]) for name, ts in cpu.items()
            if len(ts) > warmup}


def versions() -> dict:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("backpack-for-pytorch", "torch")}


def main() -> None:
    sys.path.insert(0, str(HERE))
    from _harness import emit, error_text, medians, peer_args, time_round_robin

    args = peer_args(
        __doc__,
        problem=(str, "cnn", "cnn or linear"),
        batch=(int, 0, "batch size (0: the problem's default)"),
        names=(str, ",".join(NAMES), "comma-separated names"),
        mc_samples=(int, 1, "Monte-Carlo samples of the _mc names"),
        seed=(int, 0, "seed of the model, the data and the Monte-Carlo draws"),
        dtype=(str, "float32", "float32 or float64 (--values: float64 unless given)"),
        bench=(int, 0, "1: time every name"),
        memory=(str, "", "peak-RSS growth of one name (or 'grad') in this process"),
        values=(str, "", "torch.save every name's values to this path"),
    )
    names = [n for n in args.names.split(",") if n]
    unknown = [n for n in names if n not in EXTENSIONS]
    if unknown:
        raise SystemExit(f"unknown names {unknown}; known: {', '.join(NAMES)}")
    dtype = getattr(torch, args.dtype)
    if args.values and "--dtype" not in sys.argv:
        dtype = torch.float64
    batch = args.batch or None
    model, X, y, loss_fn = make_problem(args.problem, batch, dtype, args.seed)
    runner = BackpackRunner(model, X, y, loss_fn, args.mc_samples)
    record = {"peer": "backpack", "problem": args.problem, "batch": X.shape[0],
              "threads": args.threads, "mc_samples": args.mc_samples,
              "versions": versions()}

    if args.values:
        results, errors = {}, {}
        for name in names:
            try:
                results[name] = runner.call(name, seed=args.seed if EXTENSIONS[name][2]
                                            else None)
            except Exception as exc:  # noqa: BLE001 - a failing extension is a result
                errors[name] = error_text(exc)
        torch.save({"values": results, "errors": errors, "record": record}, args.values)
        record["saved"] = sorted(results)
        record["errors"] = errors
        emit(record)
        return

    if not args.bench and not args.memory:
        raise SystemExit("give one of --bench 1, --memory NAME, --values PATH")
    if args.memory:
        name = args.memory
        record["name"] = name
        fn = runner.grad if name == "grad" else (lambda: runner.call(name))
        try:
            record.update(peak_rss_growth(fn, runner))
        except Exception as exc:  # noqa: BLE001
            record["error"] = error_text(exc)
        emit(record)
        return

    contenders = {"grad": runner.grad}
    for name in names:
        contenders[name] = (lambda n=name: runner.call(n))
    contenders, cpu = with_cpu_times(contenders)
    timed = time_round_robin(contenders, reps=args.reps, warmup=args.warmup)
    record["reps"], record["warmup"] = args.reps, args.warmup
    record["seconds"] = medians(timed)
    record["cpu_seconds"] = cpu_medians(cpu, args.warmup)
    emit(record)

if __name__ == "__main__":
    main()
