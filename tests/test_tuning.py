"""`bndeploy tune` and `bndeploy compile --tuned`: MetaSchedule over the model's own kernels, measured on a
board behind a TVM RPC tracker (here a `bndeploy device serve` on loopback), kept only where faster.

A short search rarely beats bndeploy's register-tiled kernels, so the test of `--tuned` keeps every searched
schedule regardless of speed (KEEP_WHEN_FASTER_BY lowered) and checks that compile uses them and that
the artifact still matches ONNX Runtime. No test asserts a time.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_edge_rpc import LOOPBACK, bndeploy_device, free_port, running, server_command, start_tracker, wait_registered

from bndeploy.compile import CompileSettings, compile_model
from bndeploy.compile import tuning
from bndeploy.compile.tuning import TUNING_REPORT, TuneSettings, tune_model
from bndeploy.errors import BndeployError
from bndeploy.layout import ARTIFACT_MANIFEST
from bndeploy.runtime import load_artifact

TRIALS = 4


def conv_relu_model(path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 14, 14])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_rpc_tuning_needs_both_tracker_and_key(tmp_path):
    with pytest.raises(BndeployError, match="--rpc HOST:PORT and --key"):
        tune_model(conv_relu_model(tmp_path / "m.onnx"), "cpu", tmp_path / "t", TuneSettings(rpc="127.0.0.1:9190"))
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_tune_on_a_board_then_compile_with_the_kept_schedules(tmp_path, monkeypatch):
    model = conv_relu_model(tmp_path / "m.onnx")
    monkeypatch.setattr(tuning, "KEEP_WHEN_FASTER_BY", -1e9)  # keep every searched schedule
    tracker, address = start_tracker()
    try:
        with running(server_command(address, "tune-board"), "server"):
            wait_registered(address, "tune-board")
            said = []
            report = tune_model(model, "cpu", tmp_path / "tuned",
                                TuneSettings(trials=TRIALS, rpc=address, key="tune-board", timeout_s=300), said.append)
    finally:
        tracker.stop()
    assert report.measured_on.startswith("boards with key 'tune-board'")
    measured = [int(m.group(1)) for m in map(re.compile(rf"trials measured: (\d+) \(budget {TRIALS}\)").match, said) if m]
    assert measured and measured[-1] >= TRIALS, said
    assert {k.name for k in report.kernels} and all(k.calls >= 1 for k in report.kernels)
    conv = next(k for k in report.kernels if "conv2d" in k.name)
    assert conv.default_us and conv.tuned_us and conv.kept, conv  # both measured on the board
    saved = json.loads((tmp_path / "tuned" / TUNING_REPORT).read_text())
    assert saved["kind"] == "tuning" and saved["trials"] == TRIALS

    (artifact,) = compile_model(model, ["cpu"], tmp_path / "a", CompileSettings(tuned=tmp_path / "tuned"))
    manifest = json.loads((artifact / ARTIFACT_MANIFEST).read_text())
    assert conv.name in manifest["tuning"]["kernels"]
    x = np.random.default_rng(1).standard_normal((1, 16, 14, 14)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(load_artifact(artifact).run({"x": x})["y"], want, atol=1e-5, rtol=1e-4)


def test_tuning_on_an_approved_only_board_is_refused_in_words(tmp_path):
    """MetaSchedule uploads a new library per candidate: an approved-only board would refuse every one."""
    model = conv_relu_model(tmp_path / "m.onnx")
    allow = tmp_path / "approved.sha256"
    allow.write_text("0" * 64 + "\n")
    tracker, address = start_tracker()
    try:
        command = bndeploy_device("serve", "--host", LOOPBACK, "--port", str(free_port()), "--tracker", address,
                                  "--key", "approved-board", "--allow", str(allow))
        with running(command, "approved-only board"):
            wait_registered(address, "approved-board")
            with pytest.raises(BndeployError, match="loads approved libraries only; tuning uploads .*--allow-any-library"):
                tune_model(model, "cpu", tmp_path / "t", TuneSettings(trials=TRIALS, rpc=address, key="approved-board",
                                                                      timeout_s=30))
    finally:
        tracker.stop()
    assert not (tmp_path / "t").exists()


def test_compile_refuses_a_folder_that_is_not_a_tuning(tmp_path):
    model = conv_relu_model(tmp_path / "m.onnx")
    (tmp_path / "not-tuned").mkdir()
    with pytest.raises(BndeployError, match="not a bndeploy tuning folder"):
        compile_model(model, ["cpu"], tmp_path / "a", CompileSettings(tuned=tmp_path / "not-tuned"))
    assert not (tmp_path / "a").exists()


assert LOOPBACK  # the board runs on loopback, as every RPC test here
