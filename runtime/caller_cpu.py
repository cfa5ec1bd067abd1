"""The CPU a CPU artifact's calling thread runs its share of every parallel kernel on.

TVM's thread pool (TVM 0.27, src/runtime/threading_backend.cc) orders the CPUs by cpuinfo_max_freq,
highest first, then by number; it pins worker i to the (i+1)-th CPU of that order and runs the first task
of every parallel kernel on the calling thread, which it leaves free to move, counting on the OS to put it
on the first CPU. The OS does not always: on 2 vCPUs, in a process that had also run torch and ONNX
Runtime, the caller shared the worker's CPU for the whole process now and then, and the artifact ran at
half speed (AMD EPYC Zen 4, 2 vCPUs: a conv3x3+BN+ReLU artifact on 1,64,56 took 1.23-1.28 ms instead of
0.61-0.70 in 2 of 3 processes; held on the first CPU during each call, 0.63-0.70 ms in 3 of 3).

So for the duration of a call the caller is held on that CPU, and its own affinity is restored after
(TVM's pool, when it starts at the first parallel kernel of the process, gives the caller every CPU
again: the first call is held up to there).
A thread the user pinned, or a pool that pins nothing (one thread, TVM_BIND_THREADS=0, more threads than
CPUs, TVM_EXCLUDE_WORKER0=0 where the caller runs no task), is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

_CPUFREQ = "/sys/devices/system/cpu/cpu{}/cpufreq/cpuinfo_max_freq"


def _max_frequency(cpu: int) -> int:
    """As TVM reads it: 0 where the file is absent (a VM), -1 where it does not hold a number."""
    path = Path(_CPUFREQ.format(cpu))
    if not path.exists():
        return 0
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return 0  # TVM reads it with atoi


def caller_cpu() -> int | None:
    """The CPU TVM's pool leaves to the calling thread, or None where the pool pins no worker."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = os.cpu_count() or 1
    threads = _env_int("TVM_NUM_THREADS", 0)
    if threads < 2 or threads > cpus or _env_int("TVM_BIND_THREADS", 1) != 1 or _env_int("TVM_EXCLUDE_WORKER0", 1) == 0:
        return None
    first = min(range(cpus), key=lambda cpu: (-_max_frequency(cpu), cpu))
    return first if first in os.sched_getaffinity(0) else None


def _current_cpu_reader():
    """libc's sched_getcpu (a vDSO read, well under a microsecond through ctypes), or None."""
    try:
        import ctypes

        function = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = []
    return function


_current_cpu = _current_cpu_reader()


def hold(cpu: int) -> set[int] | None:
    """Hold the calling thread on `cpu` unless it runs there already; returns the affinity to give back
    (None: nothing changed, also for a thread its owner pinned to one CPU). Changing the affinity costs
    about 6 us a call, so a thread already on the CPU is not pinned."""
    if _current_cpu is not None and _current_cpu() == cpu:
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    os.sched_setaffinity(0, (cpu,))
    return allowed


def release(saved: set[int] | None) -> None:
    if saved is not None:
        os.sched_setaffinity(0, saved)
