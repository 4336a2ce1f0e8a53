"""Time per Gauss-Newton step of the reference problem on 1, 2 and 4 processes.

The step is the one of ``solvers/demo.py`` on ``solvers.problems.reference_problem()``
(the spirals, 500 points, and the 41,805-parameter SiLU MLP):
``p ← p − lr · inv(s·G + λI, CG(tol=1e-3, max_iters=20)) @ g`` with ``G`` the GGN of the
mean cross-entropy, ``s = 5`` (the class count, as CoLA's notebook), ``λ = 1e-3``, ``g``
its gradient. On N processes the 500 points are split into N contiguous shards and every
rank builds ``GGN(..., process_group=WORLD)`` on its own shard: each CG iteration is one
product on the shard and one ``all_reduce`` of 41,805 floats. A step is: build the
operator (its linearization), read ``G.gradient``, the CG solve, the update.

Each process runs single-threaded (``torch.set_num_threads(1)``), so the one-process
baseline is one core; parallel efficiency is ``T₁ / (N · T_N)``. On a machine with fewer
free cores than processes the processes share cores and the efficiency falls by that
factor: it measures the machine as much as the code.

The losses printed differ a little between process counts: the sums run in another order,
and 20 CG iterations at damping 1e-3 amplify that rounding (in float64 on this problem the
2-process products agree with one process's to 4e-17 relative, the CG solutions after 5,
10 and 20 iterations to 2e-15, 5e-13 and 2e-5), in one process as on several.

Usage::

    python benchmarks/distributed_gn.py [--procs 1 2 4] [--steps 5] [--dtype float32]
    # one configuration, the same worker under torchrun (one machine or several, NCCL on GPUs):
    torchrun --nproc-per-node 4 benchmarks/distributed_gn.py --worker --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def worker(steps: int, dtype: str) -> None:
    import torch
    import torch.distributed as dist

    from linops import I_like
    from linops.curvature import GGN
    from solvers import CG, inv
    from solvers.problems import GAUSS_NEWTON_SETUP as setup
    from solvers.problems import reference_problem

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if backend == "nccl" else torch.device("cpu")
    problem = reference_problem(dtype=getattr(torch, dtype))
    model = problem.model.to(device)
    X = problem.X.tensor_split(world)[rank].to(device)
    y = problem.y.tensor_split(world)[rank].to(device)
    alg = CG(tol=setup.cg_tol, max_iters=setup.cg_max_iters, on_failure="ignore")

    def step():
        G = GGN(model, problem.loss_fn, (X, y), process_group=dist.group.WORLD)
        g = G.gradient
        A = setup.gn_loss_scale * G + setup.gn_damping * I_like(G)
        Ainv = inv(A, alg=alg)
        x = Ainv @ g
        with torch.no_grad():
            for p, d in zip(G.params.values(), G.param_space.split(x)):
                p.sub_(setup.gn_lr * d)
        return float(G.loss), Ainv.solution.iterations

    step()  # warm-up (first products choose their kernels)
    times, losses, iters = [], [], []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss, it = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        iters.append(it)
    t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    if rank == 0:
        print(json.dumps({"procs": world, "median_step_s": float(t), "losses": losses,
                          "cg_iterations": iters}), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, steps: int, timeout: float, dtype: str) -> dict:
    """Run ``n`` workers with the environment torchrun gives them; rank 0's record."""
    port = _free_port()
    root = Path(__file__).resolve().parent.parent
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--dtype", dtype]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise RuntimeError(f"{n} processes: rank {r} failed:\n{out[-3000:]}")
    line = [x for x in outs[0].splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--worker", action="store_true", help="run as one rank (torchrun)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps, args.dtype)
        return []
    print(f"{os.cpu_count()} CPU cores visible; Gauss-Newton steps of the reference problem "
          f"(median of {args.steps}, after one warm-up), {args.dtype}")
    rows = [launch(n, args.steps, args.timeout, args.dtype) for n in args.procs]
    t1 = next((r["median_step_s"] for r in rows if r["procs"] == 1), None)
    print(f"{'processes':>9}  {'s/step':>8}  {'speed-up':>8}  {'efficiency':>10}  "
          f"CG iterations  final loss")
    for r in rows:
        n, t = r["procs"], r["median_step_s"]
        sp = f"{t1 / t:8.2f}" if t1 else f"{'-':>8}"
        eff = f"{t1 / (n * t):10.2f}" if t1 else f"{'-':>10}"
        print(f"{n:>9}  {t:8.3f}  {sp}  {eff}  {str(r['cg_iterations']):>13}  "
              f"{r['losses'][-1]:.9g}")
    return rows


if __name__ == "__main__":
    main()
