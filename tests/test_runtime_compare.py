"""Element-wise comparison, tolerances and report formats (no TVM needed)."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from bndeploy.errors import BndeployError
from bndeploy.runtime import FP16, FP32_INFERENCE, FP32_TRAIN, Report, Tolerance, compare, default_tolerance
from bndeploy.tolerance import parse_tolerance_option, resolve_tolerances

TOL = Tolerance(atol=0.5, rtol=0.25)  # powers of two: the boundary below is exact in binary


def cmp(actual, expected, tolerance=TOL):
    return compare(np.asarray(actual), np.asarray(expected), tolerance, "y", "torch", "torch/y")


def test_boundary_is_inclusive_and_one_ulp_beyond_fails():
    # allowed = atol + rtol*|b| = 0.5 + 0.25*1 = 0.75
    assert cmp([1.75], [1.0]).passed
    assert cmp([0.25], [1.0]).passed
    assert not cmp([np.nextafter(1.75, 2.0)], [1.0]).passed
    assert not cmp([0.25 - 2.0**-50], [1.0]).passed  # |a-b| = 0.75 + 2**-50, exact in float64


def test_relative_part_scales_with_the_reference_not_the_artifact():
    # |a-b| = 3; allowed with b=8: 0.5+2 = 2.5 (fail); with b=11 (a=8): 0.5+2.75 = 3.25 (pass)
    assert not cmp([11.0], [8.0]).passed
    assert cmp([8.0], [11.0]).passed


def test_zero_tolerance_accepts_only_identical_values():
    exact = Tolerance(0.0, 0.0)
    assert cmp([1.0, -2.0], [1.0, -2.0], exact).passed
    assert not cmp([1.0], [np.nextafter(1.0, 2.0)], exact).passed


def test_report_fields_locate_the_worst_element():
    expected = np.zeros((2, 3, 2), np.float32)
    actual = expected.copy()
    actual[1, 2, 0] = 4.0
    actual[0, 1, 1] = 0.25  # within atol
    result = cmp(actual, expected)
    assert (result.total, result.mismatches) == (12, 1)
    assert result.mismatch_fraction == pytest.approx(1 / 12)
    assert result.max_abs_error == 4.0
    assert result.worst_index == (1, 2, 0)
    assert (result.worst_actual, result.worst_expected) == (4.0, 0.0)
    assert result.max_rel_error == 0.0  # every reference value is 0: relative error undefined, atol governs
    assert result.channel_axis == 1 and result.channel_mismatches == [0, 0, 1]
    assert result.channel_max_abs_error == [0.0, 0.25, 4.0]
    assert "worst at [1, 2, 0]" in result.details()


def test_max_relative_error():
    result = cmp([1.5, 10.0], [1.0, 8.0])
    assert result.max_rel_error == pytest.approx(0.5)
    assert result.max_abs_error == 2.0


def test_nan_matches_only_nan_at_the_same_position():
    nan = np.nan
    assert cmp([nan, 1.0], [nan, 1.0]).passed
    shifted = cmp([nan, 1.0], [1.0, nan])
    assert not shifted.passed
    assert shifted.nan_mismatches == 2 and shifted.nonfinite_positions == [(0,), (1,)]
    assert "NaN mismatches: 2" in shifted.details()


def test_inf_matches_only_same_sign_inf():
    inf = np.inf
    assert cmp([inf, -inf], [inf, -inf]).passed
    for actual, expected in (([inf], [-inf]), ([inf], [1e30]), ([1.0], [inf]), ([np.nan], [inf])):
        result = cmp(actual, expected)
        assert not result.passed, (actual, expected)
        assert result.nan_mismatches + result.inf_mismatches == 1


def test_nonfinite_mismatch_marks_its_channel_as_unbounded():
    expected = np.zeros((1, 2), np.float32)
    actual = np.array([[0.0, np.nan]], np.float32)
    result = cmp(actual, expected)
    assert result.channel_max_abs_error[1] == np.inf
    assert result.bad_channels() == [1]


def test_shape_mismatch_is_a_failure_not_a_crash():
    result = cmp(np.zeros((2, 3)), np.zeros((3, 2)))
    assert not result.passed and "shape [2, 3] differs" in result.problem


def test_histogram_counts_every_element_and_spans_atol():
    tolerance = Tolerance(1e-3, 0.0)
    actual = np.array([0.0, 1e-7, 2e-6, 0.5], np.float64)
    result = compare(actual, np.zeros(4), tolerance, "y", "torch", "torch/y")
    histogram = result.histogram
    assert histogram["exact"] == 1 and sum(histogram["counts"]) == 3
    assert histogram["edges"][0] <= 1e-7 and histogram["edges"][-1] >= 0.5
    assert histogram["edges"][0] <= 1e-3 <= histogram["edges"][-1]


def test_defaults_per_dtype_and_mode_are_documented():
    assert default_tolerance("float32", "inference") is FP32_INFERENCE
    assert default_tolerance("float32", "train") is FP32_TRAIN
    assert default_tolerance("float16", "inference") is FP16 and default_tolerance("float16", "train") is FP16
    for tolerance in (FP32_INFERENCE, FP32_TRAIN, FP16):
        assert len(tolerance.why) > 80
    with pytest.raises(BndeployError, match="bfloat16"):
        default_tolerance("bfloat16", "inference")


def test_per_output_override_and_unknown_name():
    tols = resolve_tolerances({"y": (1.0, 0.0)}, "float32", "train", ["y", "rm"])
    assert tols.for_output("y") == Tolerance(1.0, 0.0)
    assert tols.for_output("rm") is FP32_TRAIN
    with pytest.raises(BndeployError, match="unknown output.*'?yy'?.*outputs are: y, rm"):
        resolve_tolerances({"yy": (1.0, 0.0)}, "float32", "train", ["y", "rm"])


def test_tolerance_validation_and_cli_parsing():
    with pytest.raises(BndeployError, match="atol"):
        Tolerance(-1.0, 0.0)
    with pytest.raises(BndeployError, match="rtol"):
        Tolerance(0.0, float("nan"))
    assert parse_tolerance_option("bn.running_var_updated=1e-3,0.5") == ("bn.running_var_updated", Tolerance(1e-3, 0.5))
    for bad in ("y", "y=1e-3", "=1,2", "y=a,b"):
        with pytest.raises(BndeployError, match="--tol"):
            parse_tolerance_option(bad)


def make_report() -> Report:
    good = cmp([1.0, 2.0], [1.0, 2.0])
    bad = compare(np.array([1.0, 9.0]), np.array([1.0, 2.0]), TOL, "rv", "onnxruntime", "onnxruntime")
    return Report("/a", "cpu", "cpu", "train", "float32", "test", ("torch", "onnxruntime"), [good, bad], ["a note"])


def test_summary_table_lists_every_comparison_and_explains_failures():
    text = make_report().summary()
    assert "y       torch" in text and "rv      onnxruntime" in text
    assert "FAIL rv vs onnxruntime" in text and "worst at [1]: artifact 9 vs reference 2" in text
    assert "note: a note" in text and text.endswith("result: FAIL (1 of 2 comparisons)")


def test_json_report(tmp_path):
    make_report().write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False
    bad = data["comparisons"][1]
    assert bad["output"] == "rv" and bad["mismatches"] == 1 and bad["worst"] == {"index": [1], "actual": 9.0, "expected": 2.0}
    assert bad["tolerance"] == {"atol": 0.5, "rtol": 0.25}


def test_json_writes_nonfinite_numbers_as_strings(tmp_path):
    report = make_report()
    report.comparisons.append(cmp([np.inf], [1.0]))
    report.comparisons[-1].max_rel_error = np.inf
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON parsers reject bare Infinity
    assert data["comparisons"][-1]["max_rel_error"] == "inf"
    assert "Infinity" not in (tmp_path / "r.json").read_text()


def test_junit_structure(tmp_path):
    make_report().write_junit(tmp_path / "r.xml")
    root = ET.parse(tmp_path / "r.xml").getroot()
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["y vs torch", "rv vs onnxruntime"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert "1 of 2 elements" in failure.get("message") and "worst at [1]" in failure.text
    assert cases[1].get("classname") == "bndeploy.check.onnxruntime"
