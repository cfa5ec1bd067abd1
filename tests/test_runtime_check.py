"""check(), `bndeploy check` and its reports against the torch and onnxruntime references."""

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from runtime_fixtures import (  # noqa: F401 (fixtures)
    bad_channel, inference, root, train, BAD_CHANNEL, RECORDED_TORCH_VERSION, RUNNING_VAR, SHAPE, case, copy_case, edit_manifest)

from bndeploy.cli import main
from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.runtime import FP32_TRAIN, Tolerance, assert_artifact_matches, check



def test_inference_artifact_passes_against_both_references(inference):
    report = check(inference.artifact_dir)
    assert report.passed and report.exit_code == 0
    assert [(c.output, c.reference, c.reference_key) for c in report.comparisons] == [
        ("y", "torch", "torch/y"),
        ("y", "onnxruntime", "onnxruntime"),
    ]
    assert all(c.total == np.prod(SHAPE) for c in report.comparisons)
    assert report.inputs_source.startswith("the export's recorded inputs")


def test_train_running_var_against_spec_with_explained_note(train):
    report = check(train.artifact_dir)
    assert report.passed, report.summary()
    keys = {(c.output, c.reference): c.reference_key for c in report.comparisons}
    assert keys[(RUNNING_VAR, "torch")] == f"spec/{RUNNING_VAR}"
    assert keys[("y", "torch")] == "torch/y"
    with np.load(train.export_dir / "reference.npz") as data:
        gap = np.max(np.abs(data[f"torch/{RUNNING_VAR}"].astype(np.float64) - data[f"spec/{RUNNING_VAR}"]))
    assert gap > 1e-3  # the fixture's unbiased/population difference is real, not hidden in a tolerance
    (note,) = [n for n in report.notes if n.startswith("running_var:")]
    assert note.startswith(
        "running_var: ONNX uses the population variance, PyTorch the unbiased one (n/(n-1), n=20): "
        f"torch's own value differs from the ONNX spec by max {gap:.3g}"
    )
    assert "note: running_var: ONNX uses" in report.summary()
    assert all(c.tolerance == FP32_TRAIN for c in report.comparisons)


def test_torch_style_running_var_is_compared_against_torch(root):
    report = check(case(root, "train_torch_var").artifact_dir)
    by_key = {(c.output, c.reference): c for c in report.comparisons}
    torch_var = by_key[(RUNNING_VAR, "torch")]
    assert torch_var.reference_key == f"torch/{RUNNING_VAR}"
    # The fixture's library computes the ONNX update, so a torch-style manifest must fail here.
    assert not torch_var.passed and report.exit_code == 1
    assert (RUNNING_VAR, "onnxruntime") not in by_key
    assert any(f"{RUNNING_VAR} vs onnxruntime: skipped" in n for n in report.notes)


def test_bad_channel_fails_and_is_located(bad_channel):
    report = check(bad_channel.artifact_dir)
    assert not report.passed and len(report.failures) == 2
    for failure in report.failures:
        assert failure.bad_channels() == [BAD_CHANNEL]
        assert failure.worst_index[1] == BAD_CHANNEL
        assert failure.mismatches == SHAPE[0] * SHAPE[2] * SHAPE[3]


def test_html_has_one_chart_pair_per_output_and_highlights_the_bad_channel(bad_channel, train, tmp_path):
    check(bad_channel.artifact_dir).write_html(tmp_path / "bad.html")
    page = (tmp_path / "bad.html").read_text()
    assert page.count("class='chart histogram'") == 1 and page.count("class='chart channels'") == 1
    highlighted = re.findall(r"class='bar bad' data-channel='(\d+)'", page)
    assert highlighted == [str(BAD_CHANNEL)]
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # each chart is well-formed XML

    check(train.artifact_dir).write_html(tmp_path / "train.html")
    page = (tmp_path / "train.html").read_text()
    for output in ("y", "bn.running_mean_updated", RUNNING_VAR):
        assert page.count(f"class='chart histogram' data-output='{output}'") == 1
        assert page.count(f"class='chart channels' data-output='{output}'") == 1
    assert "class='bar bad'" not in page


