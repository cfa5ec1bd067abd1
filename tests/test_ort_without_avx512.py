"""scripts/ort-without-avx512.py: the AVX2 peer for `bndeploy bench --target x86-64-avx2` on an AVX-512 host.

The copy must differ from the installed ONNX Runtime by the one branch it names and nothing else, compute
what the installed one computes (to the reassociation of fp32 sums), and say what it is in a bench table.
Whether its MLAS then runs AVX2 kernels shows only in their speed (a 1024^3 MatMul at 2 threads on an
AMD EPYC Zen 5: 509 -> 257 GFLOP/s, the ratio of the two ISAs' FMA loops), which no test asserts.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ort-without-avx512.py"

# A conv over 64 channels (3x3: 576 products a sum), then a MatMul over 256 of its outputs.
RUN_BOTH = """
import sys, json, numpy as np, onnx, onnxruntime
from onnx import helper, numpy_helper, TensorProto
from bndeploy.bench import peer_description
rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.standard_normal((32, 64, 3, 3)).astype(np.float32), "w")
g = numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "g")
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
     helper.make_node("Reshape", ["c", "shape"], ["r"]), helper.make_node("MatMul", ["r", "g"], ["y"])],
    "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64, 16, 16])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8 * 32, 10])],
    [w, g, numpy_helper.from_array(np.array([8 * 32, 256], np.int64), "shape")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
y, = session.run(None, {"x": rng.standard_normal((8, 64, 16, 16)).astype(np.float32)})
np.save(sys.argv[1], y)
print(json.dumps({"file": onnxruntime.__file__, "version": onnxruntime.__version__, "peers": peer_description()}))
"""


def _script_module():
    spec = importlib.util.spec_from_file_location("ort_without_avx512", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(code_args: list[str], pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *code_args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("ort") / "no-avx512"
    result = _run([str(SCRIPT), str(target)])
    if "this build is not supported" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    return target


def _library(package: Path) -> Path:
    (library,) = (package / "capi").glob("onnxruntime_pybind11_state*.so")
    return library


def test_the_copy_differs_by_the_avx512_branch_alone(copy_dir):
    import onnxruntime

    import numpy as np

    installed = np.fromfile(_library(Path(onnxruntime.__file__).parent), np.uint8)
    patched = np.fromfile(_library(copy_dir / "onnxruntime"), np.uint8)
    assert installed.shape == patched.shape
    changed = np.flatnonzero(installed != patched)
    assert len(changed) == 1, f"{len(changed)} bytes changed"
    assert (installed[changed[0]], patched[changed[0]]) == (0x74, 0xEB)  # je -> jmp
    assert not (copy_dir.parent / (copy_dir.name + ".partial")).exists()


def test_the_copy_computes_what_the_installed_one_does_and_names_itself(copy_dir, tmp_path):
    import json

    import numpy as np

    runs = {}
    for name, path in (("installed", None), ("copy", str(copy_dir))):
        result = _run(["-c", RUN_BOTH, str(tmp_path / f"{name}.npy")], pythonpath=path)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
    assert runs["copy"]["file"].startswith(str(copy_dir))
    assert runs["copy"]["version"] == runs["installed"]["version"] + "+no-avx512"
    assert "+no-avx512" in runs["copy"]["peers"] and "+no-avx512" not in runs["installed"]["peers"]
    installed, copy = np.load(tmp_path / "installed.npy"), np.load(tmp_path / "copy.npy")
    # Sums of 576 x 256 products reach ~500 here; AVX2 and AVX-512 add them in different orders, so the
    # outputs agree to some ulps of the largest sums, not of each output: 1e-5 of the largest is 5e-3, fp32's
    # ulp at 500 is 3e-5, and Zen 5 gave 3.4e-4. A wrong kernel is off by the outputs' own size.
    np.testing.assert_allclose(copy, installed, rtol=0, atol=1e-5 * np.abs(installed).max())


def test_a_build_without_the_branch_is_refused_and_nothing_is_left(tmp_path):
    module = _script_module()
    library = tmp_path / "lib.so"
    library.write_bytes(b"\x90" * 64)
    with pytest.raises(SystemExit, match="found 0 MLAS AVX-512F checks in lib.so"):
        module.patch_library(library)
    assert library.read_bytes() == b"\x90" * 64

    full = tmp_path / "full"
    (full / "something").mkdir(parents=True)
    refused = _run([str(SCRIPT), str(full)])
    assert refused.returncode == 1 and refused.stderr.strip().endswith("is not empty: give a new folder")
    assert sorted(p.name for p in full.iterdir()) == ["something"]
