"""Compare one output with one reference output, element by element (shared by every stage: `bndeploy
check` compares artifacts with it, export validation compares ONNX Runtime with torch).

Rules (all computed in float64, whatever the dtypes):
- finite pair: passes when ``|a - b| <= atol + rtol * |b|`` (b = reference);
- NaN passes only against NaN at the same position; Inf only against Inf of the same sign;
- max abs error is over finite pairs (non-finite mismatches are counted and located separately);
- max rel error is ``|a - b| / |b|`` over finite pairs with b != 0 (where b == 0 only atol applies).
Besides the verdict a Comparison keeps what a person needs to find the cause: the worst element
(index and both values), where NaN/Inf disagree, an error histogram and the max error per channel.

Error statistics (ErrorStats) and the gate (Gate), like Polygraphy's ``--check-error-stat``:
- every statistic is over the finite pairs only (positions where both values are finite); a NaN that
  meets a NaN or an Inf that meets the same Inf agrees and carries no error figure, any other non-finite
  position is a mismatch counted above, and it fails the comparison whatever the gate;
- absolute error: mean, median and the q-quantile (numpy's linear interpolation) of ``|a - b|``;
  relative error the same over the finite pairs with b != 0; cosine similarity of a and b; SNR in dB,
  ``10 log10(sum b^2 / sum (a - b)^2)`` (the reference is the signal);
- an element's margin is ``|a - b| / (atol + rtol |b|)``: its error over what the tolerance allows, so the
  element passes exactly when its margin is <= 1 (0 for an exact match, inf when nothing is allowed);
- the gate's statistic (max, mean, median or the q-quantile) of the element margins is the comparison's
  margin, and the comparison passes when it is <= 1. "max" is the element-wise rule itself (decided on the
  elements, not on the rounded quotient); "quantile" with q = 0.99 passes when about 99% of the elements
  are within tolerance. The margin is also how close a passing comparison came to failing: reports sort
  and expand by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.tolerance import Tolerance

# How many NaN/Inf mismatch positions a report lists (the count is always exact).
MAX_LISTED_POSITIONS = 10
# Histogram bins per decade of absolute error (log scale).
BINS_PER_DECADE = 2
# Errors below this are drawn in the lowest bin; fp64 comparisons of fp32 data never need less.
SMALLEST_BIN_EDGE_EXP = -12

# The statistics `--check-stat` can gate on, and the default quantile (Polygraphy's too).
CHECK_STATS = ("max", "mean", "median", "quantile")
DEFAULT_ERROR_QUANTILE = 0.99


@dataclass(frozen=True)
class Gate:
    """Which statistic of the element margins decides pass or fail (`--check-stat`, `--error-quantile`)."""

    stat: str = "max"
    quantile: float = DEFAULT_ERROR_QUANTILE

    def __post_init__(self) -> None:
        if self.stat not in CHECK_STATS:
            raise BndeployError(f"unknown check statistic {self.stat!r}; choose from {', '.join(CHECK_STATS)}")
        if not (isinstance(self.quantile, (int, float)) and 0.0 <= self.quantile <= 1.0):
            raise BndeployError(f"the error quantile must be a number from 0 to 1 (e.g. 0.99), got {self.quantile!r}")

    @property
    def label(self) -> str:
        """The statistic's short name in tables: max, mean, median, q0.99."""
        return f"q{self.quantile:g}" if self.stat == "quantile" else self.stat

    def describe(self) -> str:
        if self.stat == "max":
            return "every element within atol + rtol*|reference| (--check-stat max)"
        option = f"quantile --error-quantile {self.quantile:g}" if self.stat == "quantile" else self.stat
        return f"{self.label} of |error| / (atol + rtol*|reference|) over the elements <= 1 (--check-stat {option})"

    def to_dict(self) -> dict:
        return {"stat": self.stat, "quantile": self.quantile}


@dataclass
class ErrorStats:
    """Error statistics of one comparison over its finite pairs (see the module docstring)."""

    count: int = 0  # finite pairs the statistics are over
    quantile: float = DEFAULT_ERROR_QUANTILE
    mean_abs: float | None = None
    median_abs: float | None = None
    quantile_abs: float | None = None
    mean_rel: float | None = None  # None: no finite pair with a non-zero reference
    median_rel: float | None = None
    quantile_rel: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    margin_max: float = 0.0
    margin_mean: float = 0.0
    margin_median: float = 0.0
    margin_quantile: float = 0.0
    # the element closest to failing (highest margin), with both values
    tightest_index: tuple | None = None
    tightest_actual: float | None = None
    tightest_expected: float | None = None

    def margin(self, stat: str) -> float:
        return getattr(self, f"margin_{stat}")

    def to_dict(self) -> dict:
        figures = {
            name: json_float(getattr(self, name))
            for name in ("mean_abs", "median_abs", "quantile_abs", "mean_rel", "median_rel", "quantile_rel",
                         "cosine", "snr_db", "margin_max", "margin_mean", "margin_median", "margin_quantile")
        }
        tightest = None if self.tightest_index is None else {
            "index": list(self.tightest_index),
            "actual": json_float(self.tightest_actual),
            "expected": json_float(self.tightest_expected),
        }
        return {"count": self.count, "quantile": self.quantile, **figures, "tightest": tightest}


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
    gate: Gate = field(default_factory=Gate)
    statistics: ErrorStats = field(default_factory=ErrorStats)

    @property
    def nonfinite_mismatches(self) -> int:
        return self.nan_mismatches + self.inf_mismatches

    @property
    def margin(self) -> float:
        """The gate's statistic of the element margins (error / allowed); inf for a NaN/Inf or shape failure."""
        if self.problem is not None or self.nonfinite_mismatches:
            return math.inf
        return self.statistics.margin(self.gate.stat)

    @property
    def passed(self) -> bool:
        if self.problem is not None or self.nonfinite_mismatches:
            return False
        if self.gate.stat == "max":
            return self.mismatches == 0  # the element rule itself, not the rounded quotient
        return self.margin <= 1.0

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
        if self.gate.stat != "max" and not self.nonfinite_mismatches:
            lines.insert(0, f"{self.gate.label} of error/allowed is {self.margin:.3g} > 1 (--check-stat {self.gate.stat})")
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
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "worst": None
            if self.worst_index is None
            else {
                "index": list(self.worst_index),
                "actual": json_float(self.worst_actual),
                "expected": json_float(self.worst_expected),
            },
            "nan_mismatches": self.nan_mismatches,
            "inf_mismatches": self.inf_mismatches,
            "nonfinite_positions": [list(p) for p in self.nonfinite_positions],
            "channel_axis": self.channel_axis,
            "channel_max_abs_error": [json_float(v) for v in self.channel_max_abs_error],
            "channel_mismatches": self.channel_mismatches,
            "histogram": self.histogram,
            "gate": self.gate.to_dict(),
            "margin": json_float(self.margin),
            "statistics": self.statistics.to_dict(),
        }


