"""Kronecker-factored curvature: KFAC, KFLR, KFRA and EKFAC from the layer-wise engine.

For a ``nn.Linear`` weight (inputs ``a`` of shape ``(N, T, in)``, output cotangent columns
``g`` ``(M, N, T, out)``: the C columns of the loss Hessian's square root for KFLR, S
sampled ones for KFAC, the gradient for the empirical Fisher) the curvature block is
approximated by ``G ⊗ A`` (row-major, the layout of the flattened weight):

=============  ======================================  ===========================================
convention     G (out × out)                           A (in × in)
=============  ======================================  ===========================================
``expand``     (1/c) Σₘₙₜ gₘₙₜ gₘₙₜᵀ                   Σₙₜ aₙₜ aₙₜᵀ / (N T)
``reduce``     (1/c) Σₘₙ ḡₘₙ ḡₘₙᵀ, ḡ = Σₜ gₜ           Σₙ āₙ āₙᵀ / N, ā = mean over t
``backpack``   (1/c) Σₘₙ ḡₘₙ ḡₘₙᵀ                      Σₙₜ aₙₜ aₙₜᵀ / N
=============  ======================================  ===========================================

(c is the loss's mean divisor, 1 for a sum). For 2-D inputs (T = 1) the three coincide;
Eschenhagen et al. (2023) derive ``expand`` and ``reduce`` for weight sharing, and
``backpack`` is BackPACK's convention for convolutions (G is the bias's GGN block, A sums
over positions). Convolutions (``Conv1d``/``2d``/``3d``, groups = 1) are Linear layers over
their unfolded input with T = the output positions (KFC, Grosse & Martens 2016). A bias
block is its GGN block ``(1/c) Σₘₙ ḡ ḡᵀ`` (exact for the chosen columns). A parameter used
several times (weight tying) stacks its uses along T. KFRA (Botev et al. 2017) replaces G
by the batch-averaged output Hessian back-propagated through a chain of Linear layers
and elementwise activations: Ḡ ← Wᵀ Ḡ W at a Linear layer, Ḡ ← Ḡ ⊙ Eₙ[σ'ₙ σ'ₙᵀ] at an
activation.

EKFAC (George et al. 2018) keeps K-FAC's eigenbasis ``Q_G ⊗ Q_A`` and refits the diagonal
to the per-sample gradients: ``s = (1/c) Σₘₙ (Q_Gᵀ ∇Wₘₙ Q_A)²``, the diagonal in that basis
closest to the block in Frobenius norm.
"""

from __future__ import annotations

import functools
import math

import torch

from ..blockdiag import BlockDiag
from ..dense import Dense
from ..diagonal import I_like
from ..kronecker import Kronecker
from ..kronecker_eigen import KroneckerEigen
from ..params import ParamSpace
from ..permutation import Permutation, Permuted
from ..properties import PSD
from ._data import Batches
from ._distributed import group_sums, rank_seed, resolve_group, unwrap_ddp
from ._mlp import _Act, _activation, mlp_spec
from .layers import linear as linear_rules
from .layers import rule_for
from .layers.conv import ConvRule, _unfold
from .layers.linear import LinearRule
from .losses import as_count
from .quantities import Engine

__all__ = ["KFAC", "EKFAC", "kfac_factors", "KFAC_APPROX"]

KFAC_APPROX = ("expand", "reduce", "backpack")
_FISHER = {"mc": "mc", "exact": "exact", "empirical": "grad"}
#: the largest parameter taken as a dense block when no Kronecker rule applies
DENSE_BLOCK_LIMIT = 4096


def _check(fisher, kfac_approx, damping=None):
    if fisher not in _FISHER:
        raise ValueError(f"fisher must be one of {list(_FISHER)} ('mc': KFAC, 'exact': KFLR, "
                         f"'empirical': the empirical Fisher); got {fisher!r}.")
    if kfac_approx not in KFAC_APPROX:
        raise ValueError(f"kfac_approx must be one of {list(KFAC_APPROX)}; got "
                         f"{kfac_approx!r}.")


