"""What machine a figure was measured on, and its memory bandwidth (measured, not looked up).

Every benchmark and profile names the CPU next to its numbers: the same kind of machine is not always
the same CPU (one day an AVX-512 Xeon, another an AVX2-only EPYC), and a ratio means little without it.
"""

from __future__ import annotations

import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bndeploy.timing import interleaved_medians_ms

VECTOR_FLAGS = ("avx512f", "avx2", "fma", "amx_tile", "asimd", "neon", "sve")


def cpu_description() -> str:
    """e.g. "AMD EPYC 9R14 (avx2 avx512f fma), 2 CPUs" from /proc/cpuinfo, else the platform's name."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags)
    return f"{model} ({vector or 'no vector flags listed'}), {usable_cpus()} CPUs"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parallel_copier(dst: np.ndarray, src: np.ndarray, threads: int):
    """A callable copying src to dst on `threads` threads (np.copyto releases the GIL): the memory
    bound must use every core the measured runtimes use, or a 2-thread kernel beats its own "bound"."""
    pool = ThreadPoolExecutor(max_workers=threads)
    pieces = list(zip(np.array_split(dst.reshape(-1), threads), np.array_split(src.reshape(-1), threads)))
    return lambda: list(pool.map(lambda pair: np.copyto(*pair), pieces))


def measure_bandwidth(nbytes: int = 64 << 20, rounds: int = 5, threads: int | None = None) -> float:
    """GB/s of a parallel copy (read + write) of `nbytes`: the bound for memory-bound kernels."""
    threads = threads or usable_cpus()
    src = np.ones(nbytes // 4, np.float32)
    ms = interleaved_medians_ms({"copy": parallel_copier(np.empty_like(src), src, threads)}, rounds, 3)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9
