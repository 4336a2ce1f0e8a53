"""How busy the machine is with other programs (Linux ``/proc/stat``), for the driver.

Tiny parallel CPU kernels lose whole scheduler time slices when another program takes a core
their threads need: a 2 ms gradient then takes 100 ms. The driver starts each process on a
quiet machine when it can (``wait_for_quiet``) and measures the load of other programs while
the process runs (``LoadMeter``), so disturbed measurements can be left out.
"""

import os
import time


def background_cores(interval: float = 0.5) -> float | None:
    """CPU cores busy over ``interval`` seconds while this process sleeps (Linux only)."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except OSError:
        return None
    if total1 == total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


class LoadMeter:
    """Cores busy with *other* programs while a block runs: /proc/stat minus our own CPU.

    Our own CPU time is this process's plus its finished children's (``getrusage``), so a
    peer subprocess counts as ours. Linux only; ``cores`` is None elsewhere.
    """

    def __enter__(self):
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        self.cores = None
        if self._start is not None and end is not None:
            (t0, busy0, own0), (t1, busy1, own1) = self._start, end
            if t1 > t0:
                self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        return False

    @staticmethod
    def _sample():
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - fields[4]) / hz
        own = sum(getattr(resource.getrusage(who), attr)
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for attr in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, own


def wait_for_quiet(limit: float, max_wait: float) -> float | None:
    """Wait until fewer than ``limit`` cores are busy elsewhere, at most ``max_wait`` s.

    Tiny parallel CPU kernels lose whole scheduler time slices when another process takes a
    core their threads need, which turns a 2 ms gradient into 100 ms; every process of a
    round therefore starts on a quiet machine when it can. Returns the last load seen.
    """
    deadline = time.monotonic() + max_wait
    load = background_cores()
    while load is not None and load > limit and time.monotonic() < deadline:
        time.sleep(2.0)
        load = background_cores()
    return load
