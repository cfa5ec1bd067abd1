"""compile_model's artifact directory, manifest, kernels, export.json pickup and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

import compile_cases as cases
from bndeploy.cli import main
from bndeploy.compile import CompileSettings, compile_model
from bndeploy.errors import BndeployError
from bndeploy.files import sha256_of, write_json
from bndeploy.layout import manifest_header


@pytest.fixture(scope="module")
def conv_relu_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv_relu")
    onnx.save(cases.conv_bn_case("c", activation="relu").model, tmp / "model.onnx")
    (artifact,) = compile_model(tmp / "model.onnx", ["cpu"], tmp / "artifact", CompileSettings(dump=True))
    return tmp, artifact, json.loads((artifact / "artifact.json").read_text())


def test_manifest_fields(conv_relu_artifact):
    tmp, artifact, manifest = conv_relu_artifact
    assert manifest["kind"] == "artifact" and manifest["format"] == 1
    assert manifest["target"]["name"] == "cpu" and manifest["target"]["device"] == "cpu"
    assert (manifest["mode"], manifest["dtype"], manifest["running_var"]) == ("inference", "float32", "onnx")
    assert manifest["library"] == {"file": "model.so", "sha256": sha256_of(artifact / "model.so")}
    assert manifest["source"] == {"onnx": str((tmp / "model.onnx").absolute()),
                                  "onnx_sha256": sha256_of(tmp / "model.onnx"), "export_manifest": None,
                                  "opset": cases.OPSET}
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 4, 7, 6], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "z", "shape": [2, 6, 5, 4], "dtype": "float32", "role": "output"}]
    assert manifest["fusion"] == [{"batchnorm": "bn", "into": "conv", "op": "Conv", "folded": True,
                                   "reason": "folded into the Conv"}]
    assert set(manifest["versions"]) == {"tvm", "bndeploy"}
    assert sorted(p.name for p in (artifact / "dump").iterdir()) == ["library.s", "relax_after_passes.py",
                                                                      "relax_imported.py"]
    assert "bndeploy_conv2d_direct" in (artifact / "dump" / "library.s").read_text()
    assert "batch_norm" in (artifact / "dump" / "relax_imported.py").read_text()
    assert "batch_norm" not in (artifact / "dump" / "relax_after_passes.py").read_text()


def test_no_batchnorm_kernel_remains(conv_relu_artifact):
    kernels = conv_relu_artifact[2]["kernels"]
    assert kernels and not any("batch_norm" in k for k in kernels)


def test_bias_add_and_relu_are_fused_into_the_conv_kernel(conv_relu_artifact):
    """One conv kernel with the folded BN's bias and the ReLU in its epilogue; besides it only the
    channels-last layout changes at the graph's edges (NCHW in and out)."""
    kernels = conv_relu_artifact[2]["kernels"]
    convs = [k for k in kernels if "conv2d" in k]
    assert len(convs) == 1 and all(op in convs[0] for op in ("add", "relu")), kernels
    assert all(k.startswith("transpose") for k in kernels if k not in convs), kernels


def test_train_mode_roles_from_the_onnx_graph(tmp_path):
    onnx.save(cases.training_case("t").model, tmp_path / "model.onnx")
    (artifact,) = compile_model(tmp_path / "model.onnx", ["cpu"], tmp_path / "a", CompileSettings())
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["mode"] == "train"
    assert [(o["name"], o["role"], o.get("batchnorm")) for o in manifest["outputs"]] == [
        ("y", "output", None), ("running_mean", "running_mean", "bn"), ("running_var", "running_var", "bn")]


def _export_manifest(onnx_path, sha=None):
    return {**manifest_header("export"), "mode": "inference",
            "onnx": {"file": onnx_path.name, "sha256": sha or sha256_of(onnx_path)},
            "inputs": [{"name": "x", "shape": [2, 3, 4, 5], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": [2, 3, 4, 5], "dtype": "float32", "role": "output", "extra": 1}]}


def test_export_json_beside_the_model_is_recorded_and_copied(tmp_path):
    onnx.save(cases.batchnorm_case().model, tmp_path / "model.onnx")
    write_json(tmp_path / "export.json", _export_manifest(tmp_path / "model.onnx"))
    (artifact,) = compile_model(tmp_path / "model.onnx", ["cpu"], tmp_path / "a", CompileSettings())
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["source"]["export_manifest"] == str(tmp_path / "export.json")
    assert manifest["outputs"][0]["extra"] == 1  # copied from export.json, not re-derived


def test_stale_export_json_is_an_error(tmp_path):
    onnx.save(cases.batchnorm_case().model, tmp_path / "model.onnx")
    write_json(tmp_path / "export.json", _export_manifest(tmp_path / "model.onnx", sha="0" * 64))
    with pytest.raises(Exception, match="changed after export"):
        compile_model(tmp_path / "model.onnx", ["cpu"], tmp_path / "a", CompileSettings())


def test_several_targets_get_one_directory_each(tmp_path):
    onnx.save(cases.batchnorm_case().model, tmp_path / "model.onnx")
    dirs = compile_model(tmp_path / "model.onnx", ["cpu", "x86-64-avx2"], tmp_path / "out", CompileSettings())
    assert [d.name for d in dirs] == ["cpu", "x86-64-avx2"]
    assert json.loads((dirs[1] / "artifact.json").read_text())["target"]["tvm"]["mcpu"] == "x86-64-v3"


def test_cuda_target_without_nvcc_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    from bndeploy.compile.cuda import toolchain

    onnx.save(cases.batchnorm_case().model, tmp_path / "model.onnx")
    monkeypatch.setattr(toolchain, "find_nvcc", lambda: None)
    with pytest.raises(BndeployError, match="nvcc"):
        compile_model(tmp_path / "model.onnx", ["cuda"], tmp_path / "a", CompileSettings())
    assert not (tmp_path / "a").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cli_compiles_end_to_end(tmp_path, capsys):
    onnx.save(cases.conv_bn_case("c").model, tmp_path / "model.onnx")
    code = main(["compile", str(tmp_path / "model.onnx"), "--target", "cpu", "--out", str(tmp_path / "a")])
    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "a" / "model.so").is_file()
    assert "building for target cpu" in captured.err
    code = main(["compile", str(tmp_path / "model.onnx"), "--target", "cpu", "--out", str(tmp_path / "a")])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_cli_refuses_garbage_onnx_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00 this is not protobuf \xff" * 10)
    result = subprocess.run([sys.executable, "-m", "bndeploy.cli", "compile", str(tmp_path / "bad.onnx"),
                             "--target", "cpu", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not a valid ONNX model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_failed_build_leaves_no_partial_directory(tmp_path, monkeypatch):
    onnx.save(cases.batchnorm_case().model, tmp_path / "model.onnx")
    import bndeploy.compile.cpu as cpu

    def broken(mod, target):
        raise RuntimeError("simulated code-generation failure")

    monkeypatch.setattr(cpu, "build_lowered", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        compile_model(tmp_path / "model.onnx", ["cpu"], tmp_path / "a", CompileSettings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
