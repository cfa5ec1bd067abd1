"""Latency measurement shared by the pipeline and the benchmark: interleaved rounds, medians.

Runtimes keep their worker threads spinning after a call (TVM's pool for ~100 ms, ONNX Runtime's for
~50 ms, measured here by the process's CPU time while idle). On a machine with few cores that spin steals
the next runtime's cores, so a plain back-to-back interleave makes whichever runs second look slow.
Each runtime's turn therefore starts after a pause that outlasts the spinning, plus one untimed call.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

# Longer than the longest post-call spin measured here (TVM's thread pool: ~0.1 s).
SPIN_PAUSE_S = 0.2
# A timed sample repeats the call until it lasts about this long: the first calls after a pause run slower
# (a 0.1 ms artifact's first call took 0.47 ms here, its third 0.11), so short samples read the slow start.
SAMPLE_S = 0.05
MOST_CALLS_PER_SAMPLE = 200


def calls_per_sample(call: Callable[[], object], seconds: float = SAMPLE_S) -> int:
    """How many calls of ``call`` (timed once here) fill a sample of about ``seconds``."""
    start = time.perf_counter()
    call()
    took = time.perf_counter() - start
    return max(1, min(MOST_CALLS_PER_SAMPLE, int(seconds / max(took, 1e-6))))


def interleaved_medians_ms(candidates: dict[str, Callable[[], object]], rounds: int = 7, calls: int = 3,
                           pause_s: float = SPIN_PAUSE_S) -> dict[str, float]:
    """Median per-call wall time in ms of each callable; each round times ``calls`` calls of each in turn."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            time.sleep(pause_s)
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
