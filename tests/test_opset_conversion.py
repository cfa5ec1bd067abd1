"""ONNX files written at opsets 7-13, as older exporters write them, converted in memory and checked against
ONNX Runtime on the original file.

The operator-level conformance (ONNX's node cases at their own opsets and written down to 7, 9, 11, 13) is
test_onnx_node_conformance.py; the refusals (opset 6, spatial=0, old train-mode outputs) test_failure_modes.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bndeploy.compile import compile_model
from bndeploy.runtime import check, load_artifact


@pytest.mark.slow
@pytest.mark.parametrize("opset", [11, 13])
def test_torchvision_resnet_from_the_torchscript_exporter_compiles_and_checks(opset, tmp_path):
    """torch's TorchScript exporter at opset 11 and 13, BatchNorms kept (no constant folding): every one of
    them arrives as an old BatchNormalization, is converted, folded into its conv, and the artifact matches
    ONNX Runtime run on the exporter's own file."""
    import torch

    from bndeploy.export.zoo import zoo_model

    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(zoo_model("resnet18").eval(), (torch.randn(1, 3, 64, 64),), str(path), opset_version=opset,
                      dynamo=False, do_constant_folding=False)
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} == {opset}
    (artifact,) = compile_model(path, ["cpu"], tmp_path / "artifact")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["source"]["opset"] == opset
    assert manifest["source"]["opset_conversion"]["from_opset"] == opset
    assert manifest["source"]["opset_conversion"]["to_opset"] == 14
    assert len(manifest["fusion"]) == 20 and all(entry["folded"] for entry in manifest["fusion"])
    report = check(artifact, against=("onnxruntime",), seed=0)
    assert report.passed, report.summary()
    assert manifest["source"]["onnx"] == str(path)  # the reference ran the original file, not the conversion


def _clip_with_scalar_bounds(opset: int) -> onnx.ModelProto:
    """Clip(x, min, max) with the bounds as rank-0 graph inputs (Clip-11 and later)."""
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    graph = helper.make_graph([node], "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
                                               helper.make_tensor_value_info("lo", TensorProto.FLOAT, []),
                                               helper.make_tensor_value_info("hi", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_rank_0_inputs_pass_through_run_and_check(tmp_path):
    onnx.save(_clip_with_scalar_bounds(11), tmp_path / "clip.onnx")
    (artifact,) = compile_model(tmp_path / "clip.onnx", ["cpu"], tmp_path / "artifact")
    x = np.linspace(-3, 3, 10, dtype=np.float32).reshape(2, 5)
    bounds = {"lo": np.float32(-1.0), "hi": np.array(2.0, np.float32)}  # a numpy scalar and a 0-d array
    got = load_artifact(artifact).run({"x": x, **bounds})["y"]
    np.testing.assert_array_equal(got, np.clip(x, -1.0, 2.0))
    np.savez(tmp_path / "inputs.npz", x=x, lo=np.array(-1.0, np.float32), hi=np.array(2.0, np.float32))
    cli = [sys.executable, "-m", "bndeploy.cli"]
    ran = subprocess.run(cli + ["run", str(artifact), "--inputs", str(tmp_path / "inputs.npz"), "--out",
                                str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["y"], np.clip(x, -1.0, 2.0))
    checked = subprocess.run(cli + ["check", str(artifact), "--against", "onnxruntime", "--seed", "3", "-q"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("opset", [7, 9])
def test_old_inference_batchnorm_folds_like_a_new_one(opset, tmp_path):
    """BatchNormalization-7 (spatial=1) and -9 after a conv: converted, folded, equal to ORT on the file."""
    rng = np.random.default_rng(opset)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v")]
    bn_attrs = {"spatial": 1} if opset < 9 else {}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=1e-3, **bn_attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 6, 6])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), tmp_path / "m.onnx")
    (artifact,) = compile_model(tmp_path / "m.onnx", ["cpu"], tmp_path / "artifact")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert [entry["folded"] for entry in manifest["fusion"]] == [True]
    assert check(artifact, against=("onnxruntime",), seed=0).passed
