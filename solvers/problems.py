"""The reference problem: data, model and hyper-parameters of CoLA's Gauss-Newton notebook.

CoLA's notebook ``docs/notebooks/07_second_order_optimization.ipynb`` ("2nd order
optimization of neural nets using Gauss Newton") and the script it was made from train a
small SiLU network on interleaved 2-D spirals, first with a first-order optimizer and then
with damped Gauss-Newton steps ``p -= inv(G + λI) @ g`` and natural-gradient steps. The
issues of this project measure speed and accuracy on that problem: 5 spirals of 100 points,
an MLP 2 → 200 → 200 → 5 with SiLU (41,805 parameters), full batch, mean cross-entropy.

This module rebuilds the data and the model in plain torch and numpy. It deliberately
imports neither ``linops`` nor ``solvers``: the benchmark scripts of the peer libraries run in
their own virtual environments (CoLA's plum fork cannot live beside plum-dispatch) and load
this file by path::

    spec = importlib.util.spec_from_file_location("problems", "solvers/problems.py")
    problems = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(problems)

Example:
    >>> X, y = make_spirals()
    >>> model = make_mlp()
    >>> tuple(X.shape), tuple(y.shape), sum(p.numel() for p in model.parameters())
    ((500, 2), (500,), 41805)
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "GAUSS_NEWTON_SETUP",
    "GaussNewtonSetup",
    "ReferenceProblem",
    "make_mlp",
    "make_spirals",
    "notebook_models",
    "reference_problem",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _numpy_generator(seed: int | np.random.RandomState | None) -> np.random.RandomState:
    if seed is None:
        # numpy's global legacy generator, as the notebook uses it (np.random.randn).
        return np.random.mtrand._rand
    if isinstance(seed, np.random.RandomState):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"seed must be a non-negative int, a numpy RandomState or None, got {seed!r}; "
            "np.random.default_rng generators draw other numbers than the notebook's"
        )
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return np.random.RandomState(int(seed))


def make_spirals(
    n_per_class: int = 100,
    n_classes: int = 5,
    noise: float = 0.02,
    seed: int | np.random.RandomState | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved spirals in the unit disc, one arm per class.

    Arm ``c`` (of ``C = n_classes``) has ``n = n_per_class`` points: radii ``r`` evenly
    spaced on [0, 1] and angles ``θ`` evenly spaced on ``[c·4π/C, (c+1)·4π/C]`` (both ends
    included), each angle perturbed by ``noise · N(0, 1)``; the point is
    ``(r sin θ, r cos θ)``. The arms together turn twice around the origin.

    The Gaussian draws are taken arm after arm from numpy's legacy ``RandomState``, the
    generator that ``np.random.seed`` seeds, so ``make_spirals(seed=0)`` returns the points
    CoLA's notebook gets after ``np.random.seed(0)``.

    Args:
        n_per_class: points per arm, ``n``.
        n_classes: number of arms and classes, ``C``.
        noise: standard deviation of the angular noise, in radians (CoLA: 0.02).
        seed: an int seeds a private ``np.random.RandomState`` (numpy's global state is not
            touched); ``None`` draws from numpy's global generator, as the notebook does; a
            ``RandomState`` is used as given.

    Returns:
        ``X`` float32 of shape (C·n, 2) and ``y`` int64 of shape (C·n,), ordered by class.

    Example:
        >>> X, y = make_spirals(n_per_class=3, n_classes=2)
        >>> tuple(X.shape), y.tolist()
        ((6, 2), [0, 0, 0, 1, 1, 1])
    """
    n = _check_positive_int("n_per_class", n_per_class)
    n_cls = _check_positive_int("n_classes", n_classes)
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite non-negative number, got {noise!r}")
    rng = _numpy_generator(seed)

    arc = 4.0 * np.pi / n_cls
    radius = np.linspace(0.0, 1.0, n)
    points = np.empty((n_cls, n, 2))
    for c in range(n_cls):
        angle = np.linspace(c * arc, (c + 1) * arc, n) + noise * rng.randn(n)
        points[c, :, 0] = radius * np.sin(angle)
        points[c, :, 1] = radius * np.cos(angle)
    labels = np.repeat(np.arange(n_cls), n)
    X = torch.from_numpy(points.reshape(n_cls * n, 2)).to(torch.float32)
    y = torch.from_numpy(labels).to(torch.int64)
    return X, y


