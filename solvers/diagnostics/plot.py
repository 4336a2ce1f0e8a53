"""Figures of spectral densities (matplotlib, imported only here, only when plotting)."""

from __future__ import annotations

import math

import torch

from .density import SpectralDensity

__all__ = ["plot_density", "plot_report"]


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib (an optional dependency): pip install matplotlib"
        ) from exc
    return plt


def plot_density(density: SpectralDensity, ax=None, *, width: float | None = None,
                 scale: str = "linear", label: str | None = None, floor: float = 1e-8,
                 num: int = 1000, **line_kwargs):
    """Draw the smoothed SLQ density on a logarithmic density axis (the usual picture of a
    network spectrum: a bulk near zero and outliers many decades below it in density).

    Args:
        density: a :class:`SpectralDensity`.
        ax: a matplotlib axes (None: a new figure).
        width: Gaussian width (None: 1 % of the range for ``scale="linear"``, 0.1 decade
            for ``"log"``).
        scale: ``"linear"`` (x = λ) or ``"log"`` (x = log10 λ for the positive
            eigenvalues and, dashed, log10 |λ| for the negative ones; the log-spectrum of
            ``SpectralDensity.log_density``).
        label: legend label.
        floor: densities below this are clipped (the log axis needs positive values).
        num: grid points.

    Returns:
        The axes.
    """
    plt = _plt()
    new = ax is None
    if new:
        _, ax = plt.subplots(figsize=(6, 3.5))
    if scale == "linear":
        width = density.suggested_width() if width is None else width
        grid = density.grid(num, width)
        phi = density.density(grid, width).clamp_min(floor)
        ax.semilogy(grid.numpy(), phi.numpy(), label=label, **line_kwargs)
        ax.set_xlabel("eigenvalue λ")
    elif scale == "log":
        width = 0.1 if width is None else width
        x = density.nodes[density.weights > 0].abs()
        tiny = max(float(x.max()) * 1e-12, 1e-300) if x.numel() else 1e-12
        lo = math.log10(max(float(x[x > tiny].min()) if bool((x > tiny).any()) else 1.0, tiny))
        hi = math.log10(max(float(x.max()), tiny))
        grid = torch.linspace(lo - 4 * width, hi + 4 * width, num, dtype=torch.float64)
        pos = density.log_density(grid, width, sign=1, floor=tiny).clamp_min(floor)
        line = ax.semilogy(grid.numpy(), pos.numpy(), label=label, **line_kwargs)[0]
        neg = density.log_density(grid, width, sign=-1, floor=tiny)
        if float(neg.max()) > floor:
            ax.semilogy(grid.numpy(), neg.clamp_min(floor).numpy(), linestyle="--",
                        color=line.get_color(),
                        label=None if label is None else f"{label} (λ < 0, |λ|)")
        ax.set_xlabel("log10 |λ|")
    else:
        raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}.")
    ax.set_ylabel("density")
    if label is not None:
        ax.legend()
    if new:
        ax.figure.tight_layout()
    return ax


def plot_report(report, *, scale: str = "linear", columns: int = 3, others=(), labels=None):
    """One log-density panel per row of a :class:`~solvers.diagnostics.Report` (the network,
    then each layer), titled with the block's size, λ_max and trace.

    Args:
        report: the report.
        scale: ``"linear"`` or ``"log"`` (see :func:`plot_density`).
        columns: panels per row of the figure.
        others: more reports of the same model (e.g. after training) drawn in the same
            panels.
        labels: legend labels, one per report (``report`` first).

    Returns:
        The matplotlib figure.
    """
    plt = _plt()
    reports = [report, *others]
    labels = list(labels) if labels is not None else [None] * len(reports)
    if len(labels) != len(reports):
        raise ValueError("plot_report: give one label per report.")
    rows = report.rows
    ncols = min(columns, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for i, row in enumerate(rows):
        ax = axes[i // ncols][i % ncols]
        same = [rep[row.name] for rep in reports]
        width = None
        if scale == "linear":  # one smoothing width per panel: 1 % of the union of ranges
            lo = min(r.density.range[0] for r in same)
            hi = max(r.density.range[1] for r in same)
            width = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
        for r, lab in zip(same, labels):
            plot_density(r.density, ax, scale=scale, label=lab, width=width)
        lam = " → ".join(f"{float(r.top[0]):.3g}" for r in same)
        tr = " → ".join(f"{r.trace:.3g}" for r in same)
        ax.set_title(f"{row.name} (n={row.n}): λmax {lam}, tr {tr}", fontsize=9)
    for j in range(len(rows), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    fig.suptitle(f"{report.curvature} spectral density (log scale)")
    fig.tight_layout()
    return fig