def compare(
    actual: np.ndarray,
    expected: np.ndarray,
    tolerance: Tolerance,
    output: str,
    reference: str,
    reference_key: str,
    gate: Gate = Gate(),
) -> Comparison:
    actual, expected = np.asarray(actual), np.asarray(expected)
    result = Comparison(output, reference, reference_key, tolerance, tuple(actual.shape), str(actual.dtype), gate=gate)
    result.statistics.quantile = gate.quantile
    if actual.shape != expected.shape:
        result.problem = f"shape {list(actual.shape)} differs from the reference's {list(expected.shape)} ({reference_key})"
        return result
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):  # inf - inf and 0 * inf at non-finite positions, masked out right here
        abs_error = np.where(finite, np.abs(a - b), 0.0)
        within = np.where(finite, abs_error <= tolerance.atol + tolerance.rtol * np.abs(b), _nonfinite_agree(a, b))
    outside = ~within

    result.total = int(a.size)
    result.mismatches = int(outside.sum())
    _fill_errors(result, a, b, abs_error, finite)
    _fill_nonfinite(result, a, b, outside)
    _fill_channels(result, abs_error, outside, finite)
    result.histogram = error_histogram(abs_error[finite], include=tolerance.atol)
    result.statistics = error_statistics(a, b, tolerance, gate.quantile)
    return result


def element_margins(abs_error: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """|a - b| / (atol + rtol |b|) per element (finite pairs): 0 for an exact match, inf when nothing is allowed."""
    allowed = tolerance.atol + tolerance.rtol * np.abs(expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        margins = abs_error / allowed
    return np.where(abs_error == 0, 0.0, margins)


def error_statistics(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance,
                     quantile: float = DEFAULT_ERROR_QUANTILE) -> ErrorStats:
    """ErrorStats over the finite pairs of two same-shape arrays (computed in float64)."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    stats = ErrorStats(count=int(finite.sum()), quantile=quantile)
    if not stats.count:
        return stats
    a, b = a[finite], b[finite]
    abs_error = np.abs(a - b)
    stats.mean_abs, stats.median_abs, stats.quantile_abs = _mean_median_quantile(abs_error, quantile)
    nonzero = b != 0
    if nonzero.any():
        stats.mean_rel, stats.median_rel, stats.quantile_rel = _mean_median_quantile(
            abs_error[nonzero] / np.abs(b[nonzero]), quantile)
    stats.cosine = cosine_similarity(a, b)
    stats.snr_db = snr_db(a, b)
    margins = element_margins(abs_error, b, tolerance)
    stats.margin_mean, stats.margin_median, stats.margin_quantile = _mean_median_quantile(margins, quantile)
    tightest = int(np.argmax(margins))
    stats.margin_max = float(margins[tightest])
    position = np.unravel_index(int(np.flatnonzero(finite.ravel())[tightest]), finite.shape)
    stats.tightest_index = tuple(int(i) for i in position)
    stats.tightest_actual, stats.tightest_expected = float(a[tightest]), float(b[tightest])
    return stats


def _mean_median_quantile(values: np.ndarray, quantile: float) -> tuple[float, float, float]:
    with np.errstate(invalid="ignore"):
        median, at_quantile = np.quantile(values, [0.5, quantile])
    # Interpolating between two infinite margins gives NaN (inf - inf); the quantile is then inf.
    return tuple(math.inf if math.isnan(v) else float(v) for v in (np.mean(values), median, at_quantile))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """a.b / (|a| |b|); 1 when both are all zero (identical), 0 when only one is."""
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0 or norm_b == 0:
        return 1.0 if norm_a == norm_b else 0.0
    return float(np.clip(np.dot(a.ravel(), b.ravel()) / (norm_a * norm_b), -1.0, 1.0))  # rounding can pass 1


def snr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Signal (the reference b) to noise (a - b) in dB: inf for an exact match, -inf for noise on a zero signal."""
    signal, noise = float(np.sum(b * b)), float(np.sum((a - b) ** 2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


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


def json_float(value: float | None):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _short_list(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
