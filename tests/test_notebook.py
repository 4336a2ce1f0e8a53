"""The notebooks are executed (on few steps) and stored without outputs."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} has outputs in git: strip them (jupyter nbconvert "
                "--clear-output --inplace)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("LINOPS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = str(Path(__file__).parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
        for out in cell.outputs
    )
    if path.name == "gauss_newton.ipynb":
        assert "Gauss-Newton: final loss" in text
        assert "natural gradient: final loss" in text
        assert "relative difference" in text
    if path.name == "spectral_diagnostics.ipynb":
        assert "hessian spectrum: top-" in text and "0 Conv2d" in text
        assert "GGN top eigenvalues" in text
    if path.name == "cg_newton.ipynb":
        assert "data: " in text and "held-out accuracy" in text
        assert "CGNewton, GGN" in text and "CGNewton, Hessian" in text and "SGD" in text
        assert "CGNewton, PCH (abs)" in text
    if path.name == "diag_ggn_optimizer.ipynb":
        assert "DiagGGN (MC): at iteration" in text and "SGD: at iteration" in text
        assert "data used here:" in text
