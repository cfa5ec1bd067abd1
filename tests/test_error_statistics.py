"""Error statistics and the gate (bndeploy.compare): each statistic against a short numpy formula on random
arrays, and pass/fail flipping exactly where the chosen statistic crosses the tolerance (no TVM needed)."""

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bndeploy.cli import main
from bndeploy.compare import CHECK_STATS, Gate, compare
from bndeploy.errors import BndeployError
from bndeploy.runtime import Report, Tolerance

QUANTILES = st.sampled_from([0.5, 0.9, 0.99, 1.0])
TOLERANCES = st.builds(Tolerance, atol=st.sampled_from([0.0, 1e-6, 1e-4, 0.1]), rtol=st.sampled_from([0.0, 1e-4, 1e-2]))


def arrays(seed: int, size: int, zeros: bool) -> tuple[np.ndarray, np.ndarray]:
    """A float32 reference with a spread of magnitudes (and some exact zeros) and an artifact near it."""
    rng = np.random.default_rng(seed)
    expected = (rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 3, size)).astype(np.float32)
    if zeros:
        expected[rng.random(size) < 0.2] = 0
    actual = (expected + rng.standard_normal(size) * 1e-4 * (1 + np.abs(expected))).astype(np.float32)
    exact, far = rng.random(size) < 0.1, rng.random(size) < 0.05
    actual[exact] = expected[exact]
    actual[far] += 1.0
    return actual, expected


def reference_statistics(actual, expected, tolerance: Tolerance, q: float) -> dict:
    """The definitions, written once more in plain numpy."""
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = np.abs(a - b)
    rel = d[b != 0] / np.abs(b[b != 0])
    allowed = tolerance.atol + tolerance.rtol * np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.where(d == 0, 0.0, d / allowed)
        margin_quantile = np.quantile(margin, q)  # NaN where it interpolates between two infinities
    return {
        "mean_abs": d.mean(), "median_abs": np.median(d), "quantile_abs": np.quantile(d, q),
        "mean_rel": rel.mean(), "median_rel": np.median(rel), "quantile_rel": np.quantile(rel, q),
        "cosine": np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b)),
        "snr_db": 10 * math.log10(np.sum(b * b) / np.sum(d * d)),
        "margin_max": margin.max(), "margin_mean": margin.mean(), "margin_median": np.median(margin),
        "margin_quantile": margin_quantile, "count": keep.sum(),
    }


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 300), zeros=st.booleans(), tolerance=TOLERANCES, q=QUANTILES)
def test_statistics_match_the_numpy_formulas(seed, size, zeros, tolerance, q):
    actual, expected = arrays(seed, size, zeros)
    stats = compare(actual, expected, tolerance, "y", "torch", "torch/y", Gate("quantile", q)).statistics
    want = reference_statistics(actual, expected, tolerance, q)
    assert stats.count == want.pop("count") == size
    for name, value in want.items():
        got = getattr(stats, name)
        if math.isinf(value) or math.isnan(value):  # margins with nothing allowed; interpolated inf - inf
            assert got == math.inf, name
        else:
            assert got == pytest.approx(value, rel=1e-9, abs=1e-300), name


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(5, 200), stat=st.sampled_from(CHECK_STATS), q=QUANTILES,
       tolerance=st.builds(Tolerance, atol=st.sampled_from([1e-6, 1e-4, 0.1]), rtol=st.sampled_from([0.0, 1e-3])))
def test_gate_flips_where_the_chosen_statistic_crosses_the_tolerance(seed, size, stat, q, tolerance):
    """Every element margin scales with the error, so each statistic does: the error scaled to put the
    statistic at 0.9 passes, at 1.1 fails, and the report's margin is that statistic."""
    rng = np.random.default_rng(seed)
    expected = rng.standard_normal(size) * 10.0 ** rng.uniform(-2, 2, size)
    error = rng.standard_normal(size) * (tolerance.atol + tolerance.rtol * np.abs(expected))
    gate = Gate(stat, q)
    unit = compare(expected + error, expected, tolerance, "y", "torch", "torch/y", gate).margin
    if unit == 0:  # the statistic picked exact elements only (e.g. a median of mostly zero errors)
        return
    for target, passes in ((0.9, True), (1.1, False)):
        result = compare(expected + error * (target / unit), expected, tolerance, "y", "torch", "torch/y", gate)
        assert result.margin == pytest.approx(target, rel=1e-6)
        assert result.passed is passes, (stat, target, result.margin)
        assert result.details() == "" if passes else result.details()


def test_the_gate_chooses_what_fails():
    """One element far off in a thousand: max fails, median passes; q0.99 passes with 1 bad in 1000 and
    fails with 20; mean sees the outlier's size."""
    tolerance = Tolerance(1e-3, 0.0)
    expected = np.zeros(1000)
    actual = np.full(1000, 1e-4)
    actual[7] = 0.05  # 50x what is allowed
    def verdict(stat, a=actual, q=0.99):
        return compare(a, expected, tolerance, "y", "torch", "torch/y", Gate(stat, q))
    assert not verdict("max").passed and verdict("max").margin == pytest.approx(50)
    assert verdict("median").passed and verdict("median").margin == pytest.approx(0.1)
    assert verdict("quantile").passed
    assert verdict("mean").passed and verdict("mean").margin == pytest.approx((999 * 0.1 + 50) / 1000)
    many = actual.copy()
    many[:20] = 0.05
    assert not verdict("quantile", many).passed and verdict("quantile", many, q=0.97).passed
    assert not verdict("mean", many).passed  # (980*0.1 + 20*50)/1000 = 1.098
    failing = verdict("mean", many)
    assert failing.details().startswith("mean of error/allowed is 1.1 > 1 (--check-stat mean)")
    assert failing.mismatches == 20  # the element count stays what it is, whatever the gate


