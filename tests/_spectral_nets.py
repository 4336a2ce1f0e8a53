"""Small tanh networks and their dense float64 Hessian and GGN, for the spectral tests.

``small_network()`` returns the model, the data, the loss and the dense matrices built with
``torch.func`` (the Hessian of the loss in the flat parameters; the GGN ``Jᵀ H_out J`` from
the Jacobian of the outputs and the Hessian of the loss in the outputs), cached per process.
"""

import functools

import torch
from torch import nn

F64 = torch.float64


@functools.cache
def small_network(hidden: int = 40, n_data: int = 64, seed: int = 0, train_steps: int = 0,
                  loss: str = "ce", data: str = "gaussian"):
    """MLP d → hidden → hidden → 3 with tanh, float64, at initialization or after
    ``train_steps`` full-batch Adam steps (lr 1e-2).

    ``data="gaussian"``: 10-dimensional standard normal inputs (2,203 parameters for
    hidden=40) with ``loss="ce"``, cross-entropy on random classes, or ``"mse"``, mean squared
    error on the smooth targets ``sin(X W)`` (a regression a network fits, so that its
    Hessian approaches its GGN). ``data="spirals"``: ``solvers.problems.make_spirals`` with 3
    arms of ``n_data // 3`` points (2-dimensional inputs, the library's reference task at a
    small size; 543 parameters for hidden=20), cross-entropy.
    Returns a dict with model, X, y, loss_fn, H, G, n, loss."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in = 2 if data == "spirals" else 10
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 3)).to(F64)
    if data == "spirals":
        from solvers.problems import make_spirals

        X, y = make_spirals(n_per_class=n_data // 3, n_classes=3, seed=seed)
        X = X.to(F64)
        loss_fn = nn.CrossEntropyLoss()
    elif data != "gaussian":
        raise ValueError(f"data must be 'gaussian' or 'spirals', got {data!r}")
    else:
        X = torch.randn(n_data, d_in, dtype=F64, generator=g)
        if loss == "ce":
            y = torch.randint(0, 3, (n_data,), generator=g)
            loss_fn = nn.CrossEntropyLoss()
        else:
            y = torch.sin(X @ torch.randn(d_in, 3, dtype=F64, generator=g))
            loss_fn = nn.MSELoss()
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(train_steps):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}

    def outputs(v):
        return torch.func.functional_call(model, unflat(v), (X,))

    def loss_of(v):
        return loss_fn(outputs(v), y)

    H = torch.func.hessian(loss_of)(flat)
    J = torch.func.jacrev(outputs)(flat).reshape(-1, flat.numel())  # (N·C, n)
    out = outputs(flat).detach()
    Hout = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ Hout.reshape(J.shape[0], J.shape[0]) @ J
    return dict(model=model, X=X, y=y, loss_fn=loss_fn, H=(H + H.T) / 2, G=(G + G.T) / 2,
                n=flat.numel(), loss=float(loss_of(flat)))
