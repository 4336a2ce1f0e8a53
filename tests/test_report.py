"""``solvers.diagnostics.report`` and the plots, on a small CNN and an MLP: the numbers
against dense float64 references, the per-layer blocks, the records, bad input; the plots
draw (Agg backend) and matplotlib is imported only when plotting."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from solvers.diagnostics import layer_groups, plot_density, plot_report, report

F64 = torch.float64


def tiny_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 1, 8, 8, dtype=F64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, X, y


def dense_curvature(model, X, y, names, curvature):
    """The dense float64 Hessian (or GGN) of the mean cross-entropy in the parameters
    ``names``, the others fixed, by torch.func."""
    loss_fn = nn.CrossEntropyLoss()
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def out(v):
        ps = {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}
        full = {k: p.detach() for k, p in named.items()}
        full.update(ps)
        return torch.func.functional_call(model, full, (X,))

    if curvature == "hessian":
        return torch.func.hessian(lambda v: loss_fn(out(v), y))(flat)
    J = torch.func.jacrev(out)(flat).reshape(-1, flat.numel())
    o = out(flat).detach()
    Ho = torch.func.hessian(lambda z: loss_fn(z.reshape(o.shape), y))(o.reshape(-1))
    return J.T @ Ho.reshape(J.shape[0], -1) @ J


def test_layer_groups_pair_weight_and_bias():
    model, _, _ = tiny_cnn()
    groups = layer_groups(model)
    assert [g[0] for g in groups] == ["0 Conv2d", "4 Linear", "6 Linear"]
    assert list(groups[0][1]) == ["0.weight", "0.bias"]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_report_numbers_against_dense_references(curvature):
    model, X, y = tiny_cnn()
    rep = report(model, nn.CrossEntropyLoss(), (X, y), curvature, top_k=3, trace_samples=40,
                 num_probes=4, num_steps=30, tol=1e-8)
    assert [r.name for r in rep.rows] == ["network", "0 Conv2d", "4 Linear", "6 Linear"]
    for r in rep.rows:
        D = dense_curvature(model, X, y, r.params, curvature)
        ev = torch.linalg.eigvalsh((D + D.T) / 2)
        assert r.n == D.shape[0]
        k = len(r.top)
        assert r.num_converged == k
        assert torch.allclose(r.top, ev.flip(0)[:k], rtol=1e-6, atol=1e-9)
        assert abs(r.trace - float(ev.sum())) <= 4 * r.trace_std_error + 1e-8 * abs(float(ev.sum()))
        assert abs(float(r.density.weights.sum()) - 1) < 1e-12
        assert r.products >= r.density.products > 0 and r.seconds > 0
    # the blocks' traces add up to the network's (exact here: every block is small)
    total = sum(r.trace for r in rep.rows[1:])
    assert abs(total - rep["network"].trace) <= 4 * rep["network"].trace_std_error + 1e-8
    text = str(rep)
    assert "network" in text and "0 Conv2d" in text and "trace ± s.e." in text
    assert rep.to_dicts()[0]["name"] == "network"


def test_report_bad_input():
    model, X, y = tiny_cnn()
    for kw, match in ((dict(curvature="fisher"), "curvature"),
                      (dict(top_k=0), "top_k"), (dict(num_probes=0), "num_probes"),
                      (dict(num_steps=0), "num_steps"), (dict(trace_samples=5), "trace_samples")):
        with pytest.raises(ValueError, match=match):
            report(model, nn.CrossEntropyLoss(), (X, y), **kw)


def test_plots_draw_and_matplotlib_is_imported_only_when_plotting():
    code = ("import sys, solvers, solvers.diagnostics; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
    import matplotlib

    matplotlib.use("Agg")
    model, X, y = tiny_cnn()
    rep = report(model, nn.CrossEntropyLoss(), (X, y), "ggn", per_layer=True, top_k=2,
                 trace_samples=8, num_probes=2, num_steps=10)
    fig = plot_report(rep, others=[rep], labels=["a", "b"])
    assert len([a for a in fig.axes if a.has_data()]) == 4
    ax = plot_density(rep["network"].density, scale="log")
    assert ax.get_xlabel() == "log10 |λ|"
    lines = ax.get_lines()
    assert lines and np.all(np.isfinite(lines[0].get_ydata()))
    with pytest.raises(ValueError, match="scale"):
        plot_density(rep["network"].density, scale="cubic")
    import matplotlib.pyplot as plt

    plt.close("all")


def test_report_over_a_list_of_batches_with_progress_bars():
    """Over two batches (as from a DataLoader), the mean loss's curvature is the full
    batch's: the same top eigenvalues; tqdm bars over the passes."""
    model, X, y = tiny_cnn()
    kw = dict(per_layer=False, top_k=2, trace_samples=8, num_probes=2, num_steps=10, tol=1e-8)
    one = report(model, nn.CrossEntropyLoss(), (X, y), "ggn", **kw)
    two = report(model, nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])], "ggn",
                 progress=True, **kw)
    assert torch.allclose(one.rows[0].top, two.rows[0].top, rtol=1e-6)
