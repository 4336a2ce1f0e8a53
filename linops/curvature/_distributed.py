"""Data-parallel curvature over ``torch.distributed``: the collectives of the operators.

Each rank holds its shard of the data; a product, ``loss`` and ``gradient`` are computed
on the local shard and combined by ONE ``all_reduce`` (sum) of a flat buffer that carries,
next to the local result, what the ranks must agree on:

- the number of loss terms of the shard (the mean divides by the global number);
- one failure flag per rank: a rank whose local pass raised contributes zeros and its
  flag, re-raises its own error, and every other rank raises a ``RuntimeError`` naming it
  (the messages are gathered in that failure path only), so no rank waits forever;
- for products, two checksums per column of the input block (``s = wᵀx`` and ``s²``):
  ``P Σ s² = (Σ s)²`` holds only when every rank multiplied the same vector, so a solver
  whose random start differs across ranks is caught at its first product, on every rank.

The solvers' unseeded random starts (``Lanczos()``, ``LOBPCG()``, ``PowerIteration()``) do
not differ: ``solvers.eig`` finds the process group in the operator's expression
(``operator_group``) and runs with a seed drawn on rank 0 and shared (``shared_seed``).

The build runs one more collective, once: a ``MAX`` all-reduce of ``[c, −c]`` for a
fixed-length vector ``c`` (numel, dtype, three checksums of the parameters, the
non-batch shape of the first batch), with the per-rank failure flags and term counts in
one-hot slots, so every rank sees the max and min of each entry and every rank's count.
Nothing here is backend-specific (gloo on CPU, NCCL on GPU: buffers live on the
parameters' device).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = [
    "resolve_group",
    "unwrap_ddp",
    "rank_seed",
    "operator_group",
    "shared_seed",
    "on_every_rank",
    "Collective",
    "GroupSums",
    "group_sums",
]

_MAX_DIMS = 6  # non-batch dimensions of X and y compared across ranks
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def resolve_group(process_group):
    """The process group to reduce over, or None for one process; raises at once (on the
    rank that calls it, with no communication) when it cannot be used."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("process_group= needs torch.distributed, which this PyTorch build "
                         "lacks; pass process_group=None for one process.")
    if not dist.is_initialized():
        raise ValueError(
            "process_group= was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(backend) on every rank first (torchrun "
            "sets the environment it reads), then pass torch.distributed.group.WORLD or a "
            "group from torch.distributed.new_group."
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup "
            f"(torch.distributed.group.WORLD, or one from new_group) or None; got "
            f"{type(process_group).__name__}."
        )
    try:
        dist.get_rank(process_group)
        size = dist.get_world_size(process_group)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"process_group cannot be used ({err}); was it destroyed?") from err
    if dist.get_rank(process_group) < 0:
        raise ValueError("This process is not a member of process_group: build the operator "
                         "only on the group's ranks (or pass the group it belongs to).")
    return process_group if size > 0 else None


def unwrap_ddp(model: nn.Module, group) -> nn.Module:
    """``model.module`` for a ``DistributedDataParallel`` model (the curvature passes
    call the module itself: ``autograd.grad`` bypasses DDP's gradient hooks anyway)."""
    ddp = nn.parallel.DistributedDataParallel
    if not isinstance(model, ddp):
        return model
    if group is None:
        raise ValueError(
            "The model is wrapped in DistributedDataParallel but process_group is None: the "
            "operator would see this rank's shard only. Pass process_group=model.process_group "
            "(or torch.distributed.group.WORLD) for the curvature over every rank's data, or "
            "model.module for this rank's own curvature."
        )
    return model.module


def rank_seed(seed: int, group) -> int:
    """The seed of this rank's Monte-Carlo draws: ``seed`` on rank 0 (and in one process),
    ``seed + r·2³²`` on rank r, so the ranks draw different, reproducible samples."""
    if group is None:
        return seed
    import torch.distributed as dist

    return (seed + (dist.get_rank(group) << 32)) % (1 << 63)


def operator_group(A):
    """The process group of the first data-parallel operator in the expression tree of the
    operator ``A`` (``G + λ·I``, ``PSD(G)``, a block of a ``BlockDiagCurvature``, ...), or
    None when no part of it was built with ``process_group=``. Walks the operators' own
    attributes (operators and tuples or lists of operators); costs no communication."""
    from ..operator import LinearOperator

    todo, seen = [A], set()
    while todo:
        op = todo.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        group = getattr(op, "_group", None)
        if group is not None:
            return group
        for value in vars(op).values():
            if isinstance(value, LinearOperator):
                todo.append(value)
            elif isinstance(value, (list, tuple)):
                todo.extend(v for v in value if isinstance(v, LinearOperator))
    return None


