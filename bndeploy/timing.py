"""Latency measurement shared by the pipeline and the benchmark: interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians_ms(candidates: dict[str, Callable[[], object]], rounds: int = 20,
                           warmup: int = 2) -> dict[str, float]:
    """Median wall time in ms of each callable, measured round-robin so drift hits all of them alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
