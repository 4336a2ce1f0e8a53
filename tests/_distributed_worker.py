"""One rank of ``tests/test_distributed.py``: run as ``python _distributed_worker.py RANK
WORLD_SIZE PORT OUT_DIR``. Every check runs in this one process (gloo, float64); the
results go to ``OUT_DIR/rank{RANK}.pt`` as ``{name: (distributed, one-process reference)}``
for the comparisons and ``{name: error message}`` for the misuse checks, which the test
asserts on. The test kills the ranks after a hard timeout, so a hang fails it.
"""

from __future__ import annotations

import datetime
import faulthandler
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import linops
import solvers
from linops.curvature import GGN, EmpiricalFisher, Hessian, MCFisher

N_FEATURES, N_CLASSES = 3, 3
SPLIT = 8  # rank 0 holds samples [0, 8) in two batches, rank 1 the 5 others in one


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(13, N_FEATURES, generator=g)
    y = torch.randint(0, N_CLASSES, (13,), generator=g)
    return X, y


def shard(rank):
    X, y = data()
    if rank == 0:
        return [(X[:5], y[:5]), (X[5:SPLIT], y[5:SPLIT])]
    return [(X[SPLIT:], y[SPLIT:])]


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(N_FEATURES, 4), nn.Tanh(), nn.Linear(4, N_CLASSES))


def caught(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def layerwise(rank, world, group, model, loss, local, res, errors):
    """quantities, DiagGGN, DiagHessian, KFAC and op.diag() over the group against one
    process on the whole data (MC draws: rank r with seed + r·2³²)."""
    from linops.curvature import KFAC, DiagGGN, DiagHessian, quantities

    X, y = data()
    names = ["sum_grad_squared", "variance", "diag_ggn_exact", "diag_h", "grad_batch"]
    q = quantities(model, loss, local, names, process_group=group)
    r = quantities(model, loss, (X, y), names)
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, X.shape[0])
    for n in names:
        for p in q[n]:
            want = r[n][p][lo:hi] if n == "grad_batch" else r[n][p]  # per-sample: this rank's
            res[f"quantities {n} {p}"] = (q[n][p], want)
    D, Dr = DiagGGN(model, loss, local, process_group=group), DiagGGN(model, loss, (X, y))
    res["DiagGGN"], res["DiagGGN gradient"] = (D.d, Dr.d), (D.gradient, Dr.gradient)
    res["DiagGGN loss"] = (D.loss, Dr.loss)
    Dm = DiagGGN(model, loss, local, mc_samples=2, seed=5, process_group=group)
    parts = [DiagGGN(model, nn.CrossEntropyLoss(reduction="sum"), shard(r_), mc_samples=2,
                     seed=5 + (r_ << 32)).d for r_ in range(world)]
    res["DiagGGN mc"] = (Dm.d, sum(parts) / X.shape[0])
    H = DiagHessian(model, loss, local, process_group=group)
    res["DiagHessian"] = (H.d, DiagHessian(model, loss, (X, y)).d)
    for fisher in ("exact", "empirical"):
        K = KFAC(model, loss, local, fisher=fisher, process_group=group)
        Kr = KFAC(model, loss, (X, y), fisher=fisher)
        res[f"KFAC {fisher}"] = (K.to_dense(), Kr.to_dense())
        res[f"KFAC {fisher} gradient"] = (K.gradient, Kr.gradient)
    kq = quantities(model, loss, local, ["kflr"], process_group=group)["kflr"]
    kr = quantities(model, loss, (X, y), ["kflr"])["kflr"]
    for p in kq:
        for i, (a, b) in enumerate(zip(kq[p], kr[p])):
            res[f"quantities kflr {p} factor {i}"] = (a, b)
    for cls in (GGN, Hessian, EmpiricalFisher):
        op = cls(model, loss, local, process_group=group)
        res[f"{cls.__name__}.diag()"] = (op.diag(), cls(model, loss, (X, y)).diag())
    op = MCFisher(model, loss, local, mc_samples=2, seed=3, process_group=group)
    res["MCFisher.diag() equals its own to_dense diagonal"] = (op.diag(),
                                                             torch.diagonal(op.to_dense()))
    bad = local if rank == 0 else [(torch.randn(5, N_FEATURES + 1), y[:5])]
    errors["a rank fails in quantities"] = caught(
        lambda: quantities(model, loss, bad, ["diag_ggn_exact"], process_group=group))
    errors["a rank fails in KFAC"] = caught(
        lambda: KFAC(model, loss, bad, fisher="exact", process_group=group))