def _conv_kronecker(rec) -> bool:
    """Whether the engine's plan takes ``rec`` by the convolution rule with one group."""
    rule = rule_for(rec.module)
    return isinstance(rule, ConvRule) and rec.module.groups == 1 and rule.problem(rec) is None


def _reducer(rec):
    """The per-column reduction of a groups-1 convolution's output cotangents for the
    conventions that read only their sum over positions (``"backpack"``, ``"reduce"``:
    G from ``Σₜ gₜ`` per sample, as the bias): summed as each column comes out of its
    backward pass, so the M full columns are never stacked (KFLR on the reference CNN: 59
    MB for its first layer)."""
    if _conv_kronecker(rec):
        return lambda c: c.sum(tuple(range(2, c.ndim)))  # (N, O, *L) → (N, O)
    return None


def _layer_inputs(rec, rule, cot):
    """``(a (N, T, I), g (M, N, T, O))`` of a Linear or groups-1 Conv call, or None; a
    convolution's cotangents reduced by ``_reducer`` (M, N, O) come as g (M, N, 1, O)."""
    if isinstance(rule, LinearRule):
        a, g, _ = LinearRule._ag(rec, cot)
        return a, g
    if isinstance(rule, ConvRule) and rec.module.groups == 1:
        # the unfolded input feature-major (I, N, L), seen as (N, L, I): its reshape to
        # (N·L, I) is a view, so A = aᵀa takes no transposed copy of it
        if "unfolded_fm" not in rec.cache:
            rec.cache["unfolded_fm"] = _unfold(rec.module, rec.input, 1, feature_major=True)
        U = rec.cache["unfolded_fm"]
        if cot.ndim == 3:  # reduced over the positions by ``_reducer``
            return U.permute(1, 2, 0), cot.unsqueeze(2)
        g = cot.reshape(cot.shape[0], U.shape[1], -1, U.shape[-1])  # (M, N, O, L)
        return U.permute(1, 2, 0), g.mT  # (N, L, I), (M, N, L, O)
    return None


class _Factors:
    """Accumulated Kronecker factors of one parameter (summed-loss scale)."""

    def __init__(self):
        self.G = self.A = None
        self.S = None  # Σ a, the inputs' sum (the joint block's bias column)
        self.count = 0
        self.dense = None  # an unsupported parameter's dense block

    def add(self, name, value):
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


def _weight_factors(pieces, approx, gbar_gram, need_G: bool = True):
    """G (or None without ``need_G``), A and the inputs' sum S (unnormalized; S is the
    homogeneous A's bias column, ``bias="joint"``) and A's count from the uses
    ``[(a, g)]`` of one weight; ``gbar_gram()`` gives ``Σ ḡ ḡᵀ`` (ḡ = Σₜ g), shared with the
    layer's bias, which has the same G wherever the weight's G is that (every convention
    but ``expand`` over several positions)."""
    a = _stack([p[0] for p in pieces], 1)  # uses stacked along T
    N, T = a.shape[0], a.shape[1]
    T_g = sum(p[1].shape[2] for p in pieces)
    G = None
    if need_G:
        G = _gram(_stack([p[1] for p in pieces], 2)) if approx == "expand" and T_g > 1 \
            else gbar_gram()
    if approx == "expand":
        af = a.reshape(-1, a.shape[-1])
        return G, af.mT @ af, af.sum(0), N * T
    if approx == "reduce":
        abar = a.mean(1)
        return G, abar.mT @ abar, abar.sum(0), N
    af = a.reshape(-1, a.shape[-1])
    return G, af.mT @ af, af.sum(0), N


def _shared_gbar_gram(memo, uses, pieces):
    """``_gbar_gram`` of a parameter's pieces, computed once per set of layer calls."""
    k = tuple(u[0] for u in uses)
    if k not in memo:
        memo[k] = _gbar_gram([ag for _, ag in pieces])
    return memo[k]


def _gbar_gram(pieces):
    """``Σₘₙ ḡₘₙ ḡₘₙᵀ`` with ``ḡ = Σ`` over the uses and positions of g (M, N, T, O)."""
    gbar = sum(p[1][:, :, 0] if p[1].shape[2] == 1 else p[1].sum(2) for p in pieces)
    gf = gbar.reshape(-1, gbar.shape[-1])
    return gf.mT @ gf