def make_mlp(
    in_dim: int = 2, hidden: int = 200, out_dim: int = 5, seed: int | None = 0
) -> nn.Sequential:
    """The notebook's network: Linear(in, h) → SiLU → Linear(h, h) → SiLU → Linear(h, out).

    With the defaults it has 2·200 + 200 + 200·200 + 200 + 200·5 + 5 = 41,805 parameters,
    initialized by PyTorch's default ``nn.Linear`` rule.

    Args:
        in_dim: input features (2 for the spirals).
        hidden: width ``h`` of both hidden layers (200 in the issues' reference problem).
        out_dim: outputs, one logit per class.
        seed: an int makes the initialization reproducible without touching torch's global
            random state (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``);
            ``None`` draws from the global generator, as the notebook does.

    Returns:
        A float32 ``nn.Sequential`` on the CPU.

    Example:
        >>> model = make_mlp(hidden=4, seed=1)
        >>> model(torch.zeros(3, 2)).shape
        torch.Size([3, 5])
    """
    sizes = [_check_positive_int(name, value) for name, value in
             (("in_dim", in_dim), ("hidden", hidden), ("out_dim", out_dim))]
    if seed is None:
        return _build_mlp(*sizes)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _build_mlp(*sizes)


def _build_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.SiLU(),
        nn.Linear(hidden, hidden), nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


@dataclasses.dataclass(frozen=True)
class GaussNewtonSetup:
    """Hyper-parameters of CoLA's Gauss-Newton comparison, each with where CoLA sets it.

    The notebook's training: ``adam_steps`` full-batch Adam steps, then from a *fresh*
    network (the notebook calls ``MLP()`` a second time before building its stateless
    function, so the second-order runs do not start from the Adam solution) ``gn_steps``
    damped Gauss-Newton steps and, again from that fresh network, ``ng_steps``
    natural-gradient steps. Each second-order step is
    ``p -= lr * inv(C(p) + damping * I, Auto(tol=cg_tol, max_iters=cg_max_iters)) @ g``
    with ``g`` the gradient of the mean cross-entropy and ``C`` the curvature.
    """

    # Data: `n_points = 100`, `n_spirals = 5`, `generate_spiral_data(..., noise=0.02)`.
    n_per_class: int = 100
    n_classes: int = 5
    noise: float = 0.02
    # Model: `MLP(k=200)`, two SiLU hidden layers (the older notebook used k=100).
    hidden: int = 200
    # Seeds: `np.random.seed(0)` before the data and `torch.manual_seed(0)` before the first
    # `MLP()`; the issue quotes CoLA's final losses (0.016213 GN, 0.016230 NG) under them.
    # Rerun with cola-ml 0.0.7 under this protocol (second-order runs from the second,
    # fresh network, loss 1.6243 there; Adam ends at 0.01891): GN 0.016218, NG 0.016232
    # (NG with the FIM written as the GGN of the mean cross-entropy, which equals it for
    # softmax outputs, because cola-ml 0.0.7's `FIM` returns None).
    numpy_seed: int = 0
    torch_seed: int = 0
    # First-order phase: `optim.Adam(model.parameters(), lr=1e-2)`, `epochs = 500`,
    # full batch, `nn.CrossEntropyLoss()` (mean reduction).
    adam_lr: float = 1e-2
    adam_steps: int = 500
    # Gauss-Newton: `G = J.T @ H @ J` with `H = Hessian(lambda z: criterion(z, y) * n_spirals)`
    # (the loss Hessian is multiplied by the number of classes), then
    # `PSD(G + 1e-3 * I_like(G))`, step `p -= inv(GN(p), alg=Auto(...)) @ g` (no step size),
    # `for epoch in range(epochs // 5)` = 100 steps.
    gn_damping: float = 1e-3
    gn_loss_scale: float = 5.0
    gn_lr: float = 1.0
    gn_steps: int = 100
    # Natural gradient: `F = FIM(lambda p: stateless_model(p, X), p)`,
    # `PSD(F + 1e-3 * I_like(F))`, step `p -= .5 * inv(Fisher(p), alg=Auto(...)) @ g`,
    # `range(epochs // 5)` = 100 steps.
    ng_damping: float = 1e-3
    ng_lr: float = 0.5
    ng_steps: int = 100
    # Solver of both: `Auto(tol=1e-3, max_iters=20)`, which picks CG for a PSD operator.
    cg_tol: float = 1e-3
    cg_max_iters: int = 20
    # Spectral check: `cola.eigmax(GN(flat_p), alg=Auto(tol=1e-2))`.
    eigmax_tol: float = 1e-2


