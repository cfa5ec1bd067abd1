"""Compare one output with one reference output, element by element (shared by every stage: `bndeploy
check` compares artifacts with it, export validation compares ONNX Runtime with torch).

Rules (all computed in float64, whatever the dtypes):
- finite pair: passes when ``|a - b| <= atol + rtol * |b|`` (b = reference);
- NaN passes only against NaN at the same position; Inf only against Inf of the same sign;
- max abs error is over finite pairs (non-finite mismatches are counted and located separately);
- max rel error is ``|a - b| / |b|`` over finite pairs with b != 0 (where b == 0 only atol applies).
Besides the verdict a Comparison keeps what a person needs to find the cause: the worst element
(index and both values), where NaN/Inf disagree, an error histogram and the max error per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bndeploy.tolerance import Tolerance

# How many NaN/Inf mismatch positions a report lists (the count is always exact).
MAX_LISTED_POSITIONS = 10
# Histogram bins per decade of absolute error (log scale).
BINS_PER_DECADE = 2
# Errors below this are drawn in the lowest bin; fp64 comparisons of fp32 data never need less.
SMALLEST_BIN_EDGE_EXP = -12


@dataclass
class Comparison:
    output: str
    reference: str  # "torch" or "onnxruntime"
    reference_key: str  # where the expected values came from, e.g. "torch/y", "spec/bn.running_var"
    tolerance: Tolerance
    shape: tuple
    dtype: str
    total: int = 0
    mismatches: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    worst_index: tuple | None = None
    worst_actual: float | None = None
    worst_expected: float | None = None
    nan_mismatches: int = 0
    inf_mismatches: int = 0
    nonfinite_positions: list[tuple] = field(default_factory=list)
    channel_axis: int | None = None
    channel_max_abs_error: list[float] = field(default_factory=list)
    channel_mismatches: list[int] = field(default_factory=list)
    histogram: dict = field(default_factory=dict)
    problem: str | None = None  # a structural failure (shape), when no element-wise comparison was possible

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatches == 0

    @property
    def mismatch_fraction(self) -> float:
        return self.mismatches / self.total if self.total else 0.0

    @property
    def title(self) -> str:
        return f"{self.output} vs {self.reference}"

    def bad_channels(self) -> list[int]:
        return [c for c, count in enumerate(self.channel_mismatches) if count]

    def details(self) -> str:
        """Multi-line explanation of a failure (empty for a pass)."""
        if self.problem:
            return self.problem
        if self.passed:
            return ""
        lines = [
            f"{self.mismatches} of {self.total} elements ({self.mismatch_fraction:.2%}) outside "
            f"atol={self.tolerance.atol:g} rtol={self.tolerance.rtol:g} (reference {self.reference_key})"
        ]
        if self.worst_index is not None and self.max_abs_error > 0:
            lines.append(
                f"worst at {list(self.worst_index)}: artifact {self.worst_actual:.7g} vs reference "
                f"{self.worst_expected:.7g} (abs error {self.max_abs_error:.3g})"
            )
        if self.nan_mismatches or self.inf_mismatches:
            listed = ", ".join(str(list(p)) for p in self.nonfinite_positions)
            more = " ..." if self.nan_mismatches + self.inf_mismatches > len(self.nonfinite_positions) else ""
            lines.append(f"NaN mismatches: {self.nan_mismatches}, Inf mismatches: {self.inf_mismatches} at {listed}{more}")
        bad = self.bad_channels()
        if bad and len(bad) < len(self.channel_mismatches):
            lines.append(f"channels with mismatches (axis {self.channel_axis}): {_short_list(bad)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "reference": self.reference,
            "reference_key": self.reference_key,
            "passed": self.passed,
            "problem": self.problem,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "tolerance": self.tolerance.to_dict(),
            "total": self.total,
            "mismatches": self.mismatches,
            "mismatch_fraction": self.mismatch_fraction,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "worst": None
            if self.worst_index is None
            else {
                "index": list(self.worst_index),
                "actual": _json_float(self.worst_actual),
                "expected": _json_float(self.worst_expected),
            },
            "nan_mismatches": self.nan_mismatches,
            "inf_mismatches": self.inf_mismatches,
            "nonfinite_positions": [list(p) for p in self.nonfinite_positions],
            "channel_axis": self.channel_axis,
            "channel_max_abs_error": [_json_float(v) for v in self.channel_max_abs_error],
            "channel_mismatches": self.channel_mismatches,
            "histogram": self.histogram,
        }


def compare(
    actual: np.ndarray,
    expected: np.ndarray,
    tolerance: Tolerance,
    output: str,
    reference: str,
    reference_key: str,
) -> Comparison:
    actual, expected = np.asarray(actual), np.asarray(expected)
    result = Comparison(output, reference, reference_key, tolerance, tuple(actual.shape), str(actual.dtype))
    if actual.shape != expected.shape:
        result.problem = f"shape {list(actual.shape)} differs from the reference's {list(expected.shape)} ({reference_key})"
        return result
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):  # inf - inf at non-finite positions, masked out right here
        abs_error = np.where(finite, np.abs(a - b), 0.0)
    within = np.where(finite, abs_error <= tolerance.atol + tolerance.rtol * np.abs(b), _nonfinite_agree(a, b))
    outside = ~within

    result.total = int(a.size)
    result.mismatches = int(outside.sum())
    _fill_errors(result, a, b, abs_error, finite)
    _fill_nonfinite(result, a, b, outside)
    _fill_channels(result, abs_error, outside, finite)
    result.histogram = error_histogram(abs_error[finite], include=tolerance.atol)
    return result


def _nonfinite_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    return both_nan | same_inf


def _fill_errors(result: Comparison, a, b, abs_error, finite) -> None:
    if not finite.any():
        return
    flat_worst = int(np.argmax(np.where(finite, abs_error, -1.0)))
    worst = np.unravel_index(flat_worst, a.shape)
    result.worst_index = tuple(int(i) for i in worst)
    result.worst_actual = float(a[worst])
    result.worst_expected = float(b[worst])
    result.max_abs_error = float(abs_error[worst])
    has_relative = finite & (b != 0)
    if has_relative.any():
        result.max_rel_error = float(np.max(abs_error[has_relative] / np.abs(b[has_relative])))


def _fill_nonfinite(result: Comparison, a, b, outside) -> None:
    nonfinite_bad = outside & ~(np.isfinite(a) & np.isfinite(b))
    nan_bad = nonfinite_bad & (np.isnan(a) | np.isnan(b))
    result.nan_mismatches = int(nan_bad.sum())
    result.inf_mismatches = int((nonfinite_bad & ~nan_bad).sum())
    positions = np.argwhere(nonfinite_bad)[:MAX_LISTED_POSITIONS]
    result.nonfinite_positions = [tuple(int(i) for i in p) for p in positions]


def channel_axis_of(ndim: int) -> int | None:
    """Channel axis for per-channel summaries: axis 1 (NCHW...), or axis 0 for per-channel vectors."""
    if ndim >= 2:
        return 1
    return 0 if ndim == 1 else None


def _fill_channels(result: Comparison, abs_error, outside, finite) -> None:
    axis = channel_axis_of(abs_error.ndim)
    if axis is None or abs_error.size == 0:
        return
    others = tuple(i for i in range(abs_error.ndim) if i != axis)
    # A channel with a NaN/Inf mismatch has an unbounded error: show it as inf.
    per_element = np.where(outside & ~finite, np.inf, abs_error)
    result.channel_axis = axis
    result.channel_max_abs_error = [float(v) for v in np.max(per_element, axis=others)]
    result.channel_mismatches = [int(v) for v in np.sum(outside, axis=others)]


def error_histogram(abs_error: np.ndarray, include: float | None = None) -> dict:
    """Counts of absolute errors in log-scale bins (BINS_PER_DECADE per decade); exact zeros apart.
    The bins span ``include`` (the atol, so a chart can show where the tolerance lies) when it is > 0."""
    abs_error = abs_error.ravel()
    positive = abs_error[abs_error > 0]
    histogram = {"exact": int(abs_error.size - positive.size), "edges": [], "counts": []}
    span = np.concatenate([positive, [include] if include else []])
    if span.size == 0:
        return histogram
    low = max(SMALLEST_BIN_EDGE_EXP, math.floor(np.log10(span.min()) * BINS_PER_DECADE) / BINS_PER_DECADE)
    high = math.ceil(np.log10(span.max()) * BINS_PER_DECADE) / BINS_PER_DECADE
    high = max(high, low + 1 / BINS_PER_DECADE)
    exponents = np.arange(low, high + 1e-9, 1 / BINS_PER_DECADE)
    edges = 10.0 ** exponents
    counts, _ = np.histogram(np.clip(positive, edges[0], edges[-1]), bins=edges)
    histogram["edges"] = [float(e) for e in edges]
    histogram["counts"] = [int(c) for c in counts]
    return histogram


def _json_float(value: float | None):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _short_list(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