def _gram(g):
    """``Σ gₘₙₜ gₘₙₜᵀ`` over all but the last dimension of ``g`` (M, N, T, O). A convolution's
    cotangents come position-major (``g.mT`` of a contiguous (M, N, O, T)): then as one
    batched GEMM per column and sample, summed, instead of a transposed copy of them all
    (for the reference CNN's first layer under KFLR, 59 MB)."""
    if g.stride(-1) != 1 and g.stride(-2) == 1:
        gt = g.mT.reshape(-1, g.shape[-1], g.shape[-2])  # (M·N, O, T), a view
        return torch.bmm(gt, gt.mT).sum(0)
    gf = g.reshape(-1, g.shape[-1])
    return gf.mT @ gf


@functools.lru_cache(maxsize=64)
def _joint_order(d_out: int, d_in: int, device, dtype) -> Permutation:
    """P with ``P x = vec([W | b])`` (row-major, ``(d_out, d_in + 1)``) for
    ``x = [vec W; b]``, W ``(d_out, d_in)`` (cached: built and checked once per shape)."""
    idx = torch.arange(d_out * (d_in + 1), device=device).reshape(d_out, d_in + 1)
    o, d = idx // (d_in + 1), idx % (d_in + 1)
    return Permutation(torch.where(d < d_in, o * d_in + d, d_out * d_in + o).reshape(-1),
                       dtype)


def _stack(ts, dim):
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=dim)


