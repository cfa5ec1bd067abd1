"""The pytest plugin (`pytest --bndeploy DIR`): inner pytest sessions (pytester) over real compiled artifacts.

Two tiny-resnet artifacts: a clean one, and one whose shortcut BatchNorm kernel adds 0.5 to a channel
(tests/locate_faults.py), so it fails against both references and --bndeploy-locate must name that node.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from bndeploy.runtime import pytest_items
from bndeploy.runtime.testing import ArtifactMismatch, assert_artifact_matches
from locate_faults import SHORTCUT_BN, compile_cpu, with_faulty_batchnorm

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def compiled(exported, tmp_path_factory) -> dict[str, Path]:
    tiny = exported("tiny-resnet")["inference"]
    root = tmp_path_factory.mktemp("plugin")
    return {"clean": compile_cpu(tiny / "model.onnx", root / "clean"),
            "faulty": with_faulty_batchnorm(tiny, SHORTCUT_BN, root / "faulty")}


@pytest.fixture
def artifacts(pytester, compiled) -> Path:
    """artifacts/clean and artifacts/faulty under the inner session's root, as a CI job would lay them out."""
    for name, directory in compiled.items():
        shutil.copytree(directory, pytester.path / "artifacts" / name)
    return pytester.path / "artifacts"


@pytest.fixture
def check_calls(monkeypatch) -> list[Path]:
    """The artifacts each inner session ran check() on, in order."""
    calls = []

    def counted(directory, **kwargs):
        calls.append(Path(directory))
        return check(directory, **kwargs)

    check = pytest_items.check
    monkeypatch.setattr(pytest_items, "check", counted)
    return calls


def junit_cases(path: Path) -> dict[str, ET.Element]:
    return {f"{case.get('classname')}::{case.get('name')}": case for case in ET.parse(path).iter("testcase")}


def properties(case: ET.Element) -> dict[str, str]:
    return {p.get("name"): p.get("value") for p in case.iter("property")}


def test_artifacts_become_one_item_per_reference(pytester, artifacts, check_calls):
    result = pytester.runpytest_inprocess("--bndeploy", "artifacts", "-v", "--junitxml=junit.xml",
                                          "--bndeploy-html", "reports")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["artifacts/clean::torch PASSED*", "artifacts/clean::onnxruntime PASSED*",
                                 "artifacts/faulty::torch FAILED*", "artifacts/faulty::onnxruntime FAILED*"])
    # The check runs once per artifact; its two items share the report.
    assert sorted(p.name for p in check_calls) == ["clean", "faulty"]
    # A failure prints the report (its summary table and what failed), no Python traceback, and the short
    # summary line is the verdict.
    out = result.stdout.str()
    assert "kind    tensors  comparisons  pass  fail  max margin  at" in out
    assert "FAIL output vs onnxruntime:" in out and "FAIL output vs torch:" in out
    assert "Traceback" not in out and "first divergence" not in out
    result.stdout.fnmatch_lines(["FAILED artifacts/faulty::torch - FAIL (1 of 1 comparisons)*"])
    cases = junit_cases(pytester.path / "junit.xml")
    assert sorted(cases) == ["artifacts.clean::onnxruntime", "artifacts.clean::torch",
                             "artifacts.faulty::onnxruntime", "artifacts.faulty::torch"]
    failure = cases["artifacts.faulty::onnxruntime"].find("failure")
    assert failure.get("message").startswith("FAIL (1 of 1 comparisons); worst element: output vs onnxruntime")
    assert "result: FAIL (1 of 1 comparisons)" in failure.text
    assert cases["artifacts.clean::torch"].find("failure") is None
    assert properties(cases["artifacts.faulty::torch"])["bndeploy.failed"] == "1"
    clean = properties(cases["artifacts.clean::onnxruntime"])
    assert clean["bndeploy.failed"] == "0" and float(clean["bndeploy.max_margin"]) <= 1
    assert clean["bndeploy.reference.onnxruntime.version"]
    reports = sorted(p.name for p in (pytester.path / "reports").iterdir())
    assert reports == ["artifacts-clean.html", "artifacts-faulty.html"]
    assert clean["bndeploy.html"] == str(pytester.path / "reports" / "artifacts-clean.html")
    assert "<html" in (pytester.path / "reports" / "artifacts-faulty.html").read_text()[:200].lower()


