"""Curvature products on a transformer LM, the reference CNN and a small ResNet (issue 13).

Every figure is a ratio of two times measured in the same process: a product over one
gradient (``model.zero_grad(); loss_fn(model(X), y).backward()`` with PyTorch's default
settings, fused kernels included) of that process. Inside a process the contenders run
round-robin (``--reps`` rounds after ``--warmup``), each figure is a median; a run is
``--rounds`` such processes per model and side, in rotating order, and the table shows the
median over rounds. Peak memory is measured apart, one fresh process per contender: the
growth of the peak resident set (CPU) or of ``torch.cuda.max_memory_allocated`` (GPU) while
the contender runs a second time (its first run, untimed, pays one-off lazy initialization
such as torch.func's decompositions); for a product: building the operator and one product.

Sides:

- ``linops`` (this environment): ``GGN`` and ``Hessian`` from ``linops.curvature`` with their
  automatic route (for the CNN the hand-written convolutional chain), and the routes of the
  autograd path for comparison (``fast_path=False``: ``ggn_mv_autograd`` its automatic
  route, ``route="double backward"``, ``route="linearize"`` whose one-off trace is reported
  in seconds as ``ggn_linearize_trace``);
- ``peers`` (``benchmarks/.envs/peers``, made by ``bash benchmarks/setup_peers.sh peers``):
  curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator`` and BackPACK's
  ``ggn_vector_product_from_plist`` on a kept graph; at PyTorch's defaults, and for the
  transformer also with the multi-head-attention fast path and the fused attention kernels
  switched off by hand for the whole process (``peers-manual``), since they fail otherwise.

Usage::

    python benchmarks/architectures_bench.py                      # all models, 3 rounds
    python benchmarks/architectures_bench.py --models cnn --rounds 1 --reps 5 --no-memory

The models (all float32, eval mode, mean cross-entropy):

- ``lm``: tiny transformer language model: ``nn.Embedding(128, 64)`` plus a learned
  positional table, ``nn.TransformerEncoder`` of 2 layers (d = 64, 4 heads, feed-forward
  128, no dropout), a final ``nn.LayerNorm`` and a linear head; 16 sequences of 32 tokens,
  next-token targets flattened (512 terms); 87,680 parameters;
- ``cnn``: the reference CNN Conv2d(1,20,5)-ReLU-MaxPool2d(2)-Conv2d(20,50,5)-ReLU-
  MaxPool2d(2)-Flatten-Linear(800,500)-ReLU-Linear(500,10), batch 128 of 28×28; 431,080;
- ``resnet``: a stem Conv3×3(3→16)-BatchNorm-ReLU, 2 residual blocks of two Conv3×3-BatchNorm
  (16 channels), average pooling and a linear head; batch 32 of 16×16; 9,978 parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_PYTHON = HERE / ".envs" / "peers" / "bin" / "python"
MODELS = ("lm", "cnn", "resnet")


# ----------------------------------------------------------------------------- models
class LM(nn.Module):
    def __init__(self, vocab=128, d=64, heads=4, layers=2, ff=128, max_len=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.enc(h))).flatten(0, 1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def make_problem(name: str, device: str = "cpu"):
    """``(model, X, y, loss_fn)`` of a benchmark model, seeded."""
    torch.manual_seed(0)
    if name == "lm":
        model = LM()
        X = torch.randint(0, 128, (16, 32))
        y = torch.randint(0, 128, (16 * 32,))
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        X, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    elif name == "resnet":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                              nn.ReLU(), Block(16), Block(16), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(16, 10))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        X, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return model.to(device).eval(), X.to(device), y.to(device), nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- contenders
def _gradient(model, X, y, loss_fn):
    def grad():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
    return grad


def ours(model, X, y, loss_fn, k, memory_only=False):
    """``(timed contenders, memory contenders, notes)`` for linops."""
    sys.path.insert(0, str(REPO))
    from linops.curvature import GGN, Hessian

    data = (X, y)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator(device=X.device).manual_seed(0)
    v = torch.randn(n, generator=gen, device=X.device)
    V = torch.randn(n, k, generator=gen, device=X.device)
    memory = {
        "grad": _gradient(model, X, y, loss_fn),
        "ggn": lambda: GGN(model, loss_fn, data) @ v,
        "ggn_mm_k": lambda: GGN(model, loss_fn, data) @ V,
        "hessian": lambda: Hessian(model, loss_fn, data) @ v,
    }
    if memory_only:
        return {}, memory, {}
    G = GGN(model, loss_fn, data)
    H = Hessian(model, loss_fn, data)
    # the routes of the autograd path (fast_path=False: a convolutional chain would take
    # its hand-written path whatever the route)
    Gauto = GGN(model, loss_fn, data, fast_path=False)
    Gdb = GGN(model, loss_fn, data, route="double backward", fast_path=False)
    Glin = GGN(model, loss_fn, data, route="linearize", fast_path=False)
    start = time.perf_counter()
    Glin @ v  # the one-off trace
    notes = {"ggn_linearize_trace": time.perf_counter() - start, "n_params": n}
    G @ v
    G @ V  # a block too: op.info names the route of blocks where it differs
    H @ v
    notes["ggn_route"], notes["hessian_route"] = str(G.info), str(H.info)
    contenders = {
        "grad": _gradient(model, X, y, loss_fn),
        "ggn_build": lambda: GGN(model, loss_fn, data),
        "ggn_mv": lambda: G @ v,
        "ggn_mm_k": lambda: G @ V,
        "ggn_mv_autograd": lambda: Gauto @ v,
        "ggn_mv_double_backward": lambda: Gdb @ v,
        "ggn_mv_linearize": lambda: Glin @ v,
        "hessian_build": lambda: Hessian(model, loss_fn, data),
        "hessian_mv": lambda: H @ v,
        "hessian_mm_k": lambda: H @ V,
    }
    return contenders, memory, notes


def peers(model, X, y, loss_fn, k, memory_only=False):
    """name -> callable for curvlinops and BackPACK (run in benchmarks/.envs/peers)."""
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    data = [(X, y)]
    gen = torch.Generator(device=X.device).manual_seed(0)
    v = torch.randn(n, generator=gen, device=X.device)
    V = torch.randn(n, k, generator=gen, device=X.device)
    v_list = list(torch.split(v, [p.numel() for p in params]))
    v_list = [t.view_as(p) for t, p in zip(v_list, params)]

    def ggn():
        return GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False)

    def hessian():
        return HessianLinearOperator(model, loss_fn, params, data, check_deterministic=False)

    holder = {}

    def backpack_build():
        out = model(X)
        holder["out"], holder["loss"] = out, loss_fn(out, y)

    def backpack_mv():
        return ggn_vector_product_from_plist(holder["loss"], holder["out"], params, v_list)

    contenders = {"grad": _gradient(model, X, y, loss_fn)}
    notes = {"n_params": n}
    for name, make in (("curvlinops_ggn", ggn), ("curvlinops_hessian", hessian)):
        try:
            op = make()
            op @ v
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result
            notes[name + "_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            continue
        contenders[name + "_build"] = make
        contenders[name + "_mv"] = lambda op=op: op @ v
        contenders[name + "_mm_k"] = lambda op=op: op @ V
    try:
        backpack_build()
        backpack_mv()
        contenders["backpack_ggn_build"] = backpack_build
        contenders["backpack_ggn_mv"] = backpack_mv
    except Exception as exc:  # noqa: BLE001
        notes["backpack_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    memory = {"grad": _gradient(model, X, y, loss_fn)}
    if "curvlinops_ggn_mv" in contenders:
        memory["curvlinops_ggn"] = lambda: ggn() @ v
    if "curvlinops_hessian_mv" in contenders:
        memory["curvlinops_hessian"] = lambda: hessian() @ v
    if "backpack_ggn_mv" in contenders:
        memory["backpack_ggn"] = lambda: (backpack_build(), backpack_mv())
    return contenders, memory, notes


def manual_switches():
    """What a user of a peer library must do by hand on the transformer."""
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.cuda.enable_flash_sdp(False)  # the CPU flash kernel too
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


# ----------------------------------------------------------------------------- workers
def time_round_robin(contenders, reps, warmup):
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    times = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def ratios(med: dict, k: int) -> dict:
    g = med["grad"]
    out = {f"{n}/grad": t / g for n, t in med.items() if n != "grad"}
    for n, t in med.items():
        if n.endswith("_mm_k"):
            single = n[: -len("_mm_k")] + "_mv"
            if single in med:
                out[f"{n}/(k*mv)"] = t / (k * med[single])
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device) -> float:
    """MiB the peak memory grows while ``fn`` runs once: on a GPU from torch's allocator; on
    a CPU the resident set sampled every 0.2 ms by a thread (the worker runs with glibc's
    mmap threshold at 64 KiB, so freed tensors leave the resident set at once)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import threading

    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (max(peak[0], _rss()) - base) / 2**20


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    model, X, y, loss_fn = make_problem(args.model, args.device)
    if args.side == "peers-manual":
        manual_switches()
    side = ours if args.side == "linops" else peers
    contenders, memory, notes = side(model, X, y, loss_fn, args.k,
                                     memory_only=bool(args.memory_of))
    if args.memory_of:
        fn = memory[args.memory_of]
        fn()  # once untimed: lazy initialization (torch.func's decompositions) is not counted
        print(json.dumps({"memory_mib": peak_memory(fn, args.device)}))
        return
    med = time_round_robin(contenders, args.reps, args.warmup)
    print(json.dumps({"side": args.side, "model": args.model, "medians": med,
                      "ratios": ratios(med, args.k), "notes": notes,
                      "memory_contenders": list(memory)}))


