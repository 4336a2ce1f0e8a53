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
    res["KFAC exact, bias='joint'"] = (
        KFAC(model, loss, local, fisher="exact", bias="joint", process_group=group).to_dense(),
        KFAC(model, loss, (X, y), fisher="exact", bias="joint").to_dense())
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


class _Counted:
    """Counts the calls of ``torch.distributed.all_reduce`` while active."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self._orig = dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        return False


class _BadAfterOnePass:
    """This rank's batches for one full pass, then (on rank 1) a batch that does not fit
    the model: the second pass over the data fails there (EKFAC's refit)."""

    def __init__(self, batches, rank):
        self.batches, self.rank, self.passes = batches, rank, 0

    def __iter__(self):
        if self.passes >= 1 and self.rank == 1:
            yield (torch.randn(5, N_FEATURES + 1), self.batches[0][1][:5])
            return
        yield from self.batches
        self.passes += 1


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def kronecker_blocks_optimizers(rank, world, group, model, loss, local, res, errors):
    """EKFAC, BlockDiagCurvature, the CGNewton / DiagGGN / KFAC optimizers and the unseeded
    randomized solvers over the group against one process on the whole data."""
    from linops.curvature import EKFAC, BlockDiagCurvature

    X, y = data()
    n = sum(p.numel() for p in model.parameters())
    # EKFAC: the factors, then the refitted diagonal, each reduced once
    for fisher in ("exact", "empirical"):
        E = EKFAC(model, loss, local, fisher=fisher, process_group=group)
        Er = EKFAC(model, loss, (X, y), fisher=fisher)
        res[f"EKFAC {fisher}"] = (E.to_dense(), Er.to_dense())
        res[f"EKFAC {fisher} gradient"] = (E.gradient, Er.gradient)
        res[f"EKFAC {fisher} loss"] = (E.loss, Er.loss)
    with _Counted() as c:
        EKFAC(model, loss, local, fisher="exact", process_group=group)
    # two passes, each a MAX agreement and one SUM of every factor (diagonal) and count
    res["EKFAC all-reduces"] = (torch.tensor(float(c.calls)), torch.tensor(4.0))
    # BlockDiagCurvature: whole products, block products (one all-reduce per block of k
    # columns), loss, gradient, diag(), solves; cached over rank 0's two batches and not
    V = torch.sin(torch.arange(n * 3, dtype=torch.float64)).reshape(n, 3)
    for curvature in ("ggn", "hessian", "pch-abs"):
        for cache in (False, True):
            C = BlockDiagCurvature(model, loss, local, curvature=curvature, cache=cache,
                                   process_group=group)
            Cr = BlockDiagCurvature(model, loss, (X, y), curvature=curvature)
            tag = f"BlockDiagCurvature {curvature} cache={cache}"
            D = Cr.to_dense()
            res[f"{tag}: to_dense"] = (C.to_dense(), D)
            res[f"{tag}: matmat"] = (C @ V, D @ V)
            res[f"{tag}: loss"], res[f"{tag}: gradient"] = (C.loss, Cr.loss), (C.gradient,
                                                                               Cr.gradient)
            if curvature != "pch-abs":
                res[f"{tag}: diag()"] = (C.diag(), Cr.diag())
            if cache:
                res[f"{tag}: num_terms"] = (torch.tensor(float(C.num_terms)),
                                            torch.tensor(13.0))
            lo = 0
            for b, (blk, blk_r) in enumerate(zip(C.blocks, Cr.blocks)):
                Vb = V[lo:lo + blk.shape[0]]
                lo += blk.shape[0]
                with _Counted() as c:
                    got = blk @ Vb
                res[f"{tag}: block {b} product"] = (got, blk_r @ Vb)
                res[f"{tag}: block {b} product, all-reduces"] = (
                    torch.tensor(float(c.calls)), torch.tensor(1.0))
            if curvature == "ggn":
                with _Counted() as c:
                    C @ V
                res[f"{tag}: product, all-reduces"] = (torch.tensor(float(c.calls)),
                                                       torch.tensor(1.0))
                cg = solvers.CG(tol=1e-12, max_iters=200)
                A, Ar = (linops.PSD(M + 0.1 * linops.I_like(M)) for M in (C.blocks[0],
                                                                           Cr.blocks[0]))
                b0 = C.gradient[:A.shape[0]]
                res[f"{tag}: CG solve with block 0"] = (solvers.inv(A, alg=cg) @ b0,
                                                        solvers.inv(Ar, alg=cg) @ b0)
    # three optimizer steps on 2 ranks equal three one-process steps on the whole data
    batch = (torch.cat([a for a, _ in local]), torch.cat([b for _, b in local]))
    optimizers = {
        "CGNewton ggn parameter": (solvers.optim.CGNewton, dict(
            lr=0.5, alpha=0.1, cg_tol=1e-11, cg_maxiter=100)),
        "CGNewton hessian layer": (solvers.optim.CGNewton, dict(
            lr=0.5, alpha=0.3, cg_tol=1e-11, cg_maxiter=100, curvature="hessian",
            blocks="layer", on_failure="ignore")),
        "CGNewton pch-abs": (solvers.optim.CGNewton, dict(
            lr=0.5, alpha=0.1, cg_tol=1e-11, cg_maxiter=100, curvature="pch-abs")),
        "CGNewton kflr": (solvers.optim.CGNewton, dict(
            lr=0.5, alpha=0.1, cg_tol=1e-11, cg_maxiter=100, approximation="kflr")),
        "CGNewton full adapt_damping": (solvers.optim.CGNewton, dict(
            lr=0.5, alpha=0.1, cg_tol=1e-11, cg_maxiter=100, blocks="full",
            adapt_damping=True)),
        "DiagGGN exact": (solvers.optim.DiagGGN, dict(lr=0.1, damping=0.5,
                                                       curvature="exact")),
        "KFAC exact": (solvers.optim.KFAC, dict(lr=0.5, damping=0.1, fisher="exact",
                                                update_every=2)),
        "KFAC empirical pi": (solvers.optim.KFAC, dict(lr=0.5, damping=0.1,
                                                       fisher="empirical", update_every=2,
                                                       damping_kind="pi")),
    }
    for name, (cls, kw) in optimizers.items():
        m_dist, m_one = mlp(), mlp()
        opt_d = cls(m_dist, loss, process_group=group, **kw)
        opt_1 = cls(m_one, loss, **kw)
        for i in range(3):
            ld, _ = opt_d.step(batch)
            l1, _ = opt_1.step((X, y))
            res[f"optimizer {name} step {i + 1}: loss"] = (ld, l1)
        res[f"optimizer {name}: parameters after 3 steps"] = (_flat(m_dist), _flat(m_one))
        if "adapt_damping" in kw:
            res[f"optimizer {name}: adapted alpha"] = (
                torch.tensor(opt_d.param_groups[0]["alpha"]),
                torch.tensor(opt_1.param_groups[0]["alpha"]))
    # a DDP-wrapped model: the optimizer unwraps it
    ddp = nn.parallel.DistributedDataParallel(mlp())
    m_one = mlp()
    opt_d = solvers.optim.DiagGGN(ddp, loss, curvature="exact", process_group=group)
    opt_1 = solvers.optim.DiagGGN(m_one, loss, curvature="exact")
    for _ in range(2):
        opt_d.step(batch)
        opt_1.step((X, y))
    res["optimizer DiagGGN of a DDP model: parameters"] = (_flat(ddp.module), _flat(m_one))
    # MC optimizers unseeded: every rank draws the step's seed from rank 0's generator
    torch.manual_seed(200 + rank)
    opt = solvers.optim.DiagGGN(mlp(), loss, process_group=group)
    opt.step(batch)
    seeds = torch.tensor([float(opt.last["seed"])] * world)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, seeds[:1])
    res["optimizer DiagGGN mc, seed=None: the same seed on every rank"] = (
        torch.cat(gathered), seeds)

    # unseeded randomized solvers: a seed drawn on rank 0 and shared; torch's global
    # generator differs across ranks
    torch.manual_seed(100 + rank)
    G = GGN(model, loss, local, process_group=group)
    R = GGN(model, loss, (X, y))
    lz = solvers.Lanczos(tol=1e-10)
    res["unseeded eigmax (Lanczos)"] = (solvers.eigmax(G, alg=lz), solvers.eigmax(R, alg=lz))
    res["unseeded eigmax of G + 0.1 I (Lanczos)"] = (
        solvers.eigmax(linops.PSD(G + 0.1 * linops.I_like(G)), alg=lz),
        solvers.eigmax(linops.PSD(R + 0.1 * linops.I_like(R)), alg=lz))
    top = solvers.LOBPCG(tol=1e-9, max_iters=500)
    res["unseeded eigmax top 2 (LOBPCG)"] = (solvers.eig(G, k=2, alg=top).values,
                                             solvers.eig(R, k=2, alg=top).values)
    pw = solvers.PowerIteration(tol=1e-12, max_iters=5000)
    res["unseeded eigmax (PowerIteration)"] = (
        solvers.eig(G, k=1, which="LM", alg=pw).values,
        solvers.eig(R, k=1, which="LM", alg=pw).values)
    C = BlockDiagCurvature(model, loss, local, process_group=group)
    Cr = BlockDiagCurvature(model, loss, (X, y))
    res["unseeded eigmax of BlockDiagCurvature (Lanczos)"] = (solvers.eigmax(C, alg=lz),
                                                              solvers.eigmax(Cr, alg=lz))
    for est in (solvers.Hutchinson(samples=8, seed=None), solvers.HutchPP(samples=9, seed=None),
                solvers.XTrace(samples=8, seed=None)):
        res[f"unseeded trace ({type(est).__name__})"] = (solvers.trace(G, est),
                                                         solvers.trace(R, est))

    # a rank that raises makes every rank raise, on the new paths too
    bad = [(torch.randn(5, N_FEATURES + 1), y[:5])]
    errors["a rank fails in EKFAC's refit"] = caught(
        lambda: EKFAC(model, loss, _BadAfterOnePass(local, rank), fisher="exact",
                      process_group=group))
    later = local if rank == 0 else local + bad
    Cbad = BlockDiagCurvature(model, loss, later, process_group=group)
    errors["a rank fails in a block product"] = caught(
        lambda: Cbad.blocks[0] @ torch.ones(Cbad.blocks[0].shape[0], 2))
    opt = solvers.optim.CGNewton(mlp(), loss, process_group=group)
    errors["a rank's optimizer batch is refused"] = caught(
        lambda: opt.step(batch if rank == 0 else [batch[0]]))
    opt = solvers.optim.KFAC(mlp(), loss, fisher="exact", update_every=10,
                             process_group=group)
    opt.step(batch)
    errors["a rank fails in a KFAC optimizer gradient step"] = caught(
        lambda: opt.step(batch if rank == 0 else bad[0]))
    errors["an optimizer with a bad process group"] = caught(
        lambda: solvers.optim.DiagGGN(mlp(), loss, process_group="world"))
    drift = mlp()  # replicas that drifted apart: the layer-wise passes check them too
    if rank == 1:
        with torch.no_grad():
            drift[0].bias[0] += 1e-9
    from linops.curvature import KFAC

    errors["parameters differ in KFAC"] = caught(
        lambda: KFAC(drift, loss, local, fisher="exact", process_group=group))
    errors["parameters differ in a DiagGGN optimizer step"] = caught(
        lambda: solvers.optim.DiagGGN(drift, loss, curvature="exact",
                                      process_group=group).step(batch))
    torch.manual_seed(300 + rank)  # (mlp() above seeded every rank alike)
    errors["a product with vectors from the global generator"] = caught(
        lambda: G @ torch.randn(n))
    res["after the new errors"] = (C.blocks[1] @ torch.ones(C.blocks[1].shape[0]),
                                   Cr.blocks[1] @ torch.ones(Cr.blocks[1].shape[0]))


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
    # curvature preconditioners built from a distributed G take its process group: the one
    # preconditioner of the whole data on every rank, and CG with it as in one process
    v = torch.linspace(-1, 1, n, dtype=torch.float64)
    for kind in ("diag", "kfac", "ekfac"):
        P = solvers.curvature_preconditioner(G, kind, damping=0.1)
        Pr = solvers.curvature_preconditioner(R, kind, damping=0.1)
        res[f"curvature_preconditioner {kind}: product"] = (P @ v, Pr @ v)
    pcg = solvers.CG(tol=1e-12, max_iters=200, preconditioner=P)
    pcg_r = solvers.CG(tol=1e-12, max_iters=200, preconditioner=Pr)
    res["preconditioned CG solve (ekfac)"] = (
        solvers.inv(G + 1e-3 * linops.I_like(G), alg=pcg) @ G.gradient,
        solvers.inv(R + 1e-3 * linops.I_like(R), alg=pcg_r) @ R.gradient)
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
    print(f"rank {rank}: layer-wise {time.perf_counter() - t0:.1f} s", flush=True)
    kronecker_blocks_optimizers(rank, world, group, model, loss, local, res, errors)
    print(f"rank {rank}: EKFAC, blocks, optimizers {time.perf_counter() - t0:.1f} s",
          flush=True)
    # misuse: every rank raises, none hangs
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
