"""What bndeploy refuses, and that each refusal is one clear line (exit code 2 through the CLI).

Hostile ONNX files for `compile`, hostile inputs for `run`/`check`, tampered or foreign artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bndeploy.cli import main
from bndeploy.compile import compile_model
from bndeploy.errors import BndeployError, UnsupportedModelError
from bndeploy.runtime import check, load_artifact

SHAPE = [2, 3, 4, 4]


def bn_onnx(opset: int = 20, inputs=("x", "s", "b", "m", "v"), scale_len: int = 3, op: str = "BatchNormalization",
            domain: str = "", training: bool = False) -> onnx.ModelProto:
    """A one-node BatchNormalization model on x: (2, 3, 4, 4), built by hand so it can be broken."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)
    sizes = {"s": scale_len, "b": 3, "m": 3, "v": 3}
    inits = [numpy_helper.from_array(np.full(n, 0.5 + i, np.float32), name) for i, (name, n) in enumerate(sizes.items())]
    attrs = {"training_mode": 1} if training else {}
    node = helper.make_node(op, list(inputs), ["y"], name="bn", domain=domain, **attrs)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=opsets)


def write_model(folder: Path, model: onnx.ModelProto | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def refuse(path: Path, out: Path, error=BndeployError) -> str:
    with pytest.raises(error) as info:
        compile_model(path, ["cpu"], out)
    assert not out.exists(), "a refused compile must not leave an output directory"
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Bad ONNX files


def test_truncated_onnx_is_not_a_model(tmp_path):
    good = bn_onnx().SerializeToString()
    path = write_model(tmp_path / "m", good[: len(good) // 2])
    message = refuse(path, tmp_path / "out")
    assert message.startswith(f"{path}: not a valid ONNX model (")
    assert "corrupt" in message or "parsing" in message


def test_random_bytes_are_not_a_model(tmp_path):
    path = write_model(tmp_path / "m", np.random.default_rng(0).bytes(300))
    assert f"{path}: not a valid ONNX model (Error parsing message" in refuse(path, tmp_path / "out")


@pytest.mark.parametrize("payload", [b"", helper.make_graph([], "g", [], []).SerializeToString()],
                         ids=["empty", "graph-proto"])
def test_valid_protobuf_that_is_not_a_model(tmp_path, payload):
    # Both parse as a ModelProto (protobuf accepts them) but carry no IR version, opset or graph.
    path = write_model(tmp_path / "m", payload)
    message = refuse(path, tmp_path / "out")
    assert message.startswith(f"{path}: not a valid ONNX model (")
    assert "ir_version" in message.lower() or "ir version" in message.lower()


def test_opset_older_than_7_is_refused_with_the_way_out(tmp_path):
    path = write_model(tmp_path / "m", bn_onnx(opset=6))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert "ONNX opset 6 is older than 7, the oldest bndeploy converts" in message and "re-export" in message


def test_opset_newer_than_onnx_knows_is_refused(tmp_path):
    path = write_model(tmp_path / "m", bn_onnx(opset=99))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert "ONNX opset 99 is newer than this onnx package knows" in message


def _old_batchnorm(opset: int, outputs=("y",), **attrs) -> onnx.ModelProto:
    model = bn_onnx(opset=opset)
    node = model.graph.node[0]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    del node.output[:]
    node.output.extend(outputs)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE if o == "y" else [3])
                              for o in outputs)
    return model


def test_batchnorm_spatial_0_is_refused_with_its_reason(tmp_path):
    path = write_model(tmp_path / "m", _old_batchnorm(7, spatial=0))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert "spatial=0" in message and "per channel" in message


@pytest.mark.parametrize("outputs", [("y", "mean", "var"), ("y", "mean", "var", "saved_mean", "saved_var")])
def test_old_batchnorm_training_outputs_are_refused_with_the_way_out(tmp_path, outputs):
    path = write_model(tmp_path / "m", _old_batchnorm(13, outputs=outputs))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert "training outputs" in message and "opset 14 or later" in message


def test_unsupported_op_is_named(tmp_path):
    path = write_model(tmp_path / "m", bn_onnx(op="FancyNorm", domain="com.example"))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert message.endswith("operators are not supported for frontend ONNX: FancyNorm")


def test_batchnorm_with_four_inputs(tmp_path):
    path = write_model(tmp_path / "m", bn_onnx(inputs=("x", "s", "b", "m")))
    message = refuse(path, tmp_path / "out")
    assert "BatchNormalization" in message and "has input size 4 not in range [min=5, max=5]" in message


@pytest.mark.parametrize("training", [False, True], ids=["inference", "train"])
def test_batchnorm_with_mismatched_parameter_shape(tmp_path, training):
    path = write_model(tmp_path / "m", bn_onnx(scale_len=4, training=training))
    message = refuse(path, tmp_path / "out", UnsupportedModelError)
    assert message == (f"{path}: BatchNormalization 'bn': scale 's' has shape [4], expected [3] "
                       "(one value per channel of 'x', shape [2, 3, 4, 4])")


def _with_external_scale(location: str) -> onnx.ModelProto:
    model = bn_onnx()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_before_reading(tmp_path, monkeypatch, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(3, np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[kind]
    if kind == "symlink":
        os.symlink(secret, folder / "weights.bin")
    path = write_model(folder, _with_external_scale(location))
    opened = []
    real_open = open

    def spy_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    message = refuse(path, tmp_path / "out")
    assert message == (f"{folder}: tensor 's' stores its data at {location!r}, outside the model's folder "
                       f"{folder.resolve()}; refusing to read it (path traversal)")
    assert str(secret.resolve()) not in opened


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(np.full(3, 0.5, np.float32).tobytes())
    path = write_model(folder, _with_external_scale("weights.bin"))
    out = compile_model(path, ["cpu"], tmp_path / "out")[0]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    y = load_artifact(out).run({"x": x})["y"]
    expected = (x - 2.5) / np.sqrt(3.5 + 1e-5) * 0.5 + 1.5  # scale 0.5 (file), bias 1.5, mean 2.5, var 3.5
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)  # fp32: a few ulps of O(1) values


# --------------------------------------------------------------------------------------------------
# Runtime inputs


@pytest.fixture(scope="module")
def artifacts(exported, tmp_path_factory):
    """{mode: artifact dir} for seed-bn2d (a bare BatchNorm2d(3) on (5, 3, 2, 2)), compiled once."""
    root = tmp_path_factory.mktemp("failure-artifacts")
    return {mode: compile_model(d / "model.onnx", ["cpu"], root / mode)[0] for mode, d in exported("seed-bn2d").items()}


def _input(artifact_dir: Path) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((5, 3, 2, 2)).astype(np.float32)


def test_nan_and_inf_propagate_as_in_onnxruntime(artifacts):
    # inference: each element on its own, so only the poisoned positions turn non-finite.
    x = _input(artifacts["inference"])
    x[0, 0, 0, 0], x[1, 1, 1, 1], x[2, 2, 0, 1] = np.nan, np.inf, -np.inf
    report = check(artifacts["inference"], against=("onnxruntime",), inputs={"input": x})
    assert report.passed, report.summary()
    y = load_artifact(artifacts["inference"]).run({"input": x})["output"]
    assert np.isnan(y[0, 0, 0, 0]) and np.isinf(y[1, 1, 1, 1]) and np.isinf(y[2, 2, 0, 1])
    assert np.isfinite(y).sum() == y.size - 3
    assert "non-finite" in report.summary()


def test_nan_in_train_mode_poisons_only_its_channel(artifacts):
    x = _input(artifacts["train"])
    x[0, 1, 0, 0] = np.nan  # channel 1's batch mean and variance become NaN, so does all of its y
    report = check(artifacts["train"], against=("onnxruntime",), inputs={"input": x})
    assert report.passed, report.summary()
    out = load_artifact(artifacts["train"]).run({"input": x})
    assert np.isnan(out["output"][:, 1]).all() and np.isfinite(out["output"][:, [0, 2]]).all()
    assert "non-finite" in report.summary()


@pytest.mark.parametrize("array, problem", [
    (np.zeros((5, 3, 2, 2), np.float64), "'input' is float64, expected float32 (cast it with .astype('float32'))"),
    (np.zeros((5, 3, 2), np.float32), "'input' has shape [5, 3, 2]"),
    (np.zeros((0, 3, 2, 2), np.float32), "'input' is empty (shape [0, 3, 2, 2]); BatchNorm needs at least one sample"),
], ids=["dtype", "shape", "empty-batch"])
def test_bad_runtime_inputs_are_named(artifacts, tmp_path, capsys, array, problem):
    with pytest.raises(BndeployError, match=r"^inputs do not match the artifact: ") as info:
        load_artifact(artifacts["inference"]).run({"input": array})
    assert problem in str(info.value)
    np.save(tmp_path / "x.npy", array)
    assert main(["run", str(artifacts["inference"]), "--inputs", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bndeploy run: error: inputs do not match the artifact")
    assert problem in err


# --------------------------------------------------------------------------------------------------
# Tampered and foreign artifacts: one line on stderr, exit code 2


def _tamper(artifact_dir: Path, to: Path, damage) -> Path:
    copy = Path(shutil.copytree(artifact_dir, to / "artifact"))
    damage(copy)
    return copy


def _edit_manifest(**changes):
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / "artifact.json").read_text())
        for dotted, value in changes.items():
            node = manifest
            *parents, leaf = dotted.split("__")
            for key in parents:
                node = node[key]
            node[leaf] = value
        (folder / "artifact.json").write_text(json.dumps(manifest))
    return damage


def _flip_library_byte(folder: Path) -> None:
    data = bytearray((folder / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.so").write_bytes(bytes(data))


TAMPERING = {
    "library-sha256": (_flip_library_byte, "model.so changed since it was compiled (sha256 "),
    "manifest-missing": (lambda f: (f / "artifact.json").unlink(), "artifact.json: manifest not found"),
    "manifest-format": (_edit_manifest(format=99, bndeploy_version="9.0.0"),
                        "manifest format 99 written by bndeploy 9.0.0; this bndeploy 0.1.0 reads format 1"),
    # The manifest is what tells the runtime where a library may run, so editing it is how a foreign
    # artifact is made here (no CUDA toolchain or aarch64 machine needed); load order checks the
    # library hash first, and the library is untouched.
    "cuda-without-gpu": (_edit_manifest(target__device="cuda"), "this artifact needs a CUDA GPU (cuda:0)"),
    "aarch64-on-x86": (_edit_manifest(target__triple="aarch64-linux-gnu"),
                       "was compiled for aarch64-linux-gnu (aarch64); this machine is x86_64"),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampered_or_foreign_artifact_is_one_line_exit_2(artifacts, tmp_path, capsys, name):
    damage, expected = TAMPERING[name]
    if name == "cuda-without-gpu" and _has_cuda():
        pytest.skip("a CUDA device is present")
    folder = _tamper(artifacts["inference"], tmp_path, damage)
    for command in (["run", str(folder), "--seed", "0", "--out", str(tmp_path / "y.npz")],
                    ["check", str(folder), "--against", "onnxruntime", "--seed", "0"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"bndeploy {command[0]}: error: ") and expected in err
    assert not (tmp_path / "y.npz").exists()


def _has_cuda() -> bool:
    import tvm.runtime

    return tvm.runtime.cuda(0).exist
