"""Compiled CPU artifacts against the float64 numpy reference and onnxruntime, both BN modes.

Tolerance: each case's elementwise fp32 error bound (compile_cases.fp32_bound: (K + 8) roundings of
the largest intermediate magnitude, K = terms per reduction). The artifact and onnxruntime must
each be within it of the float64 reference, so they are within twice it of each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

import compile_cases as cases
from bndeploy.compile import CompileSettings, compile_model


def compile_case(case, tmp: Path, settings=CompileSettings()) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    onnx.save(case.model, tmp / "model.onnx")
    (artifact,) = compile_model(tmp / "model.onnx", ["cpu"], tmp / "artifact", settings)
    return artifact


def run_artifact(artifact: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    manifest = json.loads((artifact / "artifact.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact / "model.so")), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(inputs[i["name"]]) for i in manifest["inputs"]])
    values = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return {o["name"]: v for o, v in zip(manifest["outputs"], values)}


def run_ort(case) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, case.inputs)))


def assert_within(got, expected, bound, what):
    excess = np.abs(np.asarray(got, np.float64) - expected) - bound
    assert got.shape == expected.shape, what
    assert np.all(excess <= 0), f"{what}: max error over the fp32 bound by {excess.max():.3g}"


ALL_CASES = cases.inference_cases() + cases.training_cases()


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_artifact_matches_numpy_reference_and_onnxruntime(case, tmp_path):
    artifact = compile_case(case, tmp_path)
    got, from_ort = run_artifact(artifact, case.inputs), run_ort(case)
    assert set(got) == set(case.expected)
    for name, reference in case.expected.items():
        assert_within(got[name], reference, case.bound[name], f"{case.name}/{name} vs numpy")
        assert_within(got[name], from_ort[name], 2 * case.bound[name], f"{case.name}/{name} vs onnxruntime")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert [e["folded"] for e in manifest["fusion"]] == case.folded
    assert manifest["mode"] == case.mode


def test_torch_running_var_tracks_pytorch_unbiased_update(tmp_path):
    case = cases.training_case("t", conv=True)
    torch_case = cases.training_case("t", conv=True, running_var="torch")
    got = run_artifact(compile_case(case, tmp_path, CompileSettings(running_var="torch")), case.inputs)
    assert_within(got["running_var"], torch_case.expected["running_var"], torch_case.bound["running_var"],
                  "running_var (torch)")
    # The ONNX and torch updates differ by var/(n-1)*(1-M), far above the bound: the mode matters.
    assert np.all(np.abs(got["running_var"] - case.expected["running_var"]) > case.bound["running_var"])


def test_float16_artifact_keeps_float32_interface_and_is_fp16_accurate(tmp_path):
    case = cases.conv_bn_case("c", activation="relu")
    artifact = compile_case(case, tmp_path, CompileSettings(dtype="float16"))
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["dtype"] == "float16"
    got = run_artifact(artifact, case.inputs)["z"]
    assert got.dtype == np.float32
    # Same bound with fp16's unit roundoff 2^-11 (input, weights, accumulation and output all fp16),
    # plus one fp16 rounding of the input: a correct fp16 computation stays inside it.
    bound = case.bound["z"] * (2.0**-11 / cases.U32) + 2.0**-11 * np.abs(case.expected["z"])
    assert_within(got, case.expected["z"], bound, "fp16 conv_bn_relu")
    # ...and it really is fp16: the error exceeds what fp32 would allow somewhere.
    assert np.any(np.abs(got - case.expected["z"]) > case.bound["z"])
