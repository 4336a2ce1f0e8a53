"""Data-parallel curvature (``process_group=``) on 2 local gloo processes, float64.

The ranks run ``tests/_distributed_worker.py`` (every check in the same two processes);
each is killed after a hard timeout, so a hang fails the test instead of stalling CI.
Rank 0 holds 8 samples in two batches, rank 1 the other 5 in one: uneven shards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from linops.curvature import GGN

WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT = 240  # seconds for both ranks together, imports included (about 20 s on 2 idle
# cores; the margin is for a machine shared with other jobs). A collective that waits
# longer than 60 s raises in gloo, and a rank still running at TIMEOUT - 10 s prints its
# stack and exits, so a hang fails with where it hung.
WORLD = 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank saved: ``[{"results": ..., "errors": ...}, ...]``."""
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(port),
                               str(out), str(TIMEOUT - 10)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT} s (a hang?): "
                    + " | ".join(p.communicate()[0][-2000:] for p in procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _names(ranks):
    return sorted(ranks[0]["results"])


def test_equals_the_one_process_operator(ranks):
    """Products, to_dense, loss, gradient, num_terms, CG, eigmax, traces, three
    GaussNewton steps, quantities (summed and per-sample), DiagGGN, DiagHessian, KFAC,
    EKFAC, BlockDiagCurvature, op.diag(), three steps of CGNewton, DiagGGN and KFAC, and
    unseeded eigensolvers and estimators on the shards equal the one-process results on
    the whole data, on every rank, to rounding."""
    names = _names(ranks)
    assert len(names) >= 60, names
    for r, rank in enumerate(ranks):
        assert sorted(rank["results"]) == names
        for name, (got, want) in rank["results"].items():
            assert got.dtype == torch.float64, name
            assert got.shape == want.shape, (r, name)
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
            loose = ("Hutchinson", "CG", "eigmax", "GaussNewton", "optimizer",
                     "unseeded")  # iterations amplify rounding
            tol = 1e-9 if any(w in name for w in loose) else 1e-12
            assert err <= tol, f"rank {r}, {name}: relative error {err:.3g}"
    # every rank holds the very same results (no rank took other decisions), but for the
    # per-sample quantities, which stay on their rank
    for name in (n for n in names if "grad_batch" not in n):
        a, b = ranks[0]["results"][name][0], ranks[1]["results"][name][0]
        assert torch.equal(a, b), name


def test_every_rank_raises(ranks):
    e0, e1 = ranks[0]["errors"], ranks[1]["errors"]
    for errs in (e0, e1):
        said = errs["a product with vectors from the global generator"]
        assert "multiplied different vectors" in said and "broadcast" in said, said
        assert errs["an optimizer with a bad process group"].startswith("TypeError")
        for key in ("parameters differ in KFAC",
                    "parameters differ in a DiagGGN optimizer step"):
            assert errs[key].startswith("ValueError") and "different parameters" in errs[key]
        assert errs["parameters differ"].startswith("ValueError")
        assert "different parameters" in errs["parameters differ"]
        assert "non-batch dimensions" in errs["batch shapes differ"]
        assert "X.ndim" in errs["batch shapes differ"]
        assert "process_group=model.process_group" in errs["DDP model without process_group"]
        assert errs["not a process group"].startswith("TypeError")
    # the rank whose data does not fit the model raises its own error; the other names it
    for key, said in [("a rank fails at build", "do not fit the model"),
                      ("a rank fails in a product", "do not fit the model"),
                      ("a rank fails in the gradient", "do not fit the model"),
                      ("a rank fails in quantities", "shapes cannot be multiplied"),
                      ("a rank fails in KFAC", "shapes cannot be multiplied"),
                      ("a rank fails in EKFAC's refit", "shapes cannot be multiplied"),
                      ("a rank fails in a block product", "do not fit the model"),
                      ("a rank's optimizer batch is refused", "takes one batch (X, y)"),
                      ("a rank fails in a KFAC optimizer gradient step",
                       "shapes cannot be multiplied")]:
        assert said in e1[key] and "rank(s)" not in e1[key], e1[key]
        assert e0[key].startswith("RuntimeError") and "rank(s) [1]" in e0[key], e0[key]
        assert said in e0[key], e0[key]  # rank 1's message, gathered


def test_kronecker_blocks_optimizers_and_unseeded_solvers_are_covered(ranks):
    """The worker compared these with one process (checked above): EKFAC, BlockDiagCurvature
    (whole and block products, one all-reduce per block of k columns), three steps of each
    optimizer, and unseeded Lanczos / LOBPCG / PowerIteration / estimators, whose seed
    rank 0 draws and shares (every rank's global generator differs)."""
    names = set(_names(ranks))
    want = ["EKFAC exact", "EKFAC empirical", "EKFAC all-reduces",
            "BlockDiagCurvature hessian cache=False: block 0 product",
            "BlockDiagCurvature ggn cache=True: block 3 product, all-reduces",
            "BlockDiagCurvature pch-abs cache=False: matmat",
            "BlockDiagCurvature ggn cache=False: product, all-reduces",
            "BlockDiagCurvature ggn cache=True: diag()",
            "BlockDiagCurvature ggn cache=False: CG solve with block 0",
            "unseeded eigmax (Lanczos)", "unseeded eigmax top 2 (LOBPCG)",
            "unseeded eigmax (PowerIteration)",
            "unseeded eigmax of BlockDiagCurvature (Lanczos)",
            "unseeded trace (Hutchinson)", "unseeded trace (XTrace)",
            "optimizer DiagGGN of a DDP model: parameters",
            "optimizer DiagGGN mc, seed=None: the same seed on every rank",
            "curvature_preconditioner diag: product", "curvature_preconditioner kfac: product",
            "curvature_preconditioner ekfac: product", "preconditioned CG solve (ekfac)"]
    for opt in ("CGNewton ggn parameter", "CGNewton hessian layer", "CGNewton pch-abs",
                "CGNewton kflr", "CGNewton full adapt_damping", "DiagGGN exact",
                "KFAC exact", "KFAC empirical pi"):
        want += [f"optimizer {opt} step {i}: loss" for i in (1, 2, 3)]
        want.append(f"optimizer {opt}: parameters after 3 steps")
    assert not [w for w in want if w not in names], [w for w in want if w not in names]
    for rank in ranks:
        for name, (got, expected) in rank["results"].items():
            if "all-reduces" in name:
                assert float(got) == float(expected), (name, float(got))
        got, want_ = rank["results"]["unseeded eigmax (Lanczos)"]
        assert abs(float(got - want_)) <= 1e-6 * abs(float(want_))


def test_process_group_not_initialized():
    if dist.is_initialized():
        pytest.skip("this process has a default group")
    model = nn.Linear(2, 2)
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))

    class Fake:
        pass

    with pytest.raises(ValueError, match="init_process_group"):
        GGN(model, nn.CrossEntropyLoss(), data, process_group=Fake())


def test_new_paths_refuse_an_uninitialized_group_at_once():
    """EKFAC, BlockDiagCurvature and the optimizers check process_group= when built."""
    if dist.is_initialized():
        pytest.skip("this process has a default group")
    import solvers
    from linops.curvature import EKFAC, BlockDiagCurvature

    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    loss = nn.CrossEntropyLoss()
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))

    class Fake:
        pass

    builds = [lambda g: EKFAC(model, loss, data, fisher="exact", process_group=g),
              lambda g: BlockDiagCurvature(model, loss, data, process_group=g)]
    builds += [lambda g, cls=cls: cls(model, loss, process_group=g)
               for cls in (solvers.optim.CGNewton, solvers.optim.DiagGGN,
                           solvers.optim.KFAC, solvers.optim.GaussNewton)]
    for build in builds:
        with pytest.raises(ValueError, match="init_process_group"):
            build(Fake())
