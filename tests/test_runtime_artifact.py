"""load_artifact / Artifact.run / `bndeploy run`: verification before loading, devices, inputs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import SHAPE, case, edit_manifest

from bndeploy.cli import main
from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.runtime import FP32_INFERENCE, compare, load_artifact
from bndeploy.runtime.artifact import machine_arch

REPO = Path(__file__).resolve().parents[1]
EXPECTS = "The artifact expects: x: float32[5, 3, 2, 2]"


@pytest.fixture(scope="module")
def inference(tmp_path_factory):
    return case(tmp_path_factory.getbasetemp(), "inference")


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return case(tmp_path_factory.getbasetemp(), "train")


def reference(c, key):
    with np.load(c.export_dir / "reference.npz") as data:
        return data[key]


def test_run_matches_the_numpy_reference(inference):
    artifact = load_artifact(inference.artifact_dir)
    assert artifact.device == "cpu" and artifact.mode == "inference"
    outputs = artifact.run({"x": reference(inference, "input/x")})
    assert list(outputs) == ["y"]
    assert compare(outputs["y"], reference(inference, "torch/y"), FP32_INFERENCE, "y", "torch", "torch/y").passed


def test_train_outputs_are_keyed_by_onnx_name(train):
    outputs = load_artifact(train.artifact_dir, "cpu").run({"x": reference(train, "input/x")})
    assert list(outputs) == ["y", "bn.running_mean_updated", "bn.running_var_updated"]
    assert outputs["bn.running_var_updated"].shape == (SHAPE[1],)


def test_flipped_byte_in_library_is_refused_before_loading(inference, tmp_path, capsys):
    artifact_dir = inference.copy_artifact(tmp_path)
    library = artifact_dir / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0x01
    library.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.so changed since it was compiled"):
        load_artifact(artifact_dir)
    assert main(["run", str(artifact_dir), "--out", str(tmp_path / "o.npz")]) == 2
    assert "model.so changed since it was compiled" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_missing_library_and_foreign_manifest(inference, tmp_path):
    artifact_dir = inference.copy_artifact(tmp_path)
    edit_manifest(artifact_dir, kind="export")
    with pytest.raises(ArtifactError, match="not a bndeploy artifact manifest"):
        load_artifact(artifact_dir)
    edit_manifest(artifact_dir, kind="artifact")
    (artifact_dir / "model.so").unlink()
    with pytest.raises(ArtifactError, match=r"model\.so: library file missing"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize(
    "inputs, problem",
    [
        ({"input": np.zeros(SHAPE, np.float32)}, "missing 'x'; unexpected 'input'"),
        ({"x": np.zeros((4, 3, 2, 2), np.float32)}, "'x' has shape [4, 3, 2, 2]"),
        ({"x": np.zeros(SHAPE, np.float64)}, "'x' is float64, expected float32"),
        ({"x": np.zeros((0, 3, 2, 2), np.float32)}, "'x' is empty (shape [0, 3, 2, 2])"),
    ],
)
def test_wrong_inputs_name_what_the_artifact_expects(inference, inputs, problem):
    artifact = load_artifact(inference.artifact_dir)
    with pytest.raises(BndeployError) as error:
        artifact.run(inputs)
    assert problem in str(error.value) and EXPECTS in str(error.value)


def test_cuda_artifact_without_a_gpu(inference, tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    artifact_dir = inference.copy_artifact(tmp_path)
    edit_manifest(artifact_dir, target={"device": "cuda"})
    with pytest.raises(BndeployError, match=r"needs a CUDA GPU \(cuda:0\) and none is available"):
        load_artifact(artifact_dir)


def test_device_must_suit_the_artifact(inference):
    with pytest.raises(BndeployError, match="compiled for cpu; it cannot run on cuda:1"):
        load_artifact(inference.artifact_dir, "cuda:1")
    with pytest.raises(BndeployError, match="unknown device 'gpu'"):
        load_artifact(inference.artifact_dir, "gpu")


def test_foreign_architecture_is_refused(inference, tmp_path):
    other = "x86_64" if machine_arch() == "aarch64" else "aarch64"
    artifact_dir = inference.copy_artifact(tmp_path)
    edit_manifest(artifact_dir, target={"triple": f"{other}-linux-gnu"})
    with pytest.raises(BndeployError, match=f"compiled for {other}-linux-gnu .*this machine is {machine_arch()}"):
        load_artifact(artifact_dir)


def test_cli_run_writes_every_output_by_name(train, tmp_path):
    out = tmp_path / "out.npz"
    assert main(["run", str(train.artifact_dir), "--out", str(out)]) == 0
    with np.load(out) as data:
        assert sorted(data.files) == sorted(["y", "bn.running_mean_updated", "bn.running_var_updated"])
        direct = load_artifact(train.artifact_dir).run({"x": reference(train, "input/x")})
        np.testing.assert_array_equal(data["y"], direct["y"])


def test_cli_run_inputs_from_seed_and_files(inference, tmp_path, capsys):
    seeded = tmp_path / "seeded.npz"
    assert main(["run", str(inference.artifact_dir), "--seed", "3", "--out", str(seeded)]) == 0
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    from_npy = tmp_path / "npy.npz"
    assert main(["run", str(inference.artifact_dir), "--inputs", str(tmp_path / "x.npy"), "--out", str(from_npy)]) == 0
    with np.load(seeded) as a, np.load(from_npy) as b:
        assert not np.array_equal(a["y"], b["y"])
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float64))
    assert main(["run", str(inference.artifact_dir), "--inputs", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "'x' is float64, expected float32" in capsys.readouterr().err


def test_runtime_imports_neither_torch_nor_onnx(inference):
    """An edge device has only TVM's runtime and numpy: make torch/onnx unimportable, as there, and
    record any attempt to import them that comes from bndeploy's own code."""
    script = textwrap.dedent(
        f"""
        import sys, traceback
        BLOCKED = ("torch", "onnx", "onnxruntime", "onnxscript")
        OWN = ({str(REPO / "runtime")!r}, {str(REPO / "bndeploy")!r})
        attempts = []
        class Edge:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    # The importing frame: the innermost one outside importlib and this script.
                    frames = [f.filename for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
                    importer = frames[-1] if frames else "?"
                    if importer.startswith(OWN):
                        attempts.append(f"{{name}} from {{importer}}")
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, Edge())
        import numpy as np
        import bndeploy.runtime
        artifact = bndeploy.runtime.load_artifact({str(inference.artifact_dir)!r})
        out = artifact.run({{"x": np.ones({SHAPE}, np.float32)}})
        assert out["y"].shape == {SHAPE}
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("LOADED", loaded, "ATTEMPTS", attempts)
        assert not loaded and not attempts
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED [] ATTEMPTS []" in done.stdout


def _at_offset(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `array` whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    placed = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    placed[...] = array
    return placed


@pytest.mark.parametrize("offset", [0, 4, 16])
def test_inputs_at_any_alignment_give_the_same_outputs(inference, offset):
    """TVM refuses data not aligned to 64 bytes; the runtime stages such inputs in an aligned buffer (and
    reuses it), leaving the caller's array untouched."""
    artifact = load_artifact(inference.artifact_dir)
    x = reference(inference, "input/x")
    placed = _at_offset(x, offset)
    assert placed.ctypes.data % 64 == offset
    before = placed.copy()
    first = artifact.run({"x": placed})["y"].copy()
    second = artifact.run({"x": placed})["y"]
    np.testing.assert_array_equal(first, artifact.run({"x": x})["y"])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(placed, before)


def test_valid_inputs_skip_the_full_validation_and_bad_ones_get_its_message(inference, monkeypatch):
    import bndeploy.runtime.artifact as artifact_module

    artifact = load_artifact(inference.artifact_dir)
    x = reference(inference, "input/x")
    calls = []
    full = artifact_module.validate_inputs
    monkeypatch.setattr(artifact_module, "validate_inputs", lambda *a: calls.append(1) or full(*a))
    artifact.run({"x": x})
    assert not calls
    artifact.run({"x": np.asfortranarray(x)})  # not C-contiguous: the full path makes it so
    assert len(calls) == 1
    with pytest.raises(BndeployError, match=EXPECTS.replace("[", r"\[").replace("]", r"\]")):
        artifact.run({"x": x.astype(np.float64)})
