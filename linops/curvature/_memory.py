"""Large output buffers backed by transparent huge pages (Linux, CPU).

Per-sample quantities are large (``grad_batch`` of the reference CNN: N · P = 55 M floats,
220 MB) and written once. glibc serves such allocations with a fresh ``mmap`` every time,
so writing them costs a page fault per 4 KiB page: on the reference CNN the outer products
of ``grad_batch`` spent 90 % of their time in page faults. Advising the kernel to back the
buffer with 2 MiB pages (``madvise(MADV_HUGEPAGE)``, honoured when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``) cuts that
cost about sevenfold. Only our own result buffers are advised; the process's other
allocations and PyTorch's settings are untouched. Elsewhere (CUDA, other systems, THP
off) ``empty`` is ``torch.empty``; ``LINOPS_HUGE_PAGES=0`` in the environment turns the
advice off (where the kernel's compaction on a fragmented memory costs more than the page
faults it saves: the first large buffers of a process can take longer).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

import torch

__all__ = ["empty"]

_PAGE = 2 << 20  # a transparent huge page
# glibc's mmap threshold grows to at most 32 MiB: smaller buffers come from a heap that
# reuses freed memory (no faults), larger ones are a fresh mapping every time
_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14


def _madvise():
    if not sys.platform.startswith("linux") or os.environ.get("LINOPS_HUGE_PAGES") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        if "[never]" in mode:
            return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_ADVISE = _madvise()


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(shape)``, on huge pages where that helps (see the module docstring)."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    device = torch.device(device)
    if _ADVISE is None or device.type != "cpu" or nbytes < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
    ptr = buf.data_ptr()
    off = (-ptr) % _PAGE
    _ADVISE(ptr + off, (nbytes // _PAGE) * _PAGE, _MADV_HUGEPAGE)  # advice: failure is harmless
    return buf[off:off + nbytes].view(dtype).view(shape)