def shared_seed(group, device=None) -> int:
    """A seed in [0, 2³¹ − 1) drawn from torch's global generator on rank 0 of ``group`` and
    given to every rank (one all-reduce of 1 + P numbers): what a randomized solver left
    unseeded (``Lanczos()``, ``LOBPCG()``, ``PowerIteration()``) runs with on a
    data-parallel operator, so every rank draws the same start and takes the same
    decisions. ``device``: where the buffer lives (the operator's; NCCL needs a GPU)."""
    col = Collective(group, torch.float64, torch.device("cpu") if device is None else device)

    def draw():
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if col.rank == 0 else 0
        return torch.tensor([float(seed)], dtype=torch.float64), 0

    flat, _, _ = col.sum(draw, 1, "Drawing the solver's seed")
    return int(flat[0].item())


def on_every_rank(group, fn, what: str, device=None):
    """``fn()`` on this rank, then one all-reduce of 1 + P numbers so that if it raised on
    any rank, every rank raises (the failed ones their own error, the others a
    ``RuntimeError`` naming them) instead of some waiting in the next collective. For
    local checks before a collective (an optimizer's checks of its batch). None: one
    process, ``fn()`` as it is."""
    if group is None:
        return fn()
    col = Collective(group, torch.float64, torch.device("cpu") if device is None else device)
    out = []

    def run():
        out.append(fn())
        return torch.zeros(0, dtype=torch.float64), 0

    col.sum(run, 0, what)
    return out[0]


