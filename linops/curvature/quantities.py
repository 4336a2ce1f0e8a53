"""``quantities``: BackPACK's per-sample, diagonal and square-root curvature quantities.

Every name comes from one engine (``_records.py`` records the layers in one forward pass
and back-propagates batches of cotangent columns; ``layers/`` turns a layer's input and
output cotangents into the quantity). The names, shapes and scaling follow BackPACK, so
a BackPACK user finds what they know. With ``c`` = 1 for ``reduction='sum'`` and the
number of loss terms over the whole data set for ``'mean'`` (N for N samples of
``(N, C)`` logits; see ``linops.curvature.losses``), and ``gₙ = ∇_θ ℓₙ`` the gradient of
sample n's summed loss terms:

=========================  ==========================  ===========================================
name                       shape per parameter p       value
=========================  ==========================  ===========================================
``grad_batch``             (N, *p.shape)               gₙ / c: the per-sample gradient of the loss
                                                       (Σₙ of it is the gradient)
``batch_l2``               (N,)                        ‖gₙ / c‖² (per parameter)
``sum_grad_squared``       p.shape                     Σₙ (gₙ / c)²
``variance``               p.shape                     Σₙ (gₙ/c)² / N − (Σₙ gₙ/c / N)² (BackPACK's
                                                       Variance, N the number of samples)
``diag_ggn_exact``         p.shape                     diag(G), G = (1/c) Σₙ Jₙᵀ ∇²ℓₙ Jₙ
``diag_ggn_exact_batch``   (N, *p.shape)               diag((1/c) Jₙᵀ ∇²ℓₙ Jₙ) per sample
``diag_ggn_mc``            p.shape                     diag of the Monte-Carlo GGN: ∇²ℓₙ replaced
                                                       by (1/S) Σₛ r̃ₛ r̃ₛᵀ at labels drawn from
                                                       the model (S = ``mc_samples``)
``diag_ggn_mc_batch``      (N, *p.shape)               the same, per sample
``diag_h``                 p.shape                     diag of the Hessian of the loss
``diag_h_batch``           (N, *p.shape)               diag of (1/c) ∇²_θ ℓₙ per sample
``sqrt_ggn_exact``         (C, N, *p.shape)            V with G = Σ_{m,n} V_mn V_mnᵀ (C = the
                                                       output entries per sample)
``sqrt_ggn_mc``            (S, N, *p.shape)            the same for the Monte-Carlo GGN
=========================  ==========================  ===========================================

"Sample" means index n along the first dimension of the input (and of the model output).
Over several batches, sums accumulate to the value of the whole data set and per-sample
names concatenate along the sample dimension.

How each parameter is computed (``supported_layers()`` prints the table): ``nn.Linear``
(any leading dimensions), ``nn.Conv1d``/``2d``/``3d``, BatchNorm in eval mode, LayerNorm,
GroupNorm and Embedding by closed forms (``layers/``); any other module owning the
parameter (transposed convolutions, attention, recurrent layers, ...) by ``torch.func``
per-sample ``vjp`` of that module alone; a parameter that no module call accounts for
(used directly in a parent's ``forward``, or besides its module's own call) by the
per-sample ``vjp`` of the whole
model. Between the layers, autograd carries the cotangents (activations, pooling,
residual connections, attention), so no model structure is assumed. A multilayer
perceptron (``_mlp.mlp_spec``: an ``nn.Sequential`` of Linear layers, elementwise
activations, Flatten, Identity, inactive dropout) is recorded and back-propagated with raw
tensor operations instead (``_records.record_chain``): no hooks, no graph (except for the
Hessian diagonal), the same results; on ``Sequential(Flatten(), Linear(784, 10))`` at
batch 512 that took ``batch_l2`` from 1.6 to 1.0 forward + backward.

The exact Hessian diagonal adds, to the GGN part, the second-order terms of the
elementwise activation modules (``nn.Tanh``, ``nn.Sigmoid``, ``nn.SiLU``, ``nn.GELU``,
...): for each, one cotangent column per unit of the activation's input is
back-propagated (BackPACK's cost). It is exact when every other operation of the model is
linear or piecewise linear in its inputs (Linear, convolutions, eval-mode BatchNorm,
pooling, ReLU, residual additions, reshapes); the graph is checked, and a model with
another nonlinearity (LayerNorm, attention, a functional ``torch.tanh``) raises and
points to ``DiagHessian(..., estimator=...)``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import _memory
from ._data import Batches, check_eval_mode, progress_bar, require_tqdm, resolve_params
from ._distributed import group_sums, rank_seed, resolve_group, unwrap_ddp
from ._mlp import MLPSpec, _activation, mlp_layer_cotangents, mlp_spec
from ._records import _reaching, backprop, check_output, param_owners, record_chain, record_forward
from .layers import rule_for
from .layers._base import MODULE_RULE
from .layers.linear import square_sum
from .losses import loss_curvature

__all__ = ["quantities", "QUANTITY_NAMES", "Engine"]

FIRST_ORDER = ("grad_batch", "batch_l2", "sum_grad_squared", "variance")
SECOND_ORDER = ("diag_ggn_exact", "diag_ggn_exact_batch", "diag_ggn_mc", "diag_ggn_mc_batch",
                "diag_h", "diag_h_batch", "sqrt_ggn_exact", "sqrt_ggn_mc")
#: BackPACK's Kronecker factors (``linops.curvature.kfac``): ``[G, A]`` per weight, ``[G]``
#: per bias
KRONECKER = ("kfac", "kflr", "kfra")
#: BackPACK's block-diagonal curvature-matrix products (``linops.curvature.blocks``): for
#: each parameter a callable ``V (V, *p.shape) → (V, *p.shape)``
BLOCK_PRODUCTS = ("hmp", "ggnmp", "pchmp_abs", "pchmp_clip")
#: every name ``quantities`` knows
QUANTITY_NAMES = FIRST_ORDER + SECOND_ORDER + KRONECKER + BLOCK_PRODUCTS
#: names with one entry per sample (concatenated over batches, kept in memory)
PER_SAMPLE = ("grad_batch", "batch_l2", "diag_ggn_exact_batch", "diag_ggn_mc_batch",
              "diag_h_batch", "sqrt_ggn_exact", "sqrt_ggn_mc")
_SAMPLE_DIM = {"sqrt_ggn_exact": 1, "sqrt_ggn_mc": 1}

#: at most this many entries in one materialized per-sample tensor (columns are chunked)
ENTRY_BUDGET = 2**24

#: operations that are linear or piecewise linear in their inputs (no second-order term
#: on the Hessian diagonal); names of autograd nodes without the trailing digits
_LINEAR_NODES = frozenset("""
AccumulateGrad AddmmBackward AddBackward SubBackward MmBackward BmmBackward MvBackward
ViewBackward UnsafeViewBackward ReshapeAliasBackward AsStridedBackward TBackward
TransposeBackward PermuteBackward ExpandBackward SqueezeBackward UnsqueezeBackward
CloneBackward SliceBackward SelectBackward IndexBackward IndexSelectBackward CatBackward
StackBackward SplitBackward SplitWithSizesBackward UnbindBackward NegBackward SumBackward
MeanBackward ConvolutionBackward MaxPool2DWithIndicesBackward MaxPool3DWithIndicesBackward
AvgPool2DBackward AvgPool3DBackward AdaptiveAvgPool2DBackward AdaptiveAvgPool3DBackward
AdaptiveMaxPool2DBackward AdaptiveMaxPool3DBackward ReluBackward ThresholdBackward
LeakyReluBackward HardtanhBackward NativeBatchNormBackward CudnnBatchNormBackward
MiopenBatchNormBackward EmbeddingBackward ToCopyBackward ConstantPadNdBackward
ReflectionPad1DBackward ReflectionPad2DBackward ReplicationPad1DBackward
ReplicationPad2DBackward UpsampleNearest2DBackward UpsampleBilinear2DBackward
AliasBackward MaxBackward MinBackward AmaxBackward AminBackward MaskedFillBackward
""".split())
#: activation modules with σ'' = 0 wherever defined (no second-order term on the Hessian)
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6,
                    nn.Hardshrink, nn.Softshrink)
#: elementwise products: bilinear (checked by ``_check_no_self_product``); a division is
#: linear only when its denominator does not depend on the parameters
_PRODUCT_NODES = frozenset({"MulBackward"})
_QUOTIENT_NODES = frozenset({"DivBackward"})


def _node_kind(node) -> str:
    return node.name().rsplit("::", 1)[-1].rstrip("0123456789")


class Engine:
    """The model, loss and parameters the quantities are computed for (see
    ``quantities`` for the arguments)."""

    def __init__(self, model, loss_fn, params=None, *, mc_samples: int = 1, seed=None,
                 vectorize: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None; got {seed!r}.")
        self.loss_curv = loss_curvature(loss_fn)
        self.model = model
        named = dict(model.named_parameters())  # (one walk of the module tree for all)
        self.params = resolve_params(model, params, named)
        self.names = list(self.params)
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"The parameters must share one real floating dtype; got {dtypes}.")
        self.dtype = next(iter(dtypes))
        self.device = next(iter(self.params.values())).device
        check_eval_mode(model, False)
        # a multilayer perceptron is recorded and back-propagated with raw tensor
        # operations (``_mlp``), without hooks or autograd (not for the Hessian diagonal,
        # whose activation terms take autograd's passes)
        spec = mlp_spec(model, self.names, self.dtype, order=1, named=named)
        self.chain = spec if isinstance(spec, MLPSpec) else None
        if self.chain is None:  # (a chain holds no module with batch_first)
            _check_batch_first(model)
        self.mc_samples = mc_samples
        self.seed = seed
        self.vectorize = vectorize
        self._owners = None
        self.tensors = {n: p.detach() for n, p in named.items()}
        self.tensors.update({n: p.detach() for n, p in self.params.items()})

    @property
    def owners(self) -> dict:
        """``_records.param_owners`` of the model (for ``record_forward``), made once."""
        if self._owners is None:
            self._owners = param_owners(self.model, self.names)
        return self._owners

    def new_generator(self):
        if self.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(self.seed)

    # ------------------------------------------------------------------ one batch
    def record(self, X, activations: bool = False, tensors=None):
        """The recorded forward pass of one batch (``_records.record_forward``) at the
        engine's parameters (or at ``tensors``), its output's dtype checked."""
        rec = record_forward(self.model, self.tensors if tensors is None else tensors,
                             self.names, X, self.owners, activations=activations)
        if rec.output.dtype != self.dtype:
            raise ValueError(
                f"The model output has dtype {rec.output.dtype} but the parameters have "
                f"{self.dtype}; make them agree (model.to(dtype), inputs of that dtype)."
            )
        return rec

    def prepare(self, X, y, sets: set, generator, activations: bool = False,
                grad: bool = True, param_grad: bool = False, prescale: bool = False,
                grad_layers: bool = True, reduce=None):
        """One batch's forward pass with records and the cotangent column sets (``"grad"``
        always, ``"exact"``: the loss Hessian's square root, ``"mc"``: sampled) back-
        propagated to every recorded layer in one batched pass. Returns ``(plan,
        loss_state, output, N)``."""
        rec = None
        if self.chain is not None and not activations:
            rec = record_chain(self.model, self.chain, self.tensors, X, self.dtype)
        if rec is None:
            rec = self.record(X, activations)
        out = rec.output
        N = _num_samples(X, out)
        loss_state = self.loss_curv.prepare(out, y)
        residual = self.loss_curv.residual(loss_state)
        # (-inf logits of masked classes pass); the sum first: one reduction, and the
        # entrywise check only where it is not finite (it may overflow alone)
        if not math.isfinite(float(residual.sum())) and not bool(
                torch.isfinite(residual).all()):
            if rec.chain is not None:  # (record_forward checks the output itself)
                check_output(out)
            raise FloatingPointError(
                "The loss gradient at the model output holds NaN or inf values, so the "
                "curvature is undefined: the model output or the targets are not finite "
                "where the loss needs them (after an optimizer step, lower lr or raise "
                "damping)."
            )
        plan = _Plan(self, rec, N)
        plan._input = X
        if grad == "curved":  # the Hessian diagonal: the gradient column feeds only the
            # activations' second-order terms, which piecewise-linear ones do not have
            grad = any(type(a.module) not in PIECEWISE_LINEAR for a in rec.activations)
        cols = {"grad": residual.unsqueeze(0)} if grad else {}
        if "exact" in sets:
            cols["exact"] = self.loss_curv.hessian_sqrt(loss_state)
        if "mc" in sets:
            S = self.mc_samples
            cols["mc"] = self.loss_curv.sampled_residuals(loss_state, S, generator) / S**0.5
        if sets and out.shape[0] != N:
            raise ValueError(_rows_message(out, N))
        if prescale:  # the mean's 1/c on the (small) cotangents, not on the results
            c = float(self.loss_curv.count(loss_state)) if self.loss_curv.reduction == "mean" \
                else 1.0
            if c > 0 and c != 1:
                cols = {k: v * (1 / c if k == "grad" else c ** -0.5) for k, v in cols.items()}
            plan.prescaled = c
        plan.propagate(out, cols, param_grad, grad_layers, reduce)
        return plan, loss_state, out, N

    def batch(self, X, y, want: set, generator, gradient: bool = False,
              prescale: bool = False, loss: bool = True) -> dict:
        """The raw (unscaled, summed-loss) quantities of one batch: ``{name: {param:
        tensor}}`` plus ``"_gradient"``, ``"_value"``, ``"_count"``, ``"_N"``,
        ``"_output"``."""
        need_h = bool(want & {"diag_h", "diag_h_batch"})
        sets = set()
        if want & {"diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "diag_h",
                   "diag_h_batch"}:
            sets.add("exact")
        if want & {"diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc"}:
            sets.add("mc")
        need_grad = gradient or bool(want & set(FIRST_ORDER))
        if not need_grad and need_h:
            need_grad = "curved"
        plan, loss_state, out, N = self.prepare(
            X, y, sets, generator, need_h, need_grad, param_grad=gradient, prescale=prescale,
            grad_layers=bool(want & set(FIRST_ORDER)) or need_h)
        if need_h:
            plan.check_hessian_graph()

        res = {}
        for name in want:
            res[name] = {p: plan.quantity(name, p) for p in self.names}
        if gradient or "variance" in want:
            res["_gradient"] = {p: plan.summed("grad", p)[0] for p in self.names}
        if loss:
            with torch.no_grad():
                res["_value"] = self.loss_curv.summed_loss(out.detach(), y,
                                                           loss_state).reshape(())
        else:  # the caller reports no loss (quantities): no second evaluation of it
            res["_value"] = 0.0
        res["_count"] = self.loss_curv.count(loss_state)
        res["_N"] = N
        res["_output"] = out.detach()
        res["_prescaled"] = plan.prescaled
        return res


def _rows_message(out, N):
    return (
        f"The model output has {out.shape[0]} rows but the input holds N={N} samples: "
        "per-sample second-order quantities need one output row per sample (its columns "
        "must not mix samples). Return the logits as (N, C, d1, ...) and targets as "
        "(N, d1, ...) instead of flattening them (CrossEntropyLoss takes extra dimensions)."
    )


def _num_samples(X, out) -> int:
    if isinstance(X, torch.Tensor):
        if X.ndim == 0:
            raise ValueError("The input X is a scalar; per-sample quantities need (N, ...).")
        return X.shape[0]
    return out.shape[0]


def _check_batch_first(model):
    for name, m in model.named_modules():
        if getattr(m, "batch_first", True) is False and any(True for _ in m.parameters()):
            raise ValueError(
                f"Module {name or 'model'!r} ({type(m).__name__}) has batch_first=False: the "
                "layer-wise engine reads samples along dimension 0 of every layer's input. "
                "Build it with batch_first=True (and feed (N, T, ...) inputs)."
            )


class _Plan:
    """Which rule computes each parameter in one batch, and the back-propagated
    cotangents at each recorded layer."""

    def __init__(self, engine: Engine, rec, N: int):
        self.engine, self.rec, self.N = engine, rec, N
        self._input = None
        self._h_cache = {}
        self.uses = {p: [] for p in engine.names}  # param -> [(index, record, rule, local)]
        fallback = set()
        for i, r in enumerate(rec.layers):
            if r.input.ndim == 0 or r.input.shape[0] != N:
                raise ValueError(
                    f"Layer {r.name!r} ({type(r.module).__name__}) received an input of "
                    f"shape {tuple(r.input.shape)} whose first dimension is not the number "
                    f"of samples N={N}; per-sample quantities need every layer to take the "
                    "samples along dimension 0."
                )
            rule = rule_for(r.module)
            if rule.problem(r) is not None:
                rule = MODULE_RULE
                if rule.problem(r) is not None:
                    fallback.update(r.params.values())
                    continue
            for local, p in r.params.items():
                self.uses[p].append((i, r, rule, local))
        # a parameter used outside its recorded calls (or by no module call) takes the
        # whole-model rule: a call of a closed-form layer adds one graph edge into each of
        # its parameters, so more edges than calls mean other uses (a chain has none)
        edges = _leaf_edges(rec.output, rec.leaves) if rec.chain is None else None
        for p, uses in self.uses.items():
            one_edge = all(rule.single_edge for _, _, rule, _ in uses)
            if not uses or (edges is not None and one_edge and edges.get(p, 0) != len(uses)):
                fallback.add(p)
        for p in fallback:
            self.uses[p] = []
        self.fallback = [p for p in engine.names if p in fallback]
        self.param_grads = {}  # name -> the summed gradient, where autograd gave it
        self.prescaled = None  # the count c the cotangents were scaled by (1/c, 1/√c)
        self.cots = {}  # set -> list aligned with rec.layers (M, N, *out) or None
        self.act_cots = {}
        self.model_cots = {}

    # ------------------------------------------------------------- propagation
    def propagate(self, out, sets: dict, param_grad: bool = False, grad_layers: bool = True,
                  reduce=None):
        """Back-propagate the cotangent column sets to every recorded layer output in one
        batched pass (the gradient column also to the activations'). ``param_grad`` (with a
        ``"grad"`` set):
        the gradient column goes alone through a plain backward pass that also reaches the
        parameters, so the summed gradient comes from autograd's own kernels (fused with
        the input gradients) instead of a second pass over the layer records."""
        if self.rec.chain is not None:  # a multilayer perceptron: by hand (``_mlp``)
            return self._propagate_chain(sets)
        # only the gradient column's cotangents at the activations are ever used (the
        # Hessian's second-order terms): it goes alone when activations are recorded
        if "grad" in sets and (param_grad or self.rec.activations):
            sets = dict(sets)
            self._propagate_gradient(out, sets.pop("grad"), param_grad, grad_layers)
            if not sets:
                return
        names = list(sets)
        sizes = [sets[k].shape[0] for k in names]
        cot = torch.cat([sets[k] for k in names]) if len(names) > 1 else sets[names[0]]
        targets = [r.output for r in self.rec.layers]
        # ``reduce`` (a function of a layer record → None or a per-column reduction of its
        # cotangents, e.g. KFAC's sum over a convolution's positions): those layers' cots
        # hold the reduced columns, for the caller that asked
        got = backprop(out, targets, cot, self._vectorize(),
                       None if reduce is None else [reduce(r) for r in self.rec.layers])
        start = 0
        for k, size in zip(names, sizes):
            sl = slice(start, start + size)
            self.cots[k] = [None if g is None else g[sl] for g in got]
            self.model_cots[k] = sets[k]
            start += size

    def _propagate_chain(self, sets: dict):
        if not sets:
            return
        names = list(sets)
        cot = torch.cat([sets[k] for k in names]) if len(names) > 1 else sets[names[0]]
        got = mlp_layer_cotangents(self.rec.chain, cot)
        got = [got[i] for i in self.rec.chain_index]
        start = 0
        for k in names:
            sl = slice(start, start + sets[k].shape[0])
            self.cots[k] = [g[sl] for g in got] if len(names) > 1 else got
            self.model_cots[k] = sets[k]
            start = sl.stop

    def _vectorize(self) -> bool:
        """One vmapped backward pass for the columns, or a loop over them: on a CPU, a
        graph with convolutions loops (vmap runs a convolution's backward once per column
        anyway and then stacks the results: the loop measured 11-13 % faster on the
        reference CNN, vmap as fast or faster without convolutions)."""
        if not self.engine.vectorize:
            return False
        return not (self.engine.device.type == "cpu" and any(
            isinstance(r.module, nn.modules.conv._ConvNd) for r in self.rec.layers))

    def _propagate_gradient(self, out, cot, param_grad: bool = True, layers: bool = True):
        """``layers=False`` (with ``param_grad``): the summed gradient alone (no name reads
        the gradient's cotangents at the layers), so autograd keeps none of them."""
        if not layers and param_grad and not self.rec.activations:
            leaves = list(self.rec.leaves.values())
            got = torch.autograd.grad(out, leaves, cot[0], retain_graph=True,
                                      allow_unused=True, materialize_grads=True)
            self.model_cots["grad"] = cot
            self.param_grads = dict(zip(self.rec.leaves, got))
            return
        targets = [r.output for r in self.rec.layers]
        acts = [a.output for a in self.rec.activations]
        reach = _reaching(out, targets + acts)
        inputs = [t for t, ok in zip(targets + acts, reach) if ok]
        leaves = list(self.rec.leaves.values()) if param_grad else []
        got = iter(torch.autograd.grad(out, inputs + leaves, cot[0], retain_graph=True,
                                       allow_unused=True, materialize_grads=True))
        res = [next(got).unsqueeze(0) if ok else None for ok in reach]
        self.cots["grad"] = res[:len(targets)]
        self.act_cots["grad"] = res[len(targets):]
        self.model_cots["grad"] = cot
        if param_grad:
            self.param_grads = dict(zip(self.rec.leaves, got))

    # ------------------------------------------------------------- per-parameter pieces
    def _uses(self, p, key):
        return [(r, rule, local, self.cots[key][i]) for i, r, rule, local in self.uses[p]]

    def per_sample(self, key, p, cols=None) -> torch.Tensor:
        """(M, N, *p.shape) for the columns ``cols`` (a slice) of set ``key``."""
        shape = self.engine.params[p].shape
        if p in self.fallback:
            cot = self.model_cots[key]
            cot = cot if cols is None else cot[cols]
            return self._whole_model(cot)[p]
        total = None
        for r, rule, local, c in self._uses(p, key):
            if c is None:
                continue
            if cols is None:  # every parameter of the call at once, once
                part = self._memo(r, ("per_sample", key),
                                  lambda rule=rule, r=r, c=c: rule.per_sample(r, c))[local]
            else:
                part = rule.per_sample(r, c[cols])[local]
            total = part if total is None else total + part
        if total is None:
            M = self.model_cots[key].shape[0] if cols is None else len(range(
                *cols.indices(self.model_cots[key].shape[0])))
            total = self.engine.params[p].new_zeros((M, self.N, *shape))
        return total

    @staticmethod
    def _memo(r, token, compute):
        """A rule's result for one layer call (all its parameters), computed once; only
        for results that do not depend on per-call weights."""
        memo = r.cache.setdefault("memo", {})
        if token not in memo:
            memo[token] = compute()
        return memo[token]

    def _single(self, p, key):
        uses = self._uses(p, key) if p not in self.fallback else []
        live = [u for u in uses if u[3] is not None]
        return live[0] if len(uses) == 1 and len(live) == 1 else None

    def _chunks(self, key, numel):
        M = self.model_cots[key].shape[0]
        step = max(1, ENTRY_BUDGET // max(1, self.N * numel))
        return [slice(i, min(M, i + step)) for i in range(0, M, step)]

    def summed(self, key, p) -> torch.Tensor:
        if key == "grad" and p in self.param_grads:
            return self.param_grads[p].unsqueeze(0)
        if p in self.fallback:
            return self.per_sample(key, p).sum(1)
        total = None
        for r, rule, local, c in self._uses(p, key):
            if c is None:
                continue
            part = self._memo(r, ("summed", key),
                              lambda rule=rule, r=r, c=c: rule.summed(r, c))[local]
            total = part if total is None else total + part
        if total is None:
            M = self.model_cots[key].shape[0]
            return self.engine.params[p].new_zeros((M, *self.engine.params[p].shape))
        return total

    def _record_numel(self, r):
        return sum(self.engine.params[q].numel() for q in r.params.values())

    def _unreached(self, p, key) -> bool:
        """Whether no column of set ``key`` reaches parameter ``p`` (its quantities are 0)."""
        return p not in self.fallback and all(
            self.cots[key][i] is None for i, _, _, _ in self.uses[p])

    def sum_sq(self, key, p, w=None, batch=False) -> torch.Tensor:
        """Σₘ Σₙ w g² (``batch``: Σₘ only, (N, *p.shape))."""
        if self._unreached(p, key):
            shape = self.engine.params[p].shape
            return self.engine.params[p].new_zeros((self.N, *shape) if batch else shape)
        one = self._single(p, key)
        if one is not None:
            r, rule, local, c = one

            def compute():
                if key == "grad" and w is None and not batch:
                    both = rule.sum_sq_summed(r, c)
                    if both is not None:  # the gradient as a by-product (for variance)
                        r.cache.setdefault("memo", {})[("summed", key)] = both[1]
                        return both[0]
                fast = (rule.sum_sq_batch if batch else rule.sum_sq)(r, c, w)
                return fast if fast is not None else self._record_sum_sq(r, rule, key, c, w,
                                                                         batch)

            if w is not None:  # per-call weights (the Hessian's unit columns): no memo
                return compute()[local]
            return self._memo(r, ("sum_sq", key, batch), compute)[local]
        acc = None
        for sl in self._chunks(key, self.engine.params[p].numel()):
            part = square_sum(self.per_sample(key, p, sl), None if w is None else w[sl],
                               batch)
            acc = part if acc is None else acc + part
        return acc

    def _record_sum_sq(self, r, rule, key, c, w, batch):
        """Σ w g² of every parameter of one call, from its per-sample gradients in chunks
        of columns."""
        acc = {}
        for sl in self._chunks(key, self._record_numel(r)):
            for local, g in rule.per_sample(r, c[sl]).items():
                part = square_sum(g, None if w is None else w[sl], batch)
                acc[local] = part if local not in acc else acc[local] + part
        return acc

    def sq_norm(self, key, p) -> torch.Tensor:
        one = self._single(p, key)
        if one is not None:
            r, rule, local, c = one

            def compute():
                fast = rule.sq_norm(r, c)
                if fast is not None:
                    return fast
                parts = {}
                for sl in self._chunks(key, self._record_numel(r)):
                    for loc, g in rule.per_sample(r, c[sl]).items():
                        parts.setdefault(loc, []).append(_sq_norms(g))
                return {loc: torch.cat(v) for loc, v in parts.items()}

            return self._memo(r, ("sq_norm", key), compute)[local]
        parts = []
        for sl in self._chunks(key, self.engine.params[p].numel()):
            g = self.per_sample(key, p, sl)
            parts.append(_sq_norms(g))
        return torch.cat(parts)

    def _whole_model(self, cot) -> dict:
        """Per-sample vjp of the whole model for the fallback parameters:
        ``(M, N, *p.shape)`` each, from cotangents ``(M, N, ...)`` at the output."""
        eng = self.engine
        if self.rec.output.shape[0] != self.N:
            raise ValueError(_rows_message(self.rec.output, self.N))
        X = self._input
        fixed = {n: t for n, t in eng.tensors.items() if n not in self.fallback}
        values = {n: eng.tensors[n] for n in self.fallback}

        def one(x, c):
            def f(v):
                return torch.func.functional_call(eng.model, {**fixed, **v}, (x.unsqueeze(0),))
            _, vjp_fn = torch.func.vjp(f, values)
            return torch.func.vmap(vjp_fn)(c.unsqueeze(1))[0]

        res = torch.func.vmap(one, in_dims=(0, 1))(X, cot)
        return {k: v.transpose(0, 1) for k, v in res.items()}

    # ------------------------------------------------------------- the Hessian diagonal
    def check_hessian_graph(self):
        """Raise unless every operation outside the recorded activations is linear or
        piecewise linear (so the activations hold every second-order term)."""
        if self.fallback:
            raise ValueError(
                f"The exact Hessian diagonal needs every parameter in a recorded layer; "
                f"{self.fallback[:3]} take the whole-model path. Use "
                "DiagHessian(..., estimator=...) for an estimate."
            )
        tied = [p for p, n in _leaf_edges(self.rec.output, self.rec.leaves).items() if n > 1]
        if tied:
            raise ValueError(
                f"The exact Hessian diagonal needs every parameter used once, but "
                f"{tied[:3]} enter the model several times (weight tying or a module called "
                "twice), which adds second-order terms between the uses. Use "
                "DiagHessian(..., estimator=...) for an estimate; every other quantity "
                "handles tied parameters exactly."
            )
        acts = {a.output.grad_fn for a in self.rec.activations}
        seen, stack = set(), [self.rec.output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            kind = _node_kind(node)
            inputs = [fn for fn, _ in node.next_functions if fn is not None]
            if node not in acts and kind not in _LINEAR_NODES | _PRODUCT_NODES:
                if not (kind in _QUOTIENT_NODES and node.next_functions[1][0] is None):
                    raise ValueError(
                        f"The exact Hessian diagonal covers models whose only "
                        f"nonlinearities are elementwise activation modules, but the graph "
                        f"holds {node.name()} (an operation with second derivatives the "
                        "engine does not back-propagate, e.g. LayerNorm, attention, a "
                        "functional torch.tanh, a product of two activations). Use "
                        "DiagHessian(..., estimator='hutchinson') or solvers.diag(Hessian(...), "
                        "alg=...) for an estimate, or replace functional activations by "
                        "modules."
                    )
            stack.extend(inputs)
        names = list(self.rec.leaves)
        _check_no_self_product(self.rec.output, [self.rec.leaves[n] for n in names], names)

    def hessian_terms(self, p_list, batch: bool) -> dict:
        """Σ over activations of Σᵤ Rₙᵤ (∂hₙᵤ/∂θ)² for each parameter (per sample when
        ``batch``)."""
        acc = {p: None for p in p_list}
        if "grad" not in self.act_cots:  # every activation piecewise linear (prepare)
            return acc
        grads = self.act_cots["grad"]
        layer_outputs = [r.output for r in self.rec.layers]
        for a, g_z in zip(self.rec.activations, grads):
            R = None if g_z is None else activation_residual(a, g_z[0])
            if R is None:
                continue
            h = a.args[0]
            R = R.reshape(self.N, -1)  # (N, U)
            U = R.shape[1]
            step = max(1, min(U, ENTRY_BUDGET // max(1, self.N * U)))
            for u0 in range(0, U, step):
                u1 = min(U, u0 + step)
                cot = h.new_zeros((u1 - u0, self.N, U))
                cot[torch.arange(u1 - u0), :, torch.arange(u0, u1)] = 1
                cot = cot.reshape(u1 - u0, *h.shape)
                got = backprop(h, layer_outputs, cot, self._vectorize())
                self.cots["_unit"] = got
                self.model_cots["_unit"] = cot
                w = R[:, u0:u1].T
                for p in p_list:
                    if self._unreached(p, "_unit"):  # a layer after the activation
                        continue
                    part = self.sum_sq("_unit", p, w, batch)
                    acc[p] = part if acc[p] is None else acc[p] + part
        self.cots.pop("_unit", None)
        self.model_cots.pop("_unit", None)
        return acc

    # ------------------------------------------------------------- names
    def quantity(self, name, p):
        if name == "grad_batch":
            return self.per_sample("grad", p)[0]
        if name == "batch_l2":
            return self.sq_norm("grad", p)[0]
        if name == "sum_grad_squared":
            return self.sum_sq("grad", p)
        if name == "variance":
            return self.sum_sq("grad", p)  # combined with the gradient when scaled
        if name in ("diag_ggn_exact", "diag_ggn_mc"):
            return self.sum_sq(name[9:], p)
        if name in ("diag_ggn_exact_batch", "diag_ggn_mc_batch"):
            return self.sum_sq(name[9:-6], p, batch=True)
        if name in ("sqrt_ggn_exact", "sqrt_ggn_mc"):
            return self.per_sample(name[9:], p)
        if name in ("diag_h", "diag_h_batch"):
            batch = name.endswith("_batch")
            if p not in self._h_cache.setdefault(batch, {}):
                terms = self.hessian_terms(self.engine.names, batch)
                for q in self.engine.names:
                    ggn = self.sum_sq("exact", q, batch=batch)
                    self._h_cache[batch][q] = ggn if terms[q] is None else ggn + terms[q]
            return self._h_cache[batch][p]
        raise AssertionError(name)


#: graph nodes bilinear in two of their operands (matrix products, convolutions,
#: batch norm's x·w, elementwise products): a second-order term couples the parameters the
#: two operands depend on
_BILINEAR_OPERANDS = frozenset("""
MmBackward BmmBackward MvBackward AddmmBackward AddmvBackward AddbmmBackward
BaddbmmBackward DotBackward LinalgVecdotBackward ConvolutionBackward MulBackward
DivBackward NativeBatchNormBackward CudnnBatchNormBackward MiopenBatchNormBackward
""".split())


def _check_no_self_product(output, leaves, names):
    """Raise if a bilinear operation multiplies two operands that depend on one parameter
    (``h @ h.T`` with ``h = layer(x)``): a second-order term inside that parameter's block
    which no activation holds. (Called by ``check_hessian_graph``: it counts matrix
    products as linear, right only when their operands depend on different parameters.)"""
    ids = {id(t): n for t, n in zip(leaves, names)}
    deps, stack = {}, [(output.grad_fn, False)] if output.grad_fn is not None else []
    while stack:
        node, done = stack.pop()
        if node in deps:
            continue
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        if not done:
            stack.append((node, True))
            stack.extend((fn, False) for fn in inputs if fn not in deps)
            continue
        var = getattr(node, "variable", None)
        own = frozenset({ids[id(var)]}) if var is not None and id(var) in ids else frozenset()
        sets = [deps[fn] for fn in inputs]
        if _node_kind(node) in _BILINEAR_OPERANDS:
            seen = set()
            for d in sets:
                both = seen & d
                if both:
                    raise ValueError(
                        f"The graph multiplies two tensors that both depend on "
                        f"{sorted(both)[:3]} ({node.name()}, e.g. h @ h.T with h = "
                        "layer(x)): a second-order term inside the block that the "
                        "activation terms do not hold."
                    )
                seen |= d
        deps[node] = own.union(*sets)


def activation_residual(a, g_z):
    """``R = g_z ⊙ σ''(h)``: the second-order term of an elementwise activation record ``a``
    (input h, output gradient ``g_z``), or None where σ'' is zero (ReLU, ...)."""
    d2 = _activation(a.module, a.args[0].detach(), 2)[2]
    return None if d2 is None else g_z * d2


def _sq_norms(g):
    """``(M, N)``: the squared norm of each per-sample gradient in ``g`` (M, N, ...)."""
    return torch.linalg.vector_norm(g.reshape(*g.shape[:2], -1), dim=-1).square_()


def _leaf_edges(output, leaves: dict) -> dict:
    """How many graph edges end in each parameter leaf."""
    acc_nodes = {}
    seen, stack = set(), [output.grad_fn]
    counts = {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            if fn.name() == "torch::autograd::AccumulateGrad":
                counts[fn] = counts.get(fn, 0) + 1
            else:
                stack.append(fn)
    for fn, c in counts.items():
        acc_nodes[id(fn.variable)] = c
    return {p: acc_nodes.get(id(t), 0) for p, t in leaves.items()}


# ---------------------------------------------------------------------- the public function
def _memory_limit(device) -> int:
    """Bytes the per-sample names may take: half the device's memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 * 2**30


def _expected_samples(data, batches: Batches, first_N: int) -> int | None:
    if batches.single:
        return first_N
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError:
            pass
    if batches.has_len():
        return len(batches) * first_N
    return None


def _per_sample_bytes(engine, names, first) -> int:
    total = 0
    for name in names:
        if name in PER_SAMPLE:
            for t in first[name].values():
                total += t.numel() * t.element_size()
    return total


def _check_names(names):
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"names must be a list of quantity names; got {names!r}.") from None
    unknown = [n for n in names if n not in QUANTITY_NAMES]
    if unknown:
        raise ValueError(
            f"Unknown quantity name(s) {unknown}; the valid names are: "
            f"{', '.join(QUANTITY_NAMES)}."
        )
    if not names:
        raise ValueError(f"names is empty; pass some of: {', '.join(QUANTITY_NAMES)}.")
    return list(dict.fromkeys(names))


def run(engine: Engine, data, names, progress: bool = False, gradient: bool = False,
        sums=None, loss: bool = True):
    """Pass over ``data`` computing ``names``; returns ``(results, info)`` with the
    scaled results and, in ``info``, the loss, flat gradient pieces and the output of a
    single batch. ``sums``: a ``_distributed.GroupSums``: the summed names, gradient, loss
    and counts are then all-reduced over its process group after the loop (per-sample
    names stay on their rank, scaled by the global count)."""
    want = set(names)
    batches = Batches(data, engine.device)
    if progress:
        require_tqdm()
    generator = engine.new_generator()
    acc, per_sample = {}, {n: {} for n in names if n in PER_SAMPLE}
    grad, value, count, N_total, output = None, 0.0, 0, 0, None
    total = len(batches) if batches.has_len() else None
    # one batch on one process: the mean's scaling goes on the cotangents (1/c on the
    # gradient column, 1/√c on square-root columns) instead of on the results, which are
    # many times larger (grad_batch: N × P)
    prescale = batches.single and sums is None
    prescaled = None
    for i, (X, y) in enumerate(progress_bar(batches, progress, total, "quantities")):
        res = engine.batch(X, y, want, generator, gradient, prescale=prescale, loss=loss)
        prescaled = res["_prescaled"]
        if i == 0 and per_sample:
            expected = _expected_samples(data, batches, res["_N"])
            need = _per_sample_bytes(engine, names, res) / max(1, res["_N"])
            limit = _memory_limit(engine.device)
            if expected is not None and need * expected > limit:
                raise MemoryError(
                    f"The per-sample names {sorted(per_sample)} over {expected} samples would "
                    f"take {need * expected / 2**30:.1f} GiB (the limit is half the device "
                    f"memory, {limit / 2**30:.1f} GiB). Pass fewer batches, a subset of "
                    "params=, or summed names (sum_grad_squared, diag_ggn_exact, ...)."
                )
        for name in names:
            for p, t in res[name].items():
                if name in PER_SAMPLE:
                    per_sample[name].setdefault(p, []).append(t)
                else:
                    acc.setdefault(name, {})
                    acc[name][p] = t if p not in acc[name] else acc[name][p] + t
        g = res.get("_gradient")
        if g is not None:
            grad = g if grad is None else {p: grad[p] + g[p] for p in g}
        value = value + res["_value"]
        count = count + res["_count"]
        N_total += res["_N"]
        output = res["_output"] if batches.single else None
    if sums is not None:  # data-parallel: one all-reduce of every sum (issue 11)
        keys = [(n, p) for n in names if n not in PER_SAMPLE for p in acc[n]]
        gkeys = [] if grad is None else list(grad)
        red = sums.reduce([acc[n][p] for n, p in keys] + [grad[p] for p in gkeys]
                          + [value, count, N_total])
        for (n, p), t in zip(keys, red):
            acc[n][p] = t
        grad = None if grad is None else dict(zip(gkeys, red[len(keys):-3]))
        value, count, N_total = red[-3:]
    c = count if engine.loss_curv.reduction == "mean" else 1
    c = float(c)
    if c == 0:
        raise ValueError("Every target is ignore_index: the loss has no term, its curvature "
                         "is undefined.")
    out = {}
    for name in names:
        if name in PER_SAMPLE:
            dim = _SAMPLE_DIM.get(name, 0)
            out[name] = {p: ts[0] if len(ts) == 1 else _cat(ts, dim)
                         for p, ts in per_sample[name].items()}
        else:
            out[name] = acc[name]
    # names may share a tensor (sum_grad_squared and variance): scale those out of place
    uses = {}
    for d in out.values():
        for t in d.values():
            key = t.untyped_storage().data_ptr()
            uses[key] = uses.get(key, 0) + 1
    c_loss = c
    if prescaled is not None:  # already scaled by the count of the cotangents' pass
        assert prescaled == c, (prescaled, c)
        c = 1.0
    for name in names:
        power = {"grad_batch": 1, "batch_l2": 2, "sum_grad_squared": 2, "variance": 2}.get(
            name, 1)
        scale = c ** power if not name.startswith("sqrt_") else math.sqrt(c)
        if scale != 1:  # our own tensors: scaled in place unless shared
            out[name] = {p: t.detach().div_(scale)
                         if uses[t.untyped_storage().data_ptr()] == 1 else t.detach() / scale
                         for p, t in out[name].items()}
        else:  # (a rule may have run on parameters that require grad: no graph attached)
            out[name] = {p: t.detach() for p, t in out[name].items()}
        if name == "variance":  # Σ g²/N − (Σ g/N)², in place where the sum is ours alone
            # (a tensor the scaling made is not in ``uses``)
            n = float(N_total)
            out[name] = {p: (t.div_(n) if uses.get(t.untyped_storage().data_ptr(), 1) == 1
                             else t / n).addcmul_(grad[p], grad[p], value=-1 / (c * n) ** 2)
                         for p, t in out[name].items()}
    info = {"loss": (value / c_loss).detach() if loss else None,
            "gradient": None if grad is None else {p: t / c if c != 1 else t
                                                   for p, t in grad.items()},
            "output": output, "num_samples": N_total, "num_terms": count}
    return out, info


def _cat(ts, dim):
    """``torch.cat`` into a buffer of ``_memory.empty`` (huge pages for large results)."""
    shape = list(ts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    return torch.cat(ts, dim=dim, out=_memory.empty(shape, ts[0].dtype, ts[0].device))


def quantities(model, loss_fn, data, names, *, params=None, mc_samples: int = 1, seed=None,
               progress: bool = False, kfac_approx: str = "backpack",
               process_group=None) -> dict:
    """BackPACK's per-sample and curvature quantities, every name from one engine.

    ``quantities(model, loss_fn, data, names)`` returns ``{name: {param_name: tensor}}``
    for the names of the table in this module's docstring (``grad_batch``, ``batch_l2``,
    ``sum_grad_squared``, ``variance``, ``diag_ggn_exact``, ``diag_ggn_exact_batch``,
    ``diag_ggn_mc``, ``diag_ggn_mc_batch``, ``diag_h``, ``diag_h_batch``,
    ``sqrt_ggn_exact``, ``sqrt_ggn_mc``), with BackPACK's shapes and scaling.

    Several names in one call share one forward pass and one batched backward pass: the
    gradient's cotangent, the C columns of the loss Hessian's square root and the
    ``mc_samples`` sampled columns are back-propagated together, and every name is read
    from them (the exact Hessian diagonal adds one backward pass per activation module,
    with a column per unit).

    Args:
        model: a ``torch.nn.Module`` in eval mode (dropout and batch norm in training
            mode are refused), taking the samples along dimension 0.
        loss_fn: ``nn.CrossEntropyLoss`` (with ``weight``, ``label_smoothing``,
            ``ignore_index``), ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (with ``weight``,
            ``pos_weight``), reduction ``'mean'`` or ``'sum'``.
        data: one batch ``(X, y)`` or an iterable of batches (a DataLoader): summed names
            accumulate to the whole data set's value (a mean divides by the total number
            of terms), per-sample names concatenate along the sample dimension.
        names: a list of names (or one name).
        params: a dict name → tensor, a subset of ``model.named_parameters()``; None
            for every parameter that requires grad.
        mc_samples: S, the labels drawn per sample for the ``_mc`` names.
        seed: seed of those draws (reproducible bit for bit); None uses torch's global
            generator.
        progress: a tqdm progress bar over the batches.
        kfac_approx: the convention of the Kronecker names for weights shared over
            positions (sequences, convolutions): ``"backpack"`` (BackPACK's), ``"expand"``
            or ``"reduce"`` (see ``linops.curvature.kfac``).
        process_group: a ``torch.distributed`` process group over whose ranks the data is
            sharded (see ``linops.curvature.CurvatureOperator``): summed names and Kronecker
            factors are those of the union of the shards (one all-reduce after the pass);
            per-sample names stay on their rank; rank r draws with ``seed + r·2³²``. Not
            with the block products.

    The Kronecker names ``kfac`` (``mc_samples`` sampled columns), ``kflr`` (exact) and
    ``kfra`` (KFRA, MLP chains only) give BackPACK's factors: ``[G, A]`` for a weight
    (``G ⊗ A`` approximates its block; G is out × out, A in × in), ``[G]`` for a bias, for
    ``nn.Linear`` and ``nn.Conv1d``/``2d``/``3d`` (groups = 1); they take a pass of their own.
    The block products ``hmp``, ``ggnmp``, ``pchmp_abs``, ``pchmp_clip`` give, per
    parameter, a callable ``V (V, *p.shape) → (V, *p.shape)`` multiplying with that
    parameter's block of the Hessian, the GGN or the positive-curvature Hessian (see
    ``linops.curvature.BlockDiagCurvature``).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), ``mc_samples <
            1``, a loss with ``reduction='none'``, a model in training mode; MemoryError:
            per-sample names that would take more than half the device's memory.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from linops.curvature import quantities
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> X, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
        >>> q = quantities(model, nn.CrossEntropyLoss(), (X, y), ["grad_batch", "diag_ggn_mc"])
        >>> q["grad_batch"]["1.weight"].shape, q["diag_ggn_mc"]["1.bias"].shape
        (torch.Size([5, 3, 12]), torch.Size([3]))
    """
    names = _check_names(names)
    group = resolve_group(process_group)
    model = unwrap_ddp(model, group)
    if group is not None and any(n in BLOCK_PRODUCTS for n in names):
        raise ValueError(f"The block products {list(BLOCK_PRODUCTS)} do not take a "
                         "process_group yet; use linops.curvature.BlockDiagCurvature on one "
                         "process, or GGN/Hessian(process_group=...) for the full matrix.")
    out = {}
    kron = [n for n in names if n in KRONECKER]
    if kron:
        from .kfac import kfac_factors

        for n in kron:
            out[n] = kfac_factors(model, loss_fn, data, fisher="mc" if n == "kfac" else "exact",
                                  kfra=n == "kfra", mc_samples=mc_samples, seed=seed,
                                  kfac_approx=kfac_approx, params=params,
                                  process_group=group)
    for n in (n for n in names if n in BLOCK_PRODUCTS):
        from .blocks import block_product_callables

        out[n] = block_product_callables(model, loss_fn, data, n, params=params,
                                         progress=progress)
    rest = [n for n in names if n not in KRONECKER + BLOCK_PRODUCTS]
    if rest:
        seed = seed if seed is None else rank_seed(seed, group)
        engine = Engine(model, loss_fn, params, mc_samples=mc_samples, seed=seed)
        sums, guard = group_sums(group, engine, "quantities")
        with guard:
            out.update(run(engine, data, rest, progress, sums=sums, loss=False)[0])
    return {n: out[n] for n in names}