def test_locate_names_the_faulty_node(pytester, artifacts):
    result = pytester.runpytest_inprocess("--bndeploy", "artifacts/faulty", "--bndeploy-against", "onnxruntime",
                                          "--bndeploy-locate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"first divergence: node '{SHORTCUT_BN}' (BatchNormalization, *"])


def test_gate_and_tolerance_options_reach_the_check(pytester, artifacts):
    result = pytester.runpytest_inprocess("--bndeploy", "artifacts/clean", "--bndeploy-against", "torch",
                                          "--bndeploy-check-stat", "quantile", "--bndeploy-error-quantile", "0.9",
                                          "--junitxml=junit.xml")
    result.assert_outcomes(passed=1)
    gate = properties(junit_cases(pytester.path / "junit.xml")["artifacts.clean::torch"])["bndeploy.gate"]
    assert "--check-stat quantile --error-quantile 0.9" in gate
    # A tolerance of zero fails even the clean artifact: the option reaches every comparison.
    strict = pytester.runpytest_inprocess("--bndeploy", "artifacts/clean", "--bndeploy-atol", "0",
                                          "--bndeploy-rtol", "0")
    strict.assert_outcomes(failed=2)
    strict.stdout.fnmatch_lines(["*outside atol=0 rtol=0*"])


def test_broken_artifacts_are_named_in_one_line(pytester, artifacts):
    (artifacts / "broken").mkdir()
    (artifacts / "broken" / "artifact.json").write_text("{")
    shutil.rmtree(artifacts / "faulty")
    with (artifacts / "clean" / "model.so").open("ab") as library:
        library.write(b"tampered")
    result = pytester.runpytest_inprocess("--bndeploy", "artifacts", "--continue-on-collection-errors",
                                          "--junitxml=junit.xml", "-vv")
    result.assert_outcomes(failed=2, errors=1)
    out = result.stdout.str()
    assert "Traceback" not in out
    # The manifest that is no manifest: a collection error, its one line the message.
    result.stdout.fnmatch_lines(["*ERROR collecting artifacts/broken*", "*artifact.json: manifest is not valid JSON*"])
    # The tampered library: each of the artifact's items fails with the check's one line.
    result.stdout.fnmatch_lines(["FAILED artifacts/clean::torch - *model.so changed since it was*"])
    cases = junit_cases(pytester.path / "junit.xml")
    assert "changed since it was compiled" in cases["artifacts.clean::onnxruntime"].find("failure").get("message")


def test_bad_options_are_usage_errors(pytester, artifacts):
    missing = pytester.runpytest_inprocess("--bndeploy", "nowhere")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: --bndeploy nowhere: no such directory*"])
    (pytester.path / "empty").mkdir()
    empty = pytester.runpytest_inprocess("--bndeploy", "empty")
    empty.stderr.fnmatch_lines(["ERROR: --bndeploy empty: no artifact.json under it*"])
    stat = pytester.runpytest_inprocess("--bndeploy", "artifacts", "--bndeploy-check-stat", "worst")
    stat.stderr.fnmatch_lines(["ERROR: unknown check statistic 'worst'*"])


def test_without_the_option_pytest_runs_as_before(pytester, artifacts):
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    plain = pytester.runpytest_inprocess("-v")
    plain.assert_outcomes(passed=1)
    assert "artifacts/" not in plain.stdout.str()
    # Test paths named beside --bndeploy run too; with none named, only the artifacts do.
    both = pytester.runpytest_inprocess("test_plain.py", "--bndeploy", "artifacts/clean", "-v")
    both.assert_outcomes(passed=3)
    only = pytester.runpytest_inprocess("--bndeploy", "artifacts/clean", "-v")
    only.assert_outcomes(passed=2)
    assert "test_plain" not in only.stdout.str()


def test_entry_point_imports_nothing_heavy():
    """pytest loads the entry point in every run of an environment with bndeploy: no numpy, TVM or ORT."""
    registered = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert registered.get("bndeploy") == "bndeploy.pytest_plugin", "re-install bndeploy (pip install -e .) to register it"
    code = ("import sys, bndeploy.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'numpy', 'tvm', 'onnxruntime', 'torch'} "
            "or m.startswith('bndeploy.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['bndeploy.pytest_plugin']"


def test_assert_artifact_matches_fails_with_the_table_and_location(compiled):
    assert assert_artifact_matches(compiled["clean"]).passed
    with pytest.raises(ArtifactMismatch) as failure:
        assert_artifact_matches(compiled["faulty"], locate=True, against=("onnxruntime",))
    message = str(failure.value)
    assert "FAIL output vs onnxruntime:" in message and f"first divergence: node '{SHORTCUT_BN}'" in message
    assert failure.value.headline.startswith("FAIL (1 of 1 comparisons)")