def group_sums(group, engine, what: str):
    """A ``GroupSums`` for a pass of the layer-wise ``engine`` over ``group`` (None for one
    process), and the context to run the pass in."""
    if group is None:
        return None, contextlib.nullcontext()
    sums = GroupSums(group, engine.dtype, engine.device, what,
                     params=list(engine.tensors.values()))
    return sums, sums.guard()


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _param_checksums(tensors) -> list[float]:
    """``[numel, wᵀθ, θᵀθ, rᵀ|θ|]`` of the parameters θ flattened (w fixed random, r a
    ramp): equal on every rank exactly when the ranks hold the same parameters (up to a
    coincidence the three sums would have to share)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    n = flat.numel()
    g = torch.Generator(device="cpu").manual_seed(777)
    w = torch.randn(n, generator=g, dtype=torch.float64).to(flat.device)
    ramp = torch.linspace(1.0, 2.0, n, dtype=torch.float64, device=flat.device)
    return [float(n), float(w @ flat), float(flat @ flat), float(ramp @ flat.abs())]


def _different_parameters(what: str, lo: float, hi: float) -> ValueError:
    return ValueError(
        f"The ranks of the process group hold different parameters ({what} ranges from "
        f"{lo:.17g} to {hi:.17g}): the operator would mix curvatures of different models. "
        "Broadcast them from rank 0 before building (DistributedDataParallel(model) does it "
        "when it is built; or torch.distributed.broadcast(p, 0) for every parameter), or "
        "seed the model's initialization alike on every rank."
    )


class Collective:
    """The collectives of one operator over ``group`` (see the module docstring)."""

    def __init__(self, group, dtype: torch.dtype, device: torch.device):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.dtype = dtype
        self.device = device
        #: the dtype of the reduced buffers (half precision is summed in float32)
        self.work = torch.float64 if dtype == torch.float64 else torch.float32
        self._w = {}  # the checksum weights of the products, by the number of rows

    # ------------------------------------------------------------------ failure
    def _raise_failed(self, flags: torch.Tensor, err: BaseException | None, what: str):
        """After a reduce whose per-rank ``flags`` say some rank failed: raise on every
        rank (the failed ones re-raise their own error)."""
        import torch.distributed as dist

        failed = (flags > 0).nonzero().flatten().tolist()
        if not failed:
            return
        messages = [None] * self.size
        try:
            dist.all_gather_object(messages, _message(err) if err is not None else None,
                                   group=self.group)
        except Exception:  # noqa: BLE001 - the messages are a courtesy
            messages = [None] * self.size
        if err is not None:
            raise err
        said = "; ".join(f"rank {r}: {messages[r]}" for r in failed if messages[r])
        raise RuntimeError(
            f"{what} failed on rank(s) {failed} of the process group (this is rank "
            f"{self.rank}); every rank raises so that none waits forever. "
            + (f"They said: {said}" if said else "See their error.")
        )

    # ------------------------------------------------------------------ sums
    def sum(self, compute, size: int, what: str, checks: torch.Tensor | None = None):
        """The sums over the ranks of ``compute()`` and ``checks``, by one all-reduce.

        ``compute()`` returns ``(flat tensor of `size` entries, local term count)``; the
        result is ``(summed flat tensor, global count, summed checks)``, the last two on the
        host in float64 (one copy per call). If ``compute`` raises on a rank, every rank
        raises (see the module docstring).
        """
        import torch.distributed as dist

        nc = 0 if checks is None else checks.numel()
        buf = torch.zeros(size + 1 + nc + self.size, dtype=self.work, device=self.device)
        err = None
        try:
            local, count = compute()
            buf[:size] = local.reshape(-1)
            buf[size] = float(count)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
            buf.zero_()
            buf[size + 1 + nc + self.rank] = 1.0
        if err is None and nc:
            buf[size + 1:size + 1 + nc] = checks
        dist.all_reduce(buf, group=self.group)
        tail = buf[size:].to("cpu", torch.float64)  # one copy to the host per reduce
        self._raise_failed(tail[1 + nc:], err, what)
        return buf[:size], tail[0], tail[1:1 + nc]

    def product(self, X: torch.Tensor, compute):
        """``(Σ_ranks local product, global count)`` for the block ``X`` (n, k): one
        all-reduce of n·k + 2k + 1 + P numbers; raises on every rank if the ranks were given
        different blocks (a solver whose random start differs across ranks)."""
        n, k = X.shape
        w = self._w.get(n)
        if w is None:
            g = torch.Generator(device="cpu").manual_seed(20241)
            w = self._w[n] = torch.randn(n, generator=g, dtype=torch.float64).to(
                dtype=self.work, device=self.device)
        s = w @ X.to(self.work)
        checks = torch.cat([s, s * s])

        flat, count, sums = self.sum(compute, n * k, "The product", checks)
        S, S2 = sums[:k], sums[k:]
        spread = self.size * S2 - S * S  # = P² · variance of s over the ranks
        tol = (1e-9 if self.work == torch.float64 else 1e-4) * self.size * S2
        if bool((spread > tol + torch.finfo(torch.float64).tiny).any()):
            raise ValueError(
                "The ranks of the process group multiplied different vectors (their "
                "checksums differ): a vector drawn from torch's global generator (which "
                "differs across ranks), or computed from this rank's data alone, would make "
                "the ranks take different decisions and end up waiting on each other. Give "
                "every rank the same vector: draw it from a generator seeded alike on every "
                "rank (torch.Generator().manual_seed(s)), or broadcast it from rank 0 "
                "(torch.distributed.broadcast(v, 0)). The solvers' own random starts and "
                "probes are shared already (unseeded Lanczos, LOBPCG and PowerIteration "
                "take a seed broadcast from rank 0)."
            )
        return flat.to(self.dtype).reshape(n, k), count

    # ------------------------------------------------------------------ build
    def check_build(self, op, err: BaseException | None) -> list[int]:
        """One ``MAX`` all-reduce at build: raise on every rank if a rank failed to build,
        if the parameters or the non-batch shapes of the batches differ across ranks;
        returns every rank's number of loss terms (zeros when the operator is not cached).
        """
        import torch.distributed as dist

        P = self.size
        c = torch.zeros(8 + 2 * (_MAX_DIMS + 1), dtype=torch.float64, device=self.device)
        counts = torch.zeros(P, dtype=torch.float64, device=self.device)
        flags = torch.zeros(P, dtype=torch.float64, device=self.device)
        if err is None:
            try:
                c = self._build_vector(op).to(self.device)
                if op._num_terms is not None:
                    counts[self.rank] = float(op._num_terms)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                err = e
        if err is not None:
            flags[self.rank] = 1.0
        buf = torch.cat([flags, counts, c, -c])
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        buf = buf.cpu()
        self._raise_failed(buf[:P], err, "Building the operator")
        counts = [int(x) for x in buf[P:2 * P].tolist()]
        m = c.numel()
        hi, lo = buf[2 * P:2 * P + m], -buf[2 * P + m:]
        names = ["the number of parameters", "the number of parameter tensors",
                 "the parameters' dtype", "the parameters (checksum 1)",
                 "the parameters (checksum 2)", "the parameters (checksum 3)",
                 "whether the first batch's X is a tensor", "(unused)"]
        for t in "Xy":
            names += [f"{t}.ndim"] + [f"{t}.shape[{i}]" for i in range(1, _MAX_DIMS + 1)]
        scale = torch.maximum(hi.abs(), lo.abs())
        bad = [i for i in range(m)
               if float(hi[i] - lo[i]) > 1e-12 * float(scale[i])]
        if bad:
            first = bad[0]
            if first < 6:
                raise _different_parameters(names[first], float(lo[first]), float(hi[first]))
            raise ValueError(
                f"The ranks' batches disagree in their non-batch dimensions ({names[first]} "
                f"ranges from {int(lo[first])} to {int(hi[first])}; -1: no such dimension): "
                "every rank must hold a shard of the same data set, with inputs and targets "
                "of the same shape apart from the number of samples."
            )
        return counts

    def _build_vector(self, op) -> torch.Tensor:
        space = op.param_space
        tensors = [op.params[nm].detach() for nm in space.names] + list(op._frozen.values())
        n, s1, s2, s3 = _param_checksums(tensors)
        code = _DTYPES.index(op.dtype) if op.dtype in _DTYPES else -1
        head = [n, float(len(space.names)), float(code), s1, s2, s3]
        X, y = next(iter(op.data))  # the first batch (a DataLoader loads one)
        is_tensor = isinstance(X, torch.Tensor)
        head += [float(is_tensor), 0.0]

        def dims(t):
            if not isinstance(t, torch.Tensor):
                return [-2.0] * (_MAX_DIMS + 1)
            rest = list(t.shape[1:])[:_MAX_DIMS]
            return [float(t.ndim)] + [float(d) for d in rest] + [-1.0] * (_MAX_DIMS - len(rest))

        return torch.tensor(head + dims(X) + dims(y), dtype=torch.float64)


class GroupSums:
    """Sums the accumulators of one pass over the data over a process group, for the
    layer-wise engine (``quantities``, ``DiagGGN``, ``KFAC``): the pass runs inside
    ``with sums.guard():`` and calls ``sums.reduce(tensors)`` once, after its loop.

    ``reduce`` costs two all-reduces per pass: a ``MAX`` of P + 10 numbers (the per-rank
    failure flags, the buffer's size and checksums of ``params``, the model's parameters,
    which must agree), then the ``SUM`` of the tensors flattened into one buffer. A rank
    whose pass raises before ``reduce`` joins the first one with its flag set from
    ``guard``, so every rank raises (see ``Collective``) instead of waiting.
    """

    def __init__(self, group, dtype: torch.dtype, device: torch.device, what: str,
                 params=None):
        self.collective = Collective(group, dtype, device)
        self.what = what
        self._params = list(params) if params else []
        self._done = False

    def _agree(self, size: int, err: BaseException | None) -> None:
        import torch.distributed as dist

        c = self.collective
        sums = [0.0] * 4
        if err is None and self._params:
            try:
                sums = _param_checksums(self._params)
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                err = e
        head = [0.0] * c.size
        if err is not None:
            head[c.rank] = 1.0
        vals = [float(size)] + sums
        buf = torch.tensor(head + vals + [-v for v in vals], dtype=torch.float64,
                           device=c.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=c.group)
        buf = buf.cpu()
        c._raise_failed(buf[:c.size], err, self.what)
        hi, lo = buf[c.size:c.size + 5], -buf[c.size + 5:]
        if float(hi[0]) != float(lo[0]):
            raise ValueError(
                f"{self.what}: the ranks accumulated different quantities ({int(lo[0])} "
                f"to {int(hi[0])} numbers): the ranks must hold the same model and "
                "parameters and ask for the same names."
            )
        names = ["the number of parameters", "the parameters (checksum 1)",
                 "the parameters (checksum 2)", "the parameters (checksum 3)"]
        for i, name in enumerate(names, start=1):
            if float(hi[i] - lo[i]) > 1e-12 * float(max(hi[i].abs(), lo[i].abs())):
                raise _different_parameters(name, float(lo[i]), float(hi[i]))

    def reduce(self, tensors: list) -> list:
        """The sums over the ranks of ``tensors`` (tensors, Python numbers or None, which
        stays None), in the same shapes."""
        import torch.distributed as dist

        c = self.collective
        flat = [torch.as_tensor(t, dtype=c.work, device=c.device).reshape(-1)
                for t in tensors if t is not None]
        buf = torch.cat(flat) if flat else torch.zeros(0, dtype=c.work, device=c.device)
        self._done = True  # this rank joins the agreement here: the guard must not again
        self._agree(buf.numel(), None)
        dist.all_reduce(buf, group=c.group)
        out, i = [], 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            shape = torch.as_tensor(t).shape
            m = int(torch.as_tensor(t).numel())
            piece = buf[i:i + m].reshape(shape)
            i += m
            if isinstance(t, torch.Tensor):
                exact = t.dtype.is_floating_point or t.dtype.is_complex
                out.append(piece.to(t.dtype) if exact else piece.round().to(t.dtype))
            else:
                out.append(piece.item() if isinstance(t, float) else int(round(piece.item())))
        return out

    def guard(self):
        sums = self

        class _Guard:
            def __enter__(self):
                return sums

            def __exit__(self, kind, err, tb):
                if err is not None and not sums._done and isinstance(err, Exception):
                    sums._agree(0, err)  # raises err here, a RuntimeError elsewhere
                return False

        return _Guard()