class _Collector:
    """One pass over the data collecting the factors of every parameter."""

    def __init__(self, model, loss_fn, params, fisher, mc_samples, seed, kfac_approx, kfra,
                 unsupported):
        _check(fisher, kfac_approx)
        if unsupported not in ("dense", "drop"):
            raise ValueError(f"unsupported must be 'dense' or 'drop'; got {unsupported!r}.")
        self.engine = Engine(model, loss_fn, params, mc_samples=mc_samples, seed=seed)
        self.fisher, self.approx, self.kfra = fisher, kfac_approx, kfra
        self.unsupported = unsupported
        self.spec = None
        if kfra:
            spec = mlp_spec(model, self.engine.names, self.engine.dtype, 1)
            if isinstance(spec, str):
                raise ValueError(
                    f"kfra=True needs a chain of nn.Linear layers and elementwise activations "
                    f"(an nn.Sequential MLP), but {spec}. Use fisher='exact' (KFLR) or "
                    "fisher='mc' (KFAC), which take any graph."
                )
            self.spec = spec

    def run(self, data, progress=False, sums=None, gradient=True):
        """``sums``: a ``_distributed.GroupSums``: every factor, count, the gradient and
        the loss are all-reduced over its process group after the loop."""
        eng = self.engine
        factors = {p: _Factors() for p in eng.names}
        kinds = {}
        batches = Batches(data, eng.device)
        gen = eng.new_generator()
        key = _FISHER[self.fisher]
        sets = set() if key == "grad" else {key}
        value, count, grad, output = 0.0, 0, None, None
        calls = {}
        for X, y in batches:
            # the gradient (for the operator's .gradient) from autograd's own kernels; the
            # factors alone need the gradient column only for the empirical Fisher
            plan, loss_state, out, N = eng.prepare(
                X, y, sets, gen, grad=gradient or key == "grad", param_grad=gradient,
                grad_layers=key == "grad",
                reduce=None if key == "grad" or self.approx == "expand" else _reducer)
            output = out.detach() if batches.single else None
            pieces = {p: [] for p in eng.names}
            for p in eng.names:
                uses = plan.uses[p] if p not in plan.fallback else []
                got = []
                for i, r, rule, local in uses:
                    cot = plan.cots[key][i]
                    ag = None if cot is None else _layer_inputs(r, rule, cot)
                    if ag is None and cot is not None:
                        got = None
                        break
                    if ag is not None:
                        got.append((local, ag))
                if got and all(local == got[0][0] for local, _ in got):
                    pieces[p] = got
                    kinds.setdefault(p, "weight" if got[0][0] == "weight" else "bias")
                else:
                    kinds[p] = "dense" if self.unsupported == "dense" else "dropped"
            for p in eng.names:  # the layer calls of each parameter (joint blocks)
                calls.setdefault(p, tuple(u[0] for u in plan.uses[p]))
            memo = {}  # the uses' record indices -> Σ ḡ ḡᵀ (a weight's and its bias's G)
            for p in eng.names:
                f = factors[p]
                gbar_gram = functools.partial(_shared_gbar_gram, memo, plan.uses[p], pieces[p])
                if kinds[p] == "weight":
                    # (KFRA's G comes from its own recursion)
                    Gw, Aw, Sw, n = _weight_factors([ag for _, ag in pieces[p]], self.approx,
                                                    gbar_gram, not self.kfra)
                    if not self.kfra:
                        f.add("G", Gw)
                    f.add("A", Aw)
                    f.add("S", Sw)
                    f.count += n
                elif kinds[p] == "bias" and not self.kfra:
                    f.add("G", gbar_gram())
                elif kinds[p] == "dense":
                    numel = eng.params[p].numel()
                    if numel > DENSE_BLOCK_LIMIT:
                        raise ValueError(
                            f"Parameter {p!r} ({numel} entries) belongs to no layer with a "
                            f"Kronecker factorization (Linear, Conv1d/2d/3d with groups=1) and is "
                            f"too large for a dense block (limit {DENSE_BLOCK_LIMIT}). Pass "
                            "unsupported='drop' to leave it out, or params= without it."
                        )
                    V = plan.per_sample(key, p).reshape(-1, numel)
                    f.add("dense", V.mT @ V)
            if self.kfra:
                self._kfra_batch(X, plan, loss_state, factors)
            if gradient:
                g = {p: plan.summed("grad", p)[0] for p in eng.names}
                grad = g if grad is None else {p: grad[p] + g[p] for p in g}
            with torch.no_grad():
                value = value + eng.loss_curv.summed_loss(out.detach(), y, loss_state)
            count = count + eng.loss_curv.count(loss_state)
        if sums is not None:  # data-parallel: one all-reduce of every sum (issue 11)
            fs = [factors[p] for p in eng.names]
            parts = [getattr(f, a) for f in fs for a in ("G", "A", "S", "dense")]
            gkeys = list(eng.names) if grad is not None else []
            red = sums.reduce(parts + [f.count for f in fs] + [grad[p] for p in gkeys]
                              + [value, count])
            for (f, a), t in zip([(f, a) for f in fs for a in ("G", "A", "S", "dense")], red):
                setattr(f, a, t)
            red = red[len(parts):]
            for f, n in zip(fs, red):
                f.count = n
            grad = dict(zip(gkeys, red[len(fs):len(fs) + len(gkeys)])) if gkeys else None
            value, count = red[-2:]
        c = float(count) if eng.loss_curv.reduction == "mean" else 1.0
        if c == 0:
            raise ValueError("Every target is ignore_index: the loss has no term.")
        for f in factors.values():
            for name in ("G", "dense"):
                if getattr(f, name) is not None:
                    setattr(f, name, getattr(f, name) / c)
            if f.A is not None:
                f.A = f.A / f.count
                f.S = f.S / f.count
        info = {"loss": (value / c).detach().reshape(()),
                "gradient": None if grad is None else {p: t / c for p, t in grad.items()},
                "kinds": kinds, "calls": calls,
                "num_terms": count, "output": output}
        return factors, info

    def _kfra_batch(self, X, plan, loss_state, factors):
        """Add this batch's share of KFRA's G to every layer: the summed output Hessian
        Σₙ Hₙ back-propagated with batch averages of the activations' derivatives."""
        eng, spec = self.engine, self.spec
        V = eng.loss_curv.hessian_sqrt(loss_state)  # (C, N, C)
        N = V.shape[1]
        Vf = V.reshape(V.shape[0], N, -1)
        Gbar = torch.einsum("mni,mnj->ij", Vf, Vf)  # Σₙ Hₙ
        # the layers' inputs and activations' derivatives, from the recorded forward
        a = X.detach().flatten(1) if spec.flatten_input else X.detach()
        states = []
        with torch.no_grad():
            for layer in spec.layers:
                if isinstance(layer, _Act):
                    out, d1, _ = _activation(layer.module, a, 1)
                    states.append(d1)
                    a = out
                else:
                    W = eng.tensors[layer.weight]
                    b = None if layer.bias is None else eng.tensors[layer.bias]
                    states.append(layer)
                    a = torch.nn.functional.linear(a, W, b)
            for layer, st in zip(reversed(spec.layers), reversed(states)):
                if isinstance(layer, _Act):
                    Gbar = Gbar * (st.mT @ st) / N  # Ḡ ⊙ Eₙ[σ'σ'ᵀ]
                    continue
                for pname in (layer.weight, layer.bias):
                    if pname in factors:
                        factors[pname].add("G", Gbar)
                W = eng.tensors[layer.weight]
                Gbar = W.mT @ Gbar @ W