GAUSS_NEWTON_SETUP = GaussNewtonSetup()


class ReferenceProblem(NamedTuple):
    """A model, its full batch and its loss: what every benchmark contender receives."""

    model: nn.Sequential
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.CrossEntropyLoss


def notebook_models(
    setup: GaussNewtonSetup = GAUSS_NEWTON_SETUP,
) -> tuple[nn.Sequential, nn.Sequential]:
    """The two networks the notebook draws after ``torch.manual_seed(setup.torch_seed)``.

    The first is trained by Adam; the second, drawn right after it from the same random
    stream, is where the Gauss-Newton and natural-gradient runs start, and where the
    notebook prints ``eigmax`` of its damped, ×5-scaled Gauss-Newton matrix (cola-ml 0.0.7
    prints 2.911 there). The issues' spectral figures are taken at the first network, see
    ``reference_problem``. torch's global random state is left untouched.

    Returns:
        ``(adam_model, second_order_start)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.torch_seed)
        first = _build_mlp(2, setup.hidden, setup.n_classes)
        second = _build_mlp(2, setup.hidden, setup.n_classes)
    return first, second


def reference_problem(
    setup: GaussNewtonSetup = GAUSS_NEWTON_SETUP, dtype: torch.dtype = torch.float32
) -> ReferenceProblem:
    """The benchmark problem: the spirals and the first network drawn after the torch seed.

    This is the point at which the issues quote the spectrum: the GGN of the mean
    cross-entropy there, ``Jᵀ H J`` with no damping and no class-count factor, has largest
    eigenvalue 0.63618 (float64, dense, from the 2500 × 41805 Jacobian), and CoLA's
    ``eigmax(PSD(G), alg=Auto(tol=1e-2))`` returns 0.54647 (cola-ml 0.0.7). Its next eigenvalues are
    0.5887, 0.5322 and 0.5253, close to the top one, which is what makes a loose Lanczos
    stop early.

    Args:
        setup: the hyper-parameters (data size, width, seeds).
        dtype: floating dtype of the model and of ``X``.

    Returns:
        ``ReferenceProblem(model, X, y, loss_fn)`` with ``loss_fn = nn.CrossEntropyLoss()``.

    Example:
        >>> problem = reference_problem()
        >>> problem.loss_fn(problem.model(problem.X), problem.y).item() > 0
        True
    """
    X, y = make_spirals(setup.n_per_class, setup.n_classes, setup.noise, seed=setup.numpy_seed)
    model = make_mlp(2, setup.hidden, setup.n_classes, seed=setup.torch_seed)
    return ReferenceProblem(model.to(dtype), X.to(dtype), y, nn.CrossEntropyLoss())