def main(rank: int, world: int, port: int, out: str) -> None:
    t0 = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=world, timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    res, errors = {}, {}
    model, loss = mlp(), nn.CrossEntropyLoss()
    X, y = data()
    local = shard(rank)
    n = sum(p.numel() for p in model.parameters())

    # every operator, cached and not, on the fast path (GGN and Hessian on autograd too;
    # the two Fishers share the GGN's autograd code)
    kinds = {"GGN": GGN, "Hessian": Hessian, "EmpiricalFisher": EmpiricalFisher,
             "MCFisher": MCFisher}
    for name, cls in kinds.items():
        for cache in (True, False):
            for fast in ((None, False) if cls in (GGN, Hessian) else (None,)):
                extra = {"mc_samples": 2, "seed": 3} if cls is MCFisher else {}
                op = cls(model, loss, local, cache=cache, fast_path=fast,
                         process_group=group, **extra)
                if cls is MCFisher:  # rank r draws with seed + r·2³²: the same, in one process
                    parts = [MCFisher(model, nn.CrossEntropyLoss(reduction="sum"), shard(r),
                                      mc_samples=2, seed=3 + (r << 32), fast_path=fast)
                             for r in range(world)]
                    ref_dense = sum(p.to_dense() for p in parts) / X.shape[0]
                    ref = GGN(model, loss, [(X, y)], fast_path=fast)  # loss and gradient
                else:
                    ref = cls(model, loss, (X, y), fast_path=fast, **extra)
                    ref_dense = ref.to_dense()
                tag = f"{name} cache={cache} fast_path={fast}"
                res[f"{tag}: to_dense"] = (op.to_dense(), ref_dense)
                v = torch.linspace(-1, 1, n)
                res[f"{tag}: matvec"] = (op @ v, ref_dense @ v)
                res[f"{tag}: gradient"] = (op.gradient, ref.gradient)
                res[f"{tag}: loss"] = (op.loss, ref.loss)
                if cache:
                    res[f"{tag}: num_terms"] = (torch.tensor(float(op.num_terms)),
                                                torch.tensor(float(X.shape[0])))

    print(f"rank {rank}: operators {time.perf_counter() - t0:.1f} s", flush=True)
    # a sum-reduced loss (no scaling) and a DDP-wrapped model
    mse = nn.MSELoss(reduction="sum")
    Y = torch.sin(torch.arange(13 * N_CLASSES, dtype=torch.float64)).reshape(13, N_CLASSES)
    ys = ([(X[:5], Y[:5]), (X[5:SPLIT], Y[5:SPLIT])] if rank == 0
          else [(X[SPLIT:], Y[SPLIT:])])
    op = GGN(model, mse, ys, process_group=group)
    res["GGN MSE sum: to_dense"] = (op.to_dense(), GGN(model, mse, (X, Y)).to_dense())
    ddp = nn.parallel.DistributedDataParallel(mlp())
    op = GGN(ddp, loss, local, process_group=group,
             params={"2.weight": ddp.module[2].weight})
    ref = GGN(model, loss, (X, y), params={"2.weight": model[2].weight})
    res["GGN of a DDP model, params of the unwrapped one"] = (op.to_dense(), ref.to_dense())
    errors["DDP model without process_group"] = caught(lambda: GGN(ddp, loss, local))

    # solvers, unchanged, on the distributed operator and on the one-process one
    G = GGN(model, loss, local, process_group=group)
    R = GGN(model, loss, (X, y))
    cg = solvers.CG(tol=1e-12, max_iters=200)
    x = solvers.inv(G + 1e-3 * linops.I_like(G), alg=cg) @ G.gradient
    xr = solvers.inv(R + 1e-3 * linops.I_like(R), alg=cg) @ R.gradient
    res["CG solve"] = (x, xr)
    lz = solvers.Lanczos(tol=1e-10, seed=0)
    res["eigmax"] = (solvers.eigmax(G, alg=lz), solvers.eigmax(R, alg=lz))
    ht = solvers.Hutchinson(samples=6, seed=0)
    res["Hutchinson trace"] = (solvers.trace(G, ht), solvers.trace(R, ht))
    res["exact trace"] = (solvers.trace(G), torch.trace(R.to_dense()))
    # three optimizer steps: every rank steps on its shard, as one process on the whole batch
    m_dist, m_one = mlp(), mlp()
    # (converged, well-conditioned solves: 20 CG iterations on a system as ill-conditioned
    # as damping 1e-3 makes it amplify the rounding of the sums' order to 1e-5, in one
    # process as on several)
    exact = solvers.CG(tol=1e-11, max_iters=100)
    opt_d = solvers.optim.GaussNewton(m_dist, loss, lr=0.5, damping=0.1, alg=exact,
                                      process_group=group)
    opt_1 = solvers.optim.GaussNewton(m_one, loss, lr=0.5, damping=0.1, alg=exact)
    batch = (torch.cat([a for a, _ in local]), torch.cat([b for _, b in local]))
    for i in range(3):
        ld, _ = opt_d.step(batch)
        l1, _ = opt_1.step((X, y))
        res[f"GaussNewton step {i + 1}: loss"] = (ld, l1)
    res["GaussNewton: parameters after 3 steps"] = (
        torch.cat([p.detach().reshape(-1) for p in m_dist.parameters()]),
        torch.cat([p.detach().reshape(-1) for p in m_one.parameters()]))

    print(f"rank {rank}: solvers {time.perf_counter() - t0:.1f} s", flush=True)
    layerwise(rank, world, group, model, loss, local, res, errors)
    # misuse: every rank raises, none hangs
    torch.manual_seed(100 + rank)  # torch's global generator differs across ranks
    errors["Lanczos seeded from the global generator"] = caught(
        lambda: solvers.eigmax(G, alg=solvers.Lanczos(tol=1e-6, max_iters=5)))
    bad = mlp()
    if rank == 1:
        with torch.no_grad():
            bad[0].bias[0] += 1e-9
    errors["parameters differ"] = caught(lambda: GGN(bad, loss, local, process_group=group))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(N_FEATURES, N_CLASSES))
    Xs = local[0][0] if rank == 0 else local[0][0].unsqueeze(-1)
    errors["batch shapes differ"] = caught(
        lambda: GGN(flat, loss, (Xs, local[0][1]), process_group=group))
    wrong = local if rank == 0 else [(torch.randn(5, N_FEATURES + 1), y[:5])]
    errors["a rank fails at build"] = caught(
        lambda: GGN(model, loss, wrong, process_group=group, cache=True))
    later = local if rank == 0 else local + [(torch.randn(5, N_FEATURES + 1), y[:5])]
    op = GGN(model, loss, later, process_group=group, cache=False)
    errors["a rank fails in a product"] = caught(lambda: op @ torch.ones(n))
    errors["a rank fails in the gradient"] = caught(lambda: op.gradient)
    errors["not a process group"] = caught(lambda: GGN(model, loss, local, process_group=1))
    # the group still works after all of these
    res["after the errors"] = (G @ torch.ones(n), R @ torch.ones(n))
    print(f"rank {rank}: done {time.perf_counter() - t0:.1f} s", flush=True)
    dist.barrier()
    res = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in res.items()}
    torch.save({"results": res, "errors": errors}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    # float64 for every check; set here, not at import (pytest's doctest collection imports
    # this module and would change the default dtype of the whole test worker)
    torch.set_default_dtype(torch.float64)
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    faulthandler.dump_traceback_later(float(sys.argv[5]), exit=True)  # a hang shows where
    try:
        main(rank, world, port, out)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
