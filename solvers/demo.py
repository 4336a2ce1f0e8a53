"""The main demo: CoLA's Gauss-Newton notebook, redone with linops, as a script.

Run ``python -m solvers.demo`` (about half a minute on 2 CPU cores). It trains the
spiral classifier of CoLA's notebook (5 spirals × 100 points, MLP 2→200→200→5 with SiLU,
41,805 parameters) with Adam, then with damped Gauss-Newton steps
``p -= inv(PSD(Jᵀ H J + 10⁻³ I), alg=Auto(tol=1e-3, max_iters=20)) @ g`` and natural-gradient
steps with the Fisher ``FIM``, checks the spectrum with ``eigmax``, and prints what it did.
``--small`` runs a few steps only (what the tests use).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call

import linops
from linops import FIM, PSD, Hessian, I_like, Jacobian, ParamSpace

from . import Auto, Lanczos, NotConvergedWarning, eigmax, inv
from .problems import GAUSS_NEWTON_SETUP, make_spirals, notebook_models

__all__ = ["second_order_run", "main"]


def _stateless(model: nn.Module, X: torch.Tensor):
    space = ParamSpace({k: v.detach() for k, v in model.named_parameters()})

    def logits(p):
        return functional_call(model, space.unflatten(p), (X,))

    return space, logits


def second_order_run(kind: str, model: nn.Module, X, y, steps: int, setup=GAUSS_NEWTON_SETUP):
    """Train ``model``'s parameters (as one flat vector) with ``steps`` second-order steps.

    ``kind='gn'``: p ← p − inv(PSD(Jᵀ H J + λI)) g, with H the Hessian of
    ``n_classes × mean cross-entropy`` at the logits (as CoLA's notebook);
    ``kind='ng'``: p ← p − ½ inv(PSD(F/N + λI)) g with F = ``FIM`` the Fisher of the logits
    (summed over the N points, so F/N is the Fisher of the mean loss; CoLA's notebook's
    numbers correspond to F/N). Each operator is linearized once per step; the gradient
    g = Jᵀ ∇_z loss reuses that linearization. Returns (flat parameters, list of losses,
    number of unconverged solves).
    """
    criterion = nn.CrossEntropyLoss()
    space, logits = _stateless(model, X)
    p = space.flatten(dict(model.named_parameters())).detach()
    alg = Auto(tol=setup.cg_tol, max_iters=setup.cg_max_iters, on_failure="ignore")
    losses, unconverged = [], 0
    for _ in range(steps):
        # one linearization per step: the NG step's Fisher lends its Jacobian to the gradient
        F = FIM(logits, p) if kind == "ng" else None
        J = F.jacobian if F is not None else Jacobian(logits, p)
        z = J.value
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            loss = criterion(zz, y)
            (gz,) = torch.autograd.grad(loss, zz)
        losses.append(loss.item())
        g = J.T @ gz.reshape(-1)
        if kind == "gn":
            H = Hessian(lambda t: setup.gn_loss_scale * criterion(t, y), z)
            G = J.T @ H @ J
            A = PSD(G + setup.gn_damping * I_like(G))
            lr = setup.gn_lr
        else:
            F = F / X.shape[0]  # Fisher of the MEAN loss (FIM sums over points)
            A = PSD(F + setup.ng_damping * I_like(F))
            lr = setup.ng_lr
        Ainv = inv(A, alg=alg)
        p = p - lr * (Ainv @ g)
        unconverged += not Ainv.solution.converged
    with torch.no_grad():
        losses.append(criterion(logits(p), y).item())
    return p, losses, unconverged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few steps only (smoke test)")
    args = parser.parse_args(argv)
    setup = GAUSS_NEWTON_SETUP
    torch.set_num_threads(min(2, torch.get_num_threads()))
    adam_steps, so_steps = (20, 5) if args.small else (setup.adam_steps, setup.gn_steps)

    X, y = make_spirals(setup.n_per_class, setup.n_classes, setup.noise, seed=setup.numpy_seed)
    adam_model, start = notebook_models(setup)
    n_params = sum(p.numel() for p in start.parameters())
    print(f"spirals: {X.shape[0]} points, {setup.n_classes} classes; MLP with {n_params} "
          "parameters")

    t0 = time.perf_counter()
    opt = torch.optim.Adam(adam_model.parameters(), lr=setup.adam_lr)
    criterion = nn.CrossEntropyLoss()
    for _ in range(adam_steps):
        opt.zero_grad()
        loss = criterion(adam_model(X), y)
        loss.backward()
        opt.step()
    adam_loss = criterion(adam_model(X), y).item()
    print(f"Adam, {adam_steps} steps: loss {adam_loss:.6f} after the last update "
          f"({time.perf_counter() - t0:.1f} s)")

    # spectral check at the start of the second-order runs: top eigenvalue of Jᵀ H J at the
    # second network drawn (the README's 0.63618 is at the first one, the one Adam trains)
    space, logits = _stateless(start, X)
    p0 = space.flatten(dict(start.named_parameters())).detach()
    J = Jacobian(logits, p0)
    G = J.T @ Hessian(lambda t: criterion(t, y), J.value) @ J
    t0 = time.perf_counter()
    lam = eigmax(G, alg=Lanczos(tol=1e-2))
    print(f"eigmax(Jᵀ H J) at the second-order starting network: {lam.item():.5f} with "
          "Lanczos(tol=1e-2), "
          f"{lam.solution.iterations} iterations ({time.perf_counter() - t0:.2f} s); "
          f"repr: {linops.PSD(G)!r}")

    out = {"adam": adam_loss, "eigmax": lam.item()}
    for kind, name in (("gn", "Gauss-Newton"), ("ng", "natural gradient")):
        model = notebook_models(setup)[1]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConvergedWarning)
            _, losses, unconverged = second_order_run(kind, model, X, y, so_steps, setup)
        dt = time.perf_counter() - t0
        print(f"{name}, {so_steps} steps: loss {losses[-1]:.6f} ({dt:.1f} s, "
              f"{1e3 * dt / so_steps:.0f} ms/step; {unconverged} CG solves stopped at "
              f"max_iters={setup.cg_max_iters}, as in CoLA's notebook)")
        out[kind] = losses[-1]
    print("CoLA's notebook reports 0.016213 (Gauss-Newton) and 0.016230 (natural gradient).")
    return out


if __name__ == "__main__":
    main()