# ----------------------------------------------------------------------------- driver
def run_worker(python, side, model, args, memory_of=None) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--model", model,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--k", str(args.k), "--device", args.device]
    if memory_of:
        cmd += ["--memory-of", memory_of]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    if memory_of:
        # glibc returns freed blocks to the system at once, so the resident set's peak is
        # the contender's own; only for the memory runs: it turns every allocation of
        # 64 KiB or more into an mmap and munmap, which slowed the timed products (the
        # transformer's Hessian product 3.9 gradients with it, 2.0 without)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=str(HERE / "architectures_results.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.side = args.worker
        return worker(args)

    models = [m for m in args.models.split(",") if m]
    sides = [("linops", sys.executable)]
    if not args.no_peers:
        if PEERS_PYTHON.exists():
            sides.append(("peers", PEERS_PYTHON))
        else:
            print(f"peers skipped: {PEERS_PYTHON} not found (bash benchmarks/setup_peers.sh "
                  "peers)")
    runs: dict = {}
    order = [(m, s, py) for m in models for s, py in sides]
    order += [("lm", "peers-manual", PEERS_PYTHON) for _ in [0]
              if "lm" in models and len(sides) > 1]
    for r in range(args.rounds):
        shift = r % len(order)
        for m, s, py in order[shift:] + order[:shift]:
            rec = run_worker(py, s, m, args)
            runs.setdefault((m, s), []).append(rec)
            print(f"round {r + 1}: {m} {s}: " + (rec.get("error") or " ".join(
                f"{k}={v:.2f}" for k, v in rec["ratios"].items())), flush=True)
    table = {}
    for (m, s), recs in runs.items():
        ok = [rec for rec in recs if "ratios" in rec]
        if not ok:
            table[f"{m}/{s}"] = {"error": recs[0].get("error")}
            continue
        keys = ok[0]["ratios"].keys()
        entry = {k: statistics.median(rec["ratios"][k] for rec in ok) for k in keys}
        entry["grad_ms"] = statistics.median(rec["medians"]["grad"] for rec in ok) * 1e3
        entry["notes"] = ok[0]["notes"]
        entry["rounds"] = len(ok)
        if not args.no_memory:
            py = sys.executable if s == "linops" else PEERS_PYTHON
            entry["peak_mib"] = {c: run_worker(py, s, m, args, memory_of=c).get("memory_mib")
                                 for c in ok[0]["memory_contenders"]}
        table[f"{m}/{s}"] = entry
    result = {"command": " ".join(sys.argv), "torch": torch.__version__,
              "threads": args.threads, "k": args.k, "device": args.device,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "table": table}
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(table, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
