"""Spectral diagnostics of networks: the SLQ spectral density, a per-layer report of a
model's curvature, and matplotlib figures (matplotlib is imported only when plotting).
"""

from .density import SpectralDensity, spectral_density, wasserstein1
from .plot import plot_density, plot_report
from .report import Report, ReportRow, layer_groups, report

__all__ = ["SpectralDensity", "spectral_density", "wasserstein1", "report", "Report",
           "ReportRow", "layer_groups", "plot_density", "plot_report"]