def kfac_factors(model, loss_fn, data, *, fisher="mc", mc_samples=1, seed=None, kfra=False,
                 kfac_approx="backpack", params=None, process_group=None):
    """BackPACK-style Kronecker factors: ``{param: [G, A]}`` for weights, ``[G]`` for
    biases, with BackPACK's scaling (see this module's table; ``kfac_approx`` picks the
    convention for weight sharing). Used by ``quantities(..., ["kfac", "kflr", "kfra"])``."""
    group = resolve_group(process_group)
    seed = seed if seed is None else rank_seed(seed, group)
    col = _Collector(unwrap_ddp(model, group), loss_fn, params, "exact" if kfra else fisher,
                     mc_samples, seed, kfac_approx, kfra, "drop")
    sums, guard = group_sums(group, col.engine, "The Kronecker factors")
    with guard:
        factors, info = col.run(data, sums=sums, gradient=False)
    out = {}
    for p, f in factors.items():
        kind = info["kinds"].get(p)
        if kind == "weight":
            out[p] = [f.G, f.A]
        elif kind == "bias":
            out[p] = [f.G]
        else:
            raise ValueError(
                f"Parameter {p!r} belongs to no layer with a Kronecker factorization "
                "(nn.Linear, nn.Conv1d/2d/3d with groups=1, used only through its module). "
                "Pass params= without it."
            )
    return out


