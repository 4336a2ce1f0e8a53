"""``linops.curvature.quantities`` equals BackPACK on issue 7's two reference models.

BackPACK (``backpack-for-pytorch`` 1.7.1) lives in the peers' virtual environment
(``benchmarks/.envs/peers``, made by ``bash benchmarks/setup_peers.sh peers``), not in ours:
each test runs ``benchmarks/peers/backpack_quantities.py --values FILE`` there as a
subprocess, which builds the model and data from the same seed (the script is plain torch
up to its BackPACK calls; this file loads its ``make_problem`` by path), computes every
extension in float64 and ``torch.save``s ``{name: {param_name: tensor}}``; the test computes
ours on the same model and data and compares every name and parameter. Without that
environment (CI has none) the tests skip and say so.

Models (``make_problem``): the CNN Conv2d(1,20,5)-ReLU-MaxPool2d(2)-Conv2d(20,50,5)-ReLU-
MaxPool2d(2)-Flatten-Linear(800,500)-ReLU-Linear(500,10) at batch 4 (BackPACK's
``SqrtGGNExact`` on it takes about a second per 4 samples) and Sequential(Flatten(),
Linear(784, 10)) at batch 8, 28 × 28 random inputs, ``CrossEntropyLoss()`` (mean).

Monte-Carlo names (``diag_ggn_mc``, ``diag_ggn_mc_batch``, ``sqrt_ggn_mc``, with 3 samples)
are compared exactly too: both sides draw the labels with one ``torch.multinomial(probs,
S, replacement=True)`` call on torch's global generator (BackPACK through
``Categorical(probs).sample((S,))``, ours with ``seed=None``), so ``torch.manual_seed(0)``
right before each forward pass gives both the same draws. If only those names fail, first
check whether either side changed how it samples.

The non-Monte-Carlo names are computed in one ``quantities`` call (the shared forward and
backward passes); BackPACK computes each extension in its own backward pass.
"""

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
from _helpers import PEERS_PYTHON, REPO, backpack_missing

from linops.curvature import quantities

SCRIPT = REPO / "benchmarks" / "peers" / "backpack_quantities.py"
BATCH = {"cnn": 4, "linear": 8}
MC_SAMPLES = 3
SEED = 0
RTOL = 1e-9  # float64 on both sides: the measured differences are ≤ 2e-15 of the largest entry


def _load_script():
    spec = importlib.util.spec_from_file_location("backpack_quantities_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BQ = _load_script()


def _start_backpack(problem: str, tmp_path: Path):
    """Start BackPACK's process (it runs while ours computes); ``(process, cmd, file)``."""
    reason = backpack_missing()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / f"backpack_{problem}.pt"
    cmd = [str(PEERS_PYTHON), str(SCRIPT), "--values", str(out), "--problem", problem,
           "--batch", str(BATCH[problem]), "--mc_samples", str(MC_SAMPLES),
           "--seed", str(SEED), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    return proc, cmd, out


def _backpack_values(proc, cmd, out) -> dict:
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in 600 s")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{stderr[-3000:]}"
    saved = torch.load(out, weights_only=False)
    assert not saved["errors"], f"BackPACK raised: {saved['errors']}"
    return saved["values"]


def _ours(problem: str) -> dict:
    model, X, y, loss_fn = BQ.make_problem(problem, BATCH[problem], torch.float64, SEED)
    mc = [n for n in BQ.NAMES if BQ.EXTENSIONS[n][2]]
    exact = [n for n in BQ.NAMES if n not in mc]
    got = dict(quantities(model, loss_fn, (X, y), exact))
    for name in mc:
        torch.manual_seed(SEED)  # the draws BackPACK makes after the same call
        got[name] = quantities(model, loss_fn, (X, y), [name], mc_samples=MC_SAMPLES)[name]
    return got


def _differences(ours: dict, theirs: dict) -> list[str]:
    problems = []
    for name in BQ.NAMES:
        if set(ours[name]) != set(theirs[name]):
            problems.append(f"{name}: parameters {sorted(ours[name])} vs BackPACK's "
                            f"{sorted(theirs[name])}")
            continue
        for p, b in theirs[name].items():
            a = ours[name][p]
            if a.shape != b.shape:
                problems.append(f"{name}[{p}]: shape {tuple(a.shape)} vs BackPACK's "
                                f"{tuple(b.shape)}")
                continue
            if a.dtype != b.dtype:
                problems.append(f"{name}[{p}]: dtype {a.dtype} vs BackPACK's {b.dtype}")
                continue
            scale = float(b.abs().max())
            err = float((a - b).abs().max())
            if not err <= RTOL * max(scale, 1e-300):
                ratio = float(a.sum() / b.sum()) if float(b.sum()) != 0 else float("nan")
                problems.append(f"{name}[{p}]: max |ours − BackPACK| = {err:.3e} against "
                                f"max |BackPACK| = {scale:.3e} (sum ratio ours/BackPACK "
                                f"{ratio:.6g})")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["linear", "cnn"])
def test_every_name_equals_backpack(problem, tmp_path):
    proc, cmd, out = _start_backpack(problem, tmp_path)
    try:
        ours = _ours(problem)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    theirs = _backpack_values(proc, cmd, out)
    assert sorted(theirs) == sorted(BQ.NAMES)
    problems = _differences(ours, theirs)
    assert not problems, (f"{problem} (batch {BATCH[problem]}, float64): ours differs from "
                          "BackPACK:\n" + "\n".join(problems))


def test_script_models_are_the_reference_ones():
    """The script's models are issue 7's (parameter counts), so the parity tests and the
    benchmark run what the issue names."""
    counts = {p: sum(t.numel() for t in BQ.make_model(p).parameters()) for p in BQ.BATCH}
    assert counts == {"cnn": 431_080, "linear": 7_850}
    assert BQ.BATCH == {"cnn": 128, "linear": 512}