def test_nonfinite_positions_are_left_out_of_statistics_and_a_mismatch_fails_every_gate():
    tolerance = Tolerance(0.5, 0.0)
    expected = np.array([1.0, np.nan, np.inf, 2.0, 3.0])
    agreeing = np.array([1.25, np.nan, np.inf, 2.0, 3.0])
    for stat in CHECK_STATS:
        result = compare(agreeing, expected, tolerance, "y", "torch", "torch/y", Gate(stat))
        assert result.passed and result.statistics.count == 3
        assert result.statistics.mean_abs == pytest.approx(0.25 / 3)
        assert result.statistics.margin_max == pytest.approx(0.5)
    shifted = np.array([1.0, 1.0, np.inf, 2.0, 3.0])  # the NaN did not come out where the reference has it
    for stat in CHECK_STATS:
        result = compare(shifted, expected, tolerance, "y", "torch", "torch/y", Gate(stat))
        assert not result.passed and result.margin == math.inf and result.nan_mismatches == 1
        assert result.statistics.median_abs == 0.0  # the finite pairs are still described


def test_degenerate_statistics():
    tolerance = Tolerance(0.0, 0.0)
    exact = compare(np.zeros(4), np.zeros(4), tolerance, "y", "torch", "torch/y")
    stats = exact.statistics
    assert exact.passed and stats.cosine == 1.0 and stats.snr_db == math.inf and stats.margin_max == 0.0
    assert stats.mean_rel is None  # every reference is zero: no relative error exists
    off = compare(np.array([0.0, 1e-9, 1e-9]), np.zeros(3), tolerance, "y", "torch", "torch/y", Gate("quantile", 0.9))
    assert off.statistics.snr_db == -math.inf and off.statistics.cosine == 0.0
    assert off.statistics.margin_quantile == math.inf and not off.passed  # nothing allowed; inf, never NaN
    opposite = compare(np.array([-1.0, -2.0]), np.array([1.0, 2.0]), Tolerance(1, 0), "y", "torch", "torch/y")
    assert opposite.statistics.cosine == pytest.approx(-1.0)


def test_bad_gates_are_refused_in_one_line():
    with pytest.raises(BndeployError, match="unknown check statistic 'p99'; choose from max, mean, median, quantile"):
        Gate("p99")
    for q in (1.5, -0.1, float("nan")):
        with pytest.raises(BndeployError, match="error quantile must be a number from 0 to 1"):
            Gate("quantile", q)


def test_every_statistic_reaches_json_and_junit(tmp_path):
    tolerance = Tolerance(1e-3, 1e-3)
    result = compare(np.array([1.0, 2.0, 3.5]), np.array([1.0, 2.001, 3.0]), tolerance, "y", "torch", "torch/y",
                     Gate("quantile", 0.9))
    report = Report("/a", "cpu", "cpu", "inference", "float32", "test", ("torch",), [result], gate=Gate("quantile", 0.9))
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["gate"] == {"stat": "quantile", "quantile": 0.9}
    written = data["comparisons"][0]
    stats = result.statistics
    assert written["margin"] == pytest.approx(result.margin) and written["gate"]["stat"] == "quantile"
    for name in ("mean_abs", "median_abs", "quantile_abs", "mean_rel", "median_rel", "quantile_rel", "cosine",
                 "snr_db", "margin_max", "margin_mean", "margin_median", "margin_quantile"):
        assert written["statistics"][name] == pytest.approx(getattr(stats, name)), name
    assert written["statistics"]["tightest"] == {"index": [2], "actual": 3.5, "expected": 3.0}
    report.write_junit(tmp_path / "r.xml")
    text = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase/system-out").text
    assert f"median {stats.median_abs!r}" in text and f"cosine similarity {stats.cosine!r}" in text
    assert f"q0.9 {stats.quantile_rel!r}" in text and f"SNR {stats.snr_db!r} dB" in text


def test_cli_check_stat_chooses_the_gate(tmp_path, tmp_path_factory, capsys):
    """The runtime fixture's bad channel: 20 of 60 elements off, so max and q0.99 fail, median passes."""
    from runtime_fixtures import case

    artifact = str(case(tmp_path_factory.getbasetemp(), "bad_channel").artifact_dir)  # shared with test_runtime_check
    assert main(["check", artifact, "--check-stat", "median", "--json", str(tmp_path / "r.json")]) == 0
    assert "gate: median of |error| / (atol + rtol*|reference|)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["gate"] == {"stat": "median", "quantile": 0.99}
    assert main(["check", artifact, "--check-stat", "quantile", "--error-quantile", "0.99"]) == 1
    assert main(["check", artifact, "--check-stat", "quantile", "--error-quantile", "0.6"]) == 0
    assert main(["check", artifact]) == 1
    assert main(["check", artifact, "--check-stat", "quantile", "--error-quantile", "2"]) == 2
    assert "error quantile must be a number from 0 to 1" in capsys.readouterr().err