def test_cli_exit_codes_and_machine_reports(inference, bad_channel, tmp_path, capsys):
    assert main(["check", str(inference.artifact_dir)]) == 0
    assert "result: PASS" in capsys.readouterr().out
    json_path, junit_path = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["check", str(bad_channel.artifact_dir), "--json", str(json_path), "--junit", str(junit_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAIL y vs torch" in out and f"channels with mismatches (axis 1): {BAD_CHANNEL}" in out
    data = json.loads(json_path.read_text())
    assert data["passed"] is False and [c["reference"] for c in data["comparisons"]] == ["torch", "onnxruntime"]
    assert data["comparisons"][0]["channel_mismatches"][BAD_CHANNEL] == 20
    suite = ET.parse(junit_path).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "2"


def test_cli_tolerance_overrides(bad_channel, capsys):
    artifact = str(bad_channel.artifact_dir)
    assert main(["check", artifact, "--atol", "1.0"]) == 0
    assert main(["check", artifact, "--tol", "y=1.0,0"]) == 0
    assert main(["check", artifact, "--tol", "y=1e-3,0"]) == 1
    assert main(["check", artifact, "--tol", "z=1,0"]) == 2
    assert "unknown output(s) z" in capsys.readouterr().err


def test_api_tolerances(bad_channel):
    assert check(bad_channel.artifact_dir, tolerances=Tolerance(1.0, 0.0)).passed
    assert check(bad_channel.artifact_dir, tolerances={"y": (1.0, 0.0)}).passed
    assert not check(bad_channel.artifact_dir, tolerances={"y": (0.5, 0.0)}).passed  # worst error is 0.83


def test_custom_inputs_check_against_onnxruntime_only(inference, tmp_path):
    report = check(inference.artifact_dir, against=("onnxruntime",), seed=5)
    assert report.passed and [c.reference for c in report.comparisons] == ["onnxruntime"]
    with pytest.raises(BndeployError, match="torch references exist only for the export's recorded inputs"):
        check(inference.artifact_dir, seed=5)
    assert main(["check", str(inference.artifact_dir), "--seed", "5"]) == 2
    assert main(["check", str(inference.artifact_dir), "--against", "onnxruntime", "--seed", "5"]) == 0
    with pytest.raises(BndeployError, match="unknown reference"):
        check(inference.artifact_dir, against=("tensorrt",))


def test_missing_references_say_what_is_gone(inference, tmp_path, capsys):
    copied = copy_case(inference, tmp_path)
    (copied.export_dir / "reference.npz").unlink()
    with pytest.raises(ArtifactError, match=r"the export's references are gone: .*reference\.npz"):
        check(copied.artifact_dir)
    (copied.export_dir / "export.json").unlink()
    assert main(["check", str(copied.artifact_dir)]) == 2
    assert "the export this artifact was compiled from is gone" in capsys.readouterr().err
    (copied.export_dir / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="the ONNX model this artifact was compiled from is gone"):
        check(copied.artifact_dir, against=("onnxruntime",), seed=0)


def test_changed_reference_or_onnx_is_refused(inference, tmp_path):
    copied = copy_case(inference, tmp_path)
    with np.load(copied.export_dir / "reference.npz") as data:
        arrays = dict(data)
    arrays["torch/y"] = arrays["torch/y"] + 1
    np.savez(copied.export_dir / "reference.npz", **arrays)
    with pytest.raises(ArtifactError, match=r"reference\.npz changed since the export"):
        check(copied.artifact_dir)
    edit_manifest(copied.artifact_dir, source={"onnx_sha256": "0" * 64})
    with pytest.raises(ArtifactError, match=r"model\.onnx changed since this artifact was compiled"):
        check(copied.artifact_dir, against=("onnxruntime",), seed=0)


def test_pytest_helper(inference, bad_channel):
    assert assert_artifact_matches(inference.artifact_dir).passed
    with pytest.raises(AssertionError) as failure:
        assert_artifact_matches(bad_channel.artifact_dir, against=("torch",))
    message = str(failure.value)
    assert "outside tol" in message and "FAIL y vs torch" in message and "result: FAIL" in message


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_end_to_end_export_compile_check(exported, tmp_path_factory, mode):
    """The real stages: the exporter's conv-bn references and the compile stage's CPU artifact."""
    from bndeploy.compile import compile_model

    export_dir = exported("conv-bn")[mode]
    (artifact_dir,) = compile_model(export_dir / "model.onnx", ["cpu"], tmp_path_factory.mktemp("e2e") / mode)
    report = assert_artifact_matches(artifact_dir)
    if mode == "train":
        assert any(n.startswith("running_var: ONNX uses the population variance") for n in report.notes)


# --- the references are what they claim to be


def test_every_report_names_its_reference_versions(train, tmp_path):
    import onnxruntime

    from bndeploy.onnxruntime_reference import HOW

    report = check(train.artifact_dir)
    assert report.references == {
        "torch": {"version": RECORDED_TORCH_VERSION, "how": "outputs recorded at export time (reference.npz)"},
        "onnxruntime": {"version": onnxruntime.__version__, "how": HOW},
    }
    line = (f"references: torch {RECORDED_TORCH_VERSION} (outputs recorded at export time (reference.npz)); "
            f"onnxruntime {onnxruntime.__version__} ({HOW})")
    assert f"  {line}" in report.summary().splitlines()
    assert "ORT_DISABLE_ALL" in line
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["references"] == report.references
    report.write_junit(tmp_path / "r.xml")
    properties = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "r.xml").getroot().iter("property")}
    assert properties["reference.torch.version"] == RECORDED_TORCH_VERSION
    assert properties["reference.onnxruntime.version"] == onnxruntime.__version__
    assert properties["reference.onnxruntime.how"] == HOW
    report.write_html(tmp_path / "r.html")
    assert f"onnxruntime {onnxruntime.__version__} (" in (tmp_path / "r.html").read_text()
    assert list(check(train.artifact_dir, against=("torch",)).references) == ["torch"]


def test_onnxruntime_reference_runs_the_graph_as_written(exported, tmp_path):
    """ORT's default session folds Conv+BatchNorm itself; the reference's keeps every node of the ONNX."""
    import onnx
    import onnxruntime as ort

    from bndeploy.onnxruntime_reference import reference_session, reference_session_options

    model_path = exported("conv-bn")["inference"] / "model.onnx"

    def ops_ort_runs(options, name: str) -> list[str]:
        options.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(tmp_path / name).graph.node]

    written = [n.op_type for n in onnx.load(model_path).graph.node]
    assert "BatchNormalization" in written
    assert "BatchNormalization" not in ops_ort_runs(ort.SessionOptions(), "default.onnx")  # the premise
    assert ops_ort_runs(reference_session_options(), "reference.onnx") == written
    options = reference_session(model_path).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
