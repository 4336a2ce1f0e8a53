"""How a curvature operator differentiates a model: the route, and the kernels it switches.

PyTorch runs some modules through fused kernels that have no forward-mode rule or no
double backward: the multi-head-attention fast path (``nn.MultiheadAttention`` and the
``nn.Transformer*`` layers without grad), the flash, memory-efficient and cuDNN kernels
of ``F.scaled_dot_product_attention``, oneDNN's LSTM on CPU and cuDNN's RNNs on a GPU.
Curvature products need one of the two, so during the operator's own forward passes
(``reference_kernels``) those kernels are switched to their differentiable reference
implementation (the math attention kernel, the native RNN), and the user's settings are
restored as the pass ends, also when it raises. Nothing changes outside our passes.

Which switches a model needs is read from its modules when the operator is built, and
checked on the graph of its first forward pass (a functional ``scaled_dot_product_attention``
call shows there as a fused kernel's backward node): where that finds a fused kernel the
batch is evaluated again with the switches on.

``Route`` records the choice (``op.info``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "Route",
    "KernelSwitch",
    "kernels_for",
    "fused_kernels_in_graph",
    "select_output",
    "describe_module_failure",
    "canonical_route",
]

ATTENTION = "attention: multi-head-attention fast path off, math scaled_dot_product_attention"
RNN_CPU = "RNN: oneDNN (mkldnn) kernels off, native RNN"
RNN_CUDA = "RNN: cuDNN off, native RNN"

_ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                      nn.TransformerDecoderLayer, nn.TransformerEncoder,
                      nn.TransformerDecoder, nn.Transformer)
# names of autograd nodes of fused kernels without a double backward or forward-mode rule
_FUSED_ATTENTION_NODES = ("ScaledDotProductFlashAttention", "ScaledDotProductEfficientAttention",
                          "ScaledDotProductCudnnAttention", "FlashAttention",
                          "EfficientAttention", "ScaledDotProductFusedAttention")
_FUSED_RNN_NODES = ("CudnnRnn", "MkldnnRnn", "MiopenRnn")


@dataclasses.dataclass(frozen=True)
class Route:
    """How an operator multiplies: which path and which derivative rules, which kernels it
    switches during its own passes (``op.info``).

    Attributes:
        path: ``"mlp"`` (hand-written products on raw tensors), ``"chain"`` (the same
            for a convolutional chain, ``_chain.py``) or ``"autograd"``.
        products: for the GGN family how ``J v`` is computed (``"forward mode"``,
            ``"double backward"``, ``"linearize"``), for the Hessian how ``H v`` is
            (``"reverse-over-reverse"``, ``"forward-over-reverse"``); ``"not chosen yet"``
            until the first product decides between the routes of ``"auto"``.
        requested: the ``route=`` the operator was built with (``"auto"`` picks).
        kernels: the switches applied during the operator's passes (empty: none).
        columns: the route of products with several columns where it differs from
            ``products`` (attention models: ``"forward mode"``, one vmapped pass), once
            one ran; None otherwise.
    """

    path: str
    products: str
    requested: str
    kernels: tuple[str, ...] = ()
    columns: str | None = None

    def __str__(self) -> str:
        if self.path == "mlp":
            return "MLP fast path: hand-written products on raw tensors (no autograd)"
        if self.path == "chain":
            return ("convolutional chain fast path: hand-written products through "
                    "convolutions, pooling and Linear layers on raw tensors (no autograd)")
        kern = ("; during its passes: " + "; ".join(self.kernels) +
                " (the user's settings restored after each pass)") if self.kernels else ""
        cols = f"; blocks of columns: {self.columns}" if self.columns else ""
        return f"autograd, {self.products} (route={self.requested!r}){cols}{kern}"


class KernelSwitch:
    """The reference-kernel switches of one operator: a re-entrant context manager that
    applies them (and nothing when there are none) and restores the previous settings."""

    def __init__(self, switches: tuple[str, ...] = ()):
        self.switches = tuple(switches)

    def add(self, switches) -> bool:
        """Add switches; True if any is new."""
        new = tuple(s for s in switches if s not in self.switches)
        self.switches = self.switches + new
        return bool(new)

    @contextlib.contextmanager
    def __call__(self):
        if not self.switches:
            yield
            return
        with contextlib.ExitStack() as stack:
            if ATTENTION in self.switches:
                stack.enter_context(_mha_fastpath_off())
                stack.enter_context(_math_sdpa())
            if RNN_CPU in self.switches:
                stack.enter_context(_flag(torch._C._get_mkldnn_enabled,
                                          torch._C._set_mkldnn_enabled))
            if RNN_CUDA in self.switches:
                stack.enter_context(_flag(torch._C._get_cudnn_enabled,
                                          torch._C._set_cudnn_enabled))
            yield


@contextlib.contextmanager
def _flag(get, set_, value=False):
    old = get()
    set_(value)
    try:
        yield
    finally:
        set_(old)


@contextlib.contextmanager
def _mha_fastpath_off():
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):  # torch < 2.1
        yield
        return
    with _flag(mha.get_fastpath_enabled, mha.set_fastpath_enabled):
        yield


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                              enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)


def kernels_for(model: nn.Module, device: torch.device, when: bool | None) -> tuple[str, ...]:
    """The switches a model needs, read from its modules (``when``: None detects, True
    switches every kernel that may be fused on this device, False none)."""
    if when is False:
        return ()
    rnn = RNN_CUDA if torch.device(device).type == "cuda" else RNN_CPU
    if when is True:
        return (ATTENTION, rnn)
    out = []
    mods = list(model.modules())
    if any(isinstance(m, _ATTENTION_MODULES) for m in mods):
        out.append(ATTENTION)
    if any(isinstance(m, nn.RNNBase) for m in mods):
        out.append(rnn)
    return tuple(out)


def fused_kernels_in_graph(out: torch.Tensor, device) -> tuple[str, ...]:
    """The switches that the graph of ``out`` shows are needed: the backward nodes of fused
    attention or RNN kernels (one walk over the graph)."""
    if out.grad_fn is None:
        return ()
    found = set()
    seen = set()
    stack = [out.grad_fn]
    rnn = RNN_CUDA if torch.device(device).type == "cuda" else RNN_CPU
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        name = node.name()
        if any(k in name for k in _FUSED_ATTENTION_NODES):
            found.add(ATTENTION)
        elif any(k in name for k in _FUSED_RNN_NODES):
            found.add(rnn)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return tuple(sorted(found))


def select_output(out, output_fn: Callable | None, model: nn.Module):
    """The model's output tensor: ``output_fn(out)`` if given; a clear error for a tuple,
    list or dict without one."""
    if output_fn is not None:
        out = output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"output_fn returned a {type(out).__name__}; it must return the one tensor "
                "the loss takes (the logits)."
            )
        return out
    if isinstance(out, torch.Tensor):
        return out
    name = type(model).__name__
    if isinstance(out, Mapping):
        keys = list(out.keys())
        key = next((k for k in keys if k in ("logits", "output", "out")), keys[0] if keys
                   else "logits")
        raise TypeError(
            f"The model ({name}) returned a {type(out).__name__} with keys {keys[:8]}; the "
            f"curvature operators need the one output tensor the loss takes. Pass "
            f"output_fn=lambda out: out[{key!r}] (or wrap the model in a module that "
            "returns it)."
        )
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(type(o).__name__ for o in out[:6])
        raise TypeError(
            f"The model ({name}) returned a {type(out).__name__} of {len(out)} ({kinds}); the "
            "curvature operators need the one output tensor the loss takes. Pass "
            "output_fn=lambda out: out[0] (the index of the logits), or wrap the model in a "
            "module that returns it."
        )
    raise TypeError(
        f"The model ({name}) returned a {type(out).__name__}; the curvature operators need "
        "one output tensor (pass output_fn= to select it)."
    )


def canonical_route(route, choices, owner: str) -> str:
    """``route`` as one of ``choices`` (spaces, hyphens and underscores alike)."""
    def norm(r):
        return r.lower().replace("_", " ").replace("-", " ").strip()

    if isinstance(route, str):
        for c in choices:
            if norm(c) == norm(route) or norm(c).split()[0] == norm(route):
                return c
    raise ValueError(f"{owner}: route must be one of {', '.join(map(repr, choices))}; got "
                     f"{route!r}.")


# ------------------------------------------------------------------ naming the culprit
def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _differentiable_twice(module: nn.Module, args, kwargs, order: int) -> bool:
    """Whether ``module`` alone, called on copies of ``args``, supports forward mode or
    a double backward (``order=2``: the second derivative; ``order=1`` first-order
    ``J v``)."""
    import torch.autograd.forward_ad as fwAD

    from ..autodiff._linearization import _twice_differentiable

    def detach(obj, grad):
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            return t.requires_grad_(grad) if grad and t.is_floating_point() else t
        if isinstance(obj, (tuple, list)):
            return type(obj)(detach(o, grad) for o in obj)
        return obj

    # reverse over reverse
    try:
        with torch.enable_grad():
            a = detach(args, True)
            kw = {k: detach(v, True) for k, v in kwargs.items()}
            outs = [o for o in _tensors(module(*a, **kw)) if o.requires_grad]
            ins = [t for t in _tensors(a) + _tensors(kw) if t.requires_grad] + [
                p for p in module.parameters() if p.requires_grad]
            if not outs or not ins:
                return True
            ws = [torch.randn_like(o, requires_grad=True) for o in outs]
            g = torch.autograd.grad(outs, ins, ws, create_graph=True, allow_unused=True)
            g = [x for x in g if x is not None and x.requires_grad]
            if g and _twice_differentiable(g):
                torch.autograd.grad(g, ws if order == 1 else ins,
                                    [torch.randn_like(x) for x in g], allow_unused=True)
                return True
    except (RuntimeError, NotImplementedError):
        pass
    # forward mode (for J v; for a Hessian forward over reverse)
    try:
        with fwAD.dual_level(), torch.enable_grad():
            a = detach(args, order == 2)

            def dual(obj):
                if isinstance(obj, torch.Tensor) and obj.is_floating_point():
                    return fwAD.make_dual(obj, torch.randn_like(obj))
                if isinstance(obj, (tuple, list)):
                    return type(obj)(dual(o) for o in obj)
                return obj

            outs = _tensors(module(*dual(a), **{k: dual(v) for k, v in kwargs.items()}))
            if order == 2:
                ins = [t for t in _tensors(a) if t.requires_grad]
                outs = [o for o in outs if o.requires_grad]
                if outs and ins:
                    torch.autograd.grad(outs, ins, [torch.ones_like(o) for o in outs],
                                        allow_unused=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def describe_module_failure(model: nn.Module, run: Callable[[], object], order: int) -> str:
    """Find the innermost module of ``model`` that supports neither forward mode nor a
    double backward (``run()`` evaluates the model once, under our kernel switches); a
    phrase naming it, or '' if no single module is to blame."""
    calls: dict[nn.Module, tuple] = {}
    names = {m: (n or type(model).__name__) for n, m in model.named_modules()}
    handles = []

    def pre(module, args, kwargs):
        calls.setdefault(module, (args, kwargs))

    for m in names:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - diagnosis only; the caller raises the real error
        pass
    finally:
        for h in handles:
            h.remove()
    failing = []
    for m, (args, kwargs) in calls.items():
        try:
            ok = _differentiable_twice(m, args, kwargs, order)
        except Exception:  # noqa: BLE001 - a module we cannot call alone: no verdict
            ok = True
        if not ok:
            failing.append(m)
    # innermost: a failing module none of whose submodules fails
    inner = [m for m in failing if not any(c in failing for c in m.modules() if c is not m)]
    if not inner:
        return ""
    m = inner[0]
    return f"module {names[m]!r} ({type(m).__name__})"