class KFAC(BlockDiag):
    """K-FAC: the GGN (or Fisher) approximated by one Kronecker product per weight.

    A ``linops.BlockDiag`` in ``param_space`` order with a block per parameter: weights
    of ``nn.Linear`` and ``nn.Conv1d``/``2d``/``3d`` (groups = 1) ``G ⊗ A`` (``linops.Kronecker``
    of PSD dense factors), biases their GGN block ``G``, any other parameter a dense block
    of its (exact or sampled) GGN (``unsupported='dense'``, up to 4096 entries) or left out
    of the operator (``'drop'``); ``K.info["kinds"]`` says which parameter took which.
    PSD. Because it is built from linops operators, ``solvers.inv(K + λ·I_like(K))``,
    ``logdet``, ``trace``, ``sqrt`` and ``eig`` are exact and cheap (the shifted Kronecker
    blocks are diagonalized by the factors' eigendecompositions); ``K.damped(λ, "pi")`` is
    the factor-wise π-heuristic damping of Martens & Grosse (2015).

    Args:
        model, loss_fn, data, params: as ``linops.curvature.quantities``.
        fisher: ``"mc"`` (K-FAC: ``mc_samples`` labels drawn from the model per sample),
            ``"exact"`` (KFLR: the C columns of the loss Hessian's square root) or
            ``"empirical"`` (the gradient at the true labels).
        kfra: G by KFRA's back-propagated batch-averaged Hessian (MLP chains only).
        mc_samples, seed: the Monte-Carlo draws of ``fisher="mc"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for layers whose weight is shared
            over positions (sequences, convolutions), or ``"backpack"`` (BackPACK's).
        unsupported: ``"dense"`` or ``"drop"`` (see above).
        bias: ``"separate"`` (default: BackPACK's blocks, the bias's own GGN block) or
            ``"joint"``: a layer's weight and bias (the bias right after its weight, used
            through the same calls) take one block ``G ⊗ Ā``, the bias as the inputs'
            constant last column, ``Ā = [[A, ā], [āᵀ, 1]]`` with ``ā`` the inputs' mean
            (homogeneous coordinates, Martens & Grosse 2015; ``linops.Permuted`` over the
            ``[vec W; b]`` order). It keeps the weight-bias coupling that separate blocks
            drop: as a CG preconditioner on the reference MLP it took about half the
            iterations (``solvers.curvature_preconditioner`` uses it). For ``"expand"``
            and ``"reduce"``; ``K.info["joint"]`` maps each joined weight to its bias.
        process_group: a ``torch.distributed`` process group over whose ranks the data is
            sharded: the factors, loss and gradient are those of the union of the shards
            (one all-reduce after the pass; rank r draws with ``seed + r·2³²``).

    Attributes:
        factors: ``{param: [G, A]}`` (weights) or ``[G]`` (biases), dense tensors.
        param_space, loss, gradient (flat, over ``param_space``), output (of a single
        batch), info.

    Cost: one forward and one backward pass of M + 1 cotangent columns per batch, and per
    layer two GEMMs for the factors. A product with the inverse of the damped operator
    costs two GEMMs per layer with the factors' eigenvectors.

    Example:
        >>> import torch, solvers
        >>> from torch import nn
        >>> from linops import I_like
        >>> from linops.curvature import KFAC
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> K = KFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact")
        >>> K
        KFAC(exact, 26 params: 2 Kronecker, 2 bias blocks)
        >>> step = solvers.inv(K + 1e-3 * I_like(K)) @ K.gradient   # exact, no CG
        >>> step.shape
        torch.Size([26])
    """

    def __init__(self, model, loss_fn, data, *, fisher: str = "mc", kfra: bool = False,
                 mc_samples: int = 1, seed: int | None = None, kfac_approx: str = "expand",
                 params=None, unsupported: str = "dense", progress: bool = False,
                 process_group=None, bias: str = "separate"):
        if bias not in ("separate", "joint"):
            raise ValueError(f"bias must be 'separate' or 'joint'; got {bias!r}.")
        if bias == "joint" and kfac_approx == "backpack":
            raise ValueError(
                "bias='joint' needs kfac_approx='expand' or 'reduce': under BackPACK's "
                "convention A sums over positions while the bias's block does not, so the "
                "bias is no homogeneous input column. Use kfac_approx='expand'.")
        group = resolve_group(process_group)
        seed = seed if seed is None else rank_seed(seed, group)
        col = _Collector(unwrap_ddp(model, group), loss_fn, params, fisher, mc_samples, seed,
                         kfac_approx, kfra, unsupported)
        sums, guard = group_sums(group, col.engine, type(self).__name__)
        with guard:
            factors, info = col.run(data, progress, sums=sums)
        #: the process group the factors were reduced over (None: one process); EKFAC's
        #: refit (run while the blocks are built) reduces over it too
        self._group = group
        names = [p for p in col.engine.names if info["kinds"][p] != "dropped"]
        if not names:
            raise ValueError("No parameter left: every one was dropped (unsupported='drop').")
        self.factors = {}
        for p in names:
            f, kind = factors[p], info["kinds"][p]
            self.factors[p] = {"weight": [f.G, f.A], "bias": [f.G]}.get(kind, [f.dense])
        #: joined weight → its bias (``bias="joint"``), and each joined weight's Ā
        self.joint, self.homogeneous = {}, {}
        if bias == "joint":
            for p, q in zip(names, names[1:]):
                if (info["kinds"][p] == "weight" and info["kinds"][q] == "bias"
                        and info["calls"][p] == info["calls"][q]):
                    A, S = factors[p].A, factors[p].S
                    one = torch.ones(1, 1, dtype=A.dtype, device=A.device)
                    self.joint[p] = q
                    self.homogeneous[p] = torch.cat(
                        [torch.cat([A, S[:, None]], 1), torch.cat([S[None], one], 1)], 0)
        joined = set(self.joint.values())
        super().__init__(*(self._joint_block(p) if p in self.joint
                           else self._block(p, info["kinds"][p])
                           for p in names if p not in joined))
        self._tags = frozenset({"self_adjoint", "psd"})
        self.param_space = ParamSpace({p: col.engine.params[p] for p in names})
        self.info = {"kinds": {p: info["kinds"][p] for p in col.engine.names},
                     "fisher": fisher, "kfra": kfra, "kfac_approx": kfac_approx,
                     "bias": bias, "joint": dict(self.joint)}
        self.loss = info["loss"]
        self.gradient = self.param_space.join([info["gradient"][p] for p in names]).detach()
        self.num_terms = as_count(info["num_terms"])
        #: the model output of a single batch (None over several), detached
        self.output = info["output"]
        self._label = "KFRA" if kfra else fisher

    def _block(self, p, kind):
        fs = self.factors[p]
        if kind == "weight":
            return Kronecker(PSD(Dense(fs[0])), PSD(Dense(fs[1])))
        return PSD(Dense(fs[0]))

    def _joint_block(self, p, G=None, A=None):
        """``Pᵀ (G ⊗ Ā) P`` over a weight's and its bias's ``[vec W; b]``."""
        G = self.factors[p][0] if G is None else G
        A = self.homogeneous[p] if A is None else A
        return Permuted(Kronecker(PSD(Dense(G)), PSD(Dense(A))),
                        _joint_order(G.shape[0], A.shape[0] - 1, G.device, G.dtype))

    def damped(self, damping: float, kind: str = "exact") -> BlockDiag:
        """``K + λ·I`` (``kind="exact"``, the same as ``K + λ·I_like(K)``: inverses by the
        factors' eigendecompositions) or the π-heuristic ``(G + (√λ/π)·I) ⊗ (A + π√λ·I)``
        with ``π = √((tr A / dim A) / (tr G / dim G))`` (``kind="pi"``, Martens & Grosse
        2015; joint blocks with Ā for A; separate biases and dense blocks ``G + λ·I``).
        PSD."""
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
                damping > 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a positive number; got {damping!r}.")
        if kind == "exact":
            return self + damping * I_like(self)
        if kind != "pi":
            raise ValueError(f"kind must be 'exact' or 'pi'; got {kind!r}.")
        blocks = []
        joined = set(self.joint.values())
        for p, fs in self.factors.items():
            if p in joined:
                continue
            if len(fs) == 2:
                G, A = fs[0], self.homogeneous.get(p, fs[1])
                eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
                eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                tg = float(G.diagonal().mean())
                ta = float(A.diagonal().mean())
                pi = math.sqrt(ta / tg) if tg > 0 and ta > 0 else 1.0
                r = math.sqrt(damping)
                Gd, Ad = G + (r / pi) * eye_g, A + (r * pi) * eye_a
                blocks.append(self._joint_block(p, Gd, Ad) if p in self.joint else
                              Kronecker(PSD(Dense(Gd)), PSD(Dense(Ad))))
            else:
                G = fs[0]
                blocks.append(PSD(Dense(G + damping * torch.eye(G.shape[0], dtype=G.dtype,
                                                                  device=G.device))))
        out = BlockDiag(*blocks)
        out._tags = frozenset({"self_adjoint", "psd"})
        return out

    def _repr(self):
        kinds = list(self.info["kinds"].values())
        nj = len(getattr(self, "joint", {}))
        parts = [f"{kinds.count('weight') - nj} Kronecker",
                 f"{kinds.count('bias') - nj} bias blocks"]
        if nj:  # (the counts of separate blocks only where there are any)
            parts = [f"{nj} joint weight+bias"] + [q for q in parts if q[0] != "0"]
        if kinds.count("dense"):
            parts.append(f"{kinds.count('dense')} dense")
        if kinds.count("dropped"):
            parts.append(f"{kinds.count('dropped')} dropped")
        return f"{type(self).__name__}({self._label}, {self.shape[0]} params: {', '.join(parts)})"


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC (George et al. 2018): K-FAC's eigenbasis ``Q_G ⊗ Q_A``
    with the diagonal refitted to the per-sample gradients of the same cotangent columns,
    ``s = (1/c) Σₘₙ (Q_Gᵀ ∇Wₘₙ Q_A)²``, so each weight block is
    ``(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ`` (``linops.KroneckerEigen``): the diagonal in that
    basis closest to the block in Frobenius norm, hence never farther than K-FAC. Biases
    and dense blocks as in ``KFAC``. Costs a second pass over the data (the refit needs
    the eigenbasis). Arguments as ``KFAC`` (``kfra`` excepted); with ``process_group=``
    the factors and then the refitted diagonals are all-reduced (one all-reduce after each
    pass), so the operator is the one-process EKFAC of the union of the shards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import EKFAC
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> EKFAC(model, nn.CrossEntropyLoss(), (X, y), fisher="exact").shape
        (26, 26)
    """

    def __init__(self, model, loss_fn, data, *, fisher: str = "mc", mc_samples: int = 1,
                 seed: int | None = None, kfac_approx: str = "expand", params=None,
                 unsupported: str = "dense", progress: bool = False, process_group=None):
        self._eigen = {}
        self._data = data
        self._args = (model, loss_fn, params, fisher, mc_samples, seed, kfac_approx)
        super().__init__(model, loss_fn, data, fisher=fisher, mc_samples=mc_samples,
                         seed=seed, kfac_approx=kfac_approx, params=params,
                         unsupported=unsupported, progress=progress,
                         process_group=process_group)

    def _block(self, p, kind):
        if kind != "weight":
            return super()._block(p, kind)
        if not self._eigen:
            self._eigen = self._refit()
        return self._eigen[p]

    def _refit(self):
        model, loss_fn, params, fisher, mc_samples, seed, approx = self._args
        bases = {}
        for p, fs in self.factors.items():
            if len(fs) == 2:
                bases[p] = [torch.linalg.eigh((f + f.mT) / 2)[1] for f in fs]
        group = self._group  # set by KFAC.__init__ before the blocks are built
        seed = seed if seed is None else rank_seed(seed, group)
        eng = Engine(unwrap_ddp(model, group), loss_fn, params, mc_samples=mc_samples,
                     seed=seed)
        key = _FISHER[fisher]
        sets = set() if key == "grad" else {key}
        acc, count = {p: None for p in bases}, 0
        sums, guard = group_sums(group, eng, "EKFAC's refit of the diagonal")
        with guard:
            gen = eng.new_generator()
            for X, y in Batches(self._data, eng.device):
                plan, loss_state, out, N = eng.prepare(X, y, sets, gen)
                for p, (QG, QA) in bases.items():
                    total = None
                    if len(plan.uses[p]) == 1:  # one call: a Linear layer's square sums
                        # on the rotated inputs and cotangents, without forming the
                        # per-sample gradients (T = 1) or a few samples at a time (T > 1)
                        i, r, rule, _ = plan.uses[p][0]
                        a, g = _layer_inputs(r, rule, plan.cots[key][i])
                        gq, aq = g @ QG, a @ QA
                        s = (linear_rules.sum_sq(aq, gq, None, False)["weight"]
                             if aq.shape[1] == 1
                             else linear_rules.sum_sq_chunked(aq.mT, gq.mT, None, False))
                        acc[p] = s if acc[p] is None else acc[p] + s
                        continue
                    for i, r, rule, _ in plan.uses[p]:
                        a, g = _layer_inputs(r, rule, plan.cots[key][i])
                        # per-sample gradients in the eigenbasis, Σₜ (Q_Gᵀ gₜ)(Q_Aᵀ aₜ)ᵀ
                        part = torch.einsum("mnto,nti->mnoi", g @ QG, a @ QA)
                        total = part if total is None else total + part
                    s = (total * total).sum((0, 1))
                    acc[p] = s if acc[p] is None else acc[p] + s
                count = count + eng.loss_curv.count(loss_state)
            if sums is not None:  # data-parallel: one all-reduce of the diagonals and count
                red = sums.reduce([acc[p] for p in bases] + [count])
                acc, count = dict(zip(bases, red[:-1])), red[-1]
        c = float(count) if eng.loss_curv.reduction == "mean" else 1.0
        return {p: KroneckerEigen(bases[p], (acc[p] / c).reshape(-1)) for p in bases}
