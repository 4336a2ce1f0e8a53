"""``report``: the spectral diagnostics of a model's curvature in one call, for the whole
network and for each layer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..eigen import eig
from ..estimators import XTrace
from ..lanczos import Lanczos
from ..trace import trace
from .density import SpectralDensity, spectral_density

__all__ = ["Report", "ReportRow", "report", "layer_groups"]

_CURVATURES = ("hessian", "ggn")


@dataclass
class ReportRow:
    """One line of a :class:`Report`: the curvature restricted to a group of parameters.

    Attributes:
        name: ``"network"`` or the module's name and type (``"0 Conv2d"``,
            ``"features.conv1 Conv2d"``, ...).
        params: the parameter names of the group.
        n: its number of parameters (the size of the curvature block).
        top: the ``top_k`` largest eigenvalues (descending), float64.
        num_converged: how many of them passed the eigen-solver's residual test.
        trace, trace_std_error: the trace (XTrace estimate, or exact with n products for
            groups of at most ``trace_samples/2`` parameters) and its standard error.
        density: the SLQ :class:`SpectralDensity` of the block.
        products: products with the block spent (eigenvalues + trace + density).
        seconds: wall time of the row.
    """

    name: str
    params: list
    n: int
    top: torch.Tensor
    num_converged: int
    trace: float
    trace_std_error: float
    density: SpectralDensity
    products: int
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class Report:
    """The spectral diagnostics of ``curvature`` for a model: ``rows[0]`` is the whole
    network, the others one layer each (``per_layer=True``). ``str(report)`` is a table;
    ``report.to_dicts()`` the same as plain dicts; ``solvers.diagnostics.plot_report`` draws
    the densities."""

    curvature: str
    rows: list
    settings: dict

    def __getitem__(self, name: str) -> ReportRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")

    def to_dicts(self) -> list[dict]:
        return [dict(name=r.name, n=r.n, top=r.top.tolist(), num_converged=r.num_converged,
                     trace=r.trace, trace_std_error=r.trace_std_error,
                     lambda_min=r.density.range[0], products=r.products, seconds=r.seconds)
                for r in self.rows]

    def __str__(self) -> str:
        k = self.settings["top_k"]
        head = (f"{'block':<18}{'params':>9}  {'λ_max':>10}  {'top-' + str(k) + ' (sure)':>11}"
                f"  {'trace ± s.e.':>22}  {'λ_min (SLQ)':>11}  {'products':>8}")
        lines = [f"{self.curvature} spectrum: top-{k} by block Lanczos, trace by XTrace, "
                 f"density by SLQ ({self.settings['num_probes']} probes × "
                 f"{self.settings['num_steps']} steps)", head, "-" * len(head)]
        for r in self.rows:
            tr = f"{r.trace:.4g} ± {r.trace_std_error:.2g}"
            lines.append(f"{r.name:<18}{r.n:>9}  {float(r.top[0]):>10.4g}  "
                         f"{r.num_converged:>7}/{len(r.top):<3}  {tr:>22}  "
                         f"{r.density.range[0]:>11.3g}  {r.products:>8}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def layer_groups(model: nn.Module, params=None) -> list[tuple[str, dict]]:
    """``[(block name, {parameter name: tensor})]``: the trainable parameters grouped by the
    module that owns them directly (a layer's weight and bias together), in model order;
    a block is named by the module's name and type, e.g. ``"0 Conv2d"``."""
    chosen = None if params is None else set(params)
    groups = []
    for mname, module in model.named_modules():
        own = {}
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.requires_grad and (chosen is None or full in chosen):
                own[full] = p
        if own:
            groups.append((f"{mname or '(root)'} {type(module).__name__}", own))
    return groups


def report(
    model: nn.Module,
    loss_fn: nn.Module,
    data,
    curvature: str = "hessian",
    per_layer: bool = True,
    *,
    top_k: int = 5,
    trace_samples: int = 100,
    num_probes: int = 10,
    num_steps: int = 80,
    tol: float = 1e-3,
    seed: int = 0,
    params=None,
    progress: bool = False,
    **operator_options,
) -> Report:
    """Top eigenvalues, trace and spectral density of a model's curvature, for the whole
    network and (``per_layer``) for each layer's block.

    For each block (all parameters, then each module's own parameters, e.g. one layer's
    weight and bias) it builds ``linops.curvature.Hessian`` or ``GGN`` with ``params=`` the
    block, and runs:

    * ``eig(C, top_k)`` by block Lanczos (``Lanczos(tol=tol, seed=seed)``, a block of
      ``top_k``): the top eigenvalues, and how many passed the residual test;
    * ``trace(C, XTrace(trace_samples))``, or the exact trace with n products when the block
      has at most ``trace_samples/2`` parameters;
    * ``spectral_density(C, num_probes, num_steps, seed)``.

    A layer's block is the diagonal block of the network's curvature (the curvature of the
    loss in that layer's parameters, the others fixed), so its eigenvalues interlace with
    the network's and the traces of the blocks add up to the network's trace.

    Args:
        model, loss_fn, data: as for ``linops.curvature.Hessian`` (one batch ``(X, y)`` or
            a DataLoader of batches).
        curvature: ``"hessian"`` or ``"ggn"``.
        per_layer: add one row per module that owns parameters.
        top_k, trace_samples, num_probes, num_steps, tol, seed: the budgets (see above).
        params: restrict to these parameter names (None: all trainable ones).
        progress: tqdm progress bars over the data at each pass (needs tqdm), and one over
            the blocks.
        operator_options: passed to the curvature operators (``cache=True``, ...).

    Cost in products per block: the Lanczos run (about 10–30 block steps of ``top_k``),
    ``trace_samples``, and ``num_probes × num_steps``; each is recorded in the row.
    """
    import linops

    if curvature not in _CURVATURES:
        raise ValueError(f"report: curvature must be one of {_CURVATURES}, got {curvature!r}.")
    for name, v in (("top_k", top_k), ("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"report: {name} must be a positive int, got {v!r}.")
    if isinstance(trace_samples, bool) or not isinstance(trace_samples, int) or \
            trace_samples < 4 or trace_samples % 2:
        raise ValueError("report: trace_samples must be an even int ≥ 4 (XTrace spends two "
                         f"products per test vector), got {trace_samples!r}.")
    cls = linops.curvature.Hessian if curvature == "hessian" else linops.curvature.GGN
    groups = layer_groups(model, params)
    if not groups:
        raise ValueError("report: the model has no trainable parameters to report on.")
    blocks = [("network", {n: p for _, g in groups for n, p in g.items()})]
    if per_layer:
        blocks += groups
    it = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=f"{curvature} report", unit="block")
    rows = []
    for name, group in it:
        start = time.perf_counter()
        op = cls(model, loss_fn, data, params=dict(group), progress=progress,
                 **operator_options)
        n = op.shape[0]
        k = min(top_k, n)
        res = eig(op, k=k, alg=Lanczos(tol=tol, seed=seed, on_failure="warn"))
        eig_products = res.solution.info.get("products", 0) if res.solution is not None else n
        if n <= trace_samples // 2:
            t = trace(op)  # exact: n products
            tr, tr_err, tr_products = float(t), 0.0, n
        else:
            t = trace(op, XTrace(samples=trace_samples, seed=seed))
            tr, tr_err, tr_products = float(t), float(t.estimate.std_error), t.estimate.products
        dens = spectral_density(op, num_probes, num_steps, seed=seed)
        rows.append(ReportRow(
            name=name, params=list(group), n=n, top=res.values.detach().to(torch.float64).cpu(),
            num_converged=res.num_converged, trace=tr, trace_std_error=tr_err, density=dens,
            products=int(eig_products + tr_products + dens.products),
            seconds=time.perf_counter() - start,
            info=dict(eig_solution=res.solution),
        ))
    settings = dict(top_k=top_k, trace_samples=trace_samples, num_probes=num_probes,
                    num_steps=num_steps, tol=tol, seed=seed)
    return Report(curvature, rows, settings)
