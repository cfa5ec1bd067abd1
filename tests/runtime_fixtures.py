"""Tiny export + artifact directories for the runtime tests, written exactly as ARCHITECTURE.md says.

A single BatchNormalization node (x: (5, 3, 2, 2), so n = N*H*W = 20 per channel); the references
are computed with numpy in float64 (no torch): ``torch/`` with PyTorch's update rule (unbiased
running_var), ``spec/`` with the ONNX one (population variance).

The train-mode model uses ONNX momentum 0.5 on purpose: TVM 0.27's frontend applies ONNX's momentum
the wrong way round (see shared/notes/bn-semantics.md), and 0.5 is the one value where both readings
give the same running statistics, so TVM's own build is a correct artifact for these tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bndeploy.files import sha256_of, write_json
from bndeploy.layout import manifest_header

SHAPE = (5, 3, 2, 2)
EPSILON = 1e-5
MOMENTUM_ONNX = 0.5
OUTPUT_Y, RUNNING_MEAN, RUNNING_VAR = "y", "bn.running_mean_updated", "bn.running_var_updated"
# What the fixture's export.json records as torch's version (its "torch/" references are numpy's float64 maths).
RECORDED_TORCH_VERSION = "0.0.0+numpy-fixture"


@dataclass
class Case:
    export_dir: Path
    artifact_dir: Path

    def copy_artifact(self, to: Path) -> Path:
        """A private copy to damage (source paths stay absolute, so it still finds the export)."""
        return Path(shutil.copytree(self.artifact_dir, to / "artifact"))

    def manifest(self) -> dict:
        return json.loads((self.artifact_dir / "artifact.json").read_text())


def case(root: Path, name: str) -> Case:
    """Build (once per test session) one of: inference, train, bad_channel, train_torch_var."""
    folder = root / "runtime_cases" / name
    built = Case(folder / "export", folder / "artifact")
    if not (built.artifact_dir / "artifact.json").exists():
        _BUILDERS[name](built)
    return built


def parameters(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels = SHAPE[1]
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def numpy_reference(x: np.ndarray, p: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """reference.npz content: input/, torch/, spec/ (float64 maths, stored as float32)."""
    x64 = x.astype(np.float64)
    c = (1, -1, 1, 1)
    if mode == "inference":
        y = (x64 - p["mean"].reshape(c)) / np.sqrt(p["var"].reshape(c) + EPSILON) * p["scale"].reshape(c) + p["bias"].reshape(c)
        outputs = {"torch/y": y, "spec/y": y}
    else:
        axes, n = (0, 2, 3), x.size // x.shape[1]
        batch_mean, batch_var = x64.mean(axis=axes), x64.var(axis=axes)
        y = (x64 - batch_mean.reshape(c)) / np.sqrt(batch_var.reshape(c) + EPSILON) * p["scale"].reshape(c) + p["bias"].reshape(c)
        kept = MOMENTUM_ONNX
        running_mean = kept * p["mean"] + (1 - kept) * batch_mean
        outputs = {
            "torch/y": y,
            "spec/y": y,
            f"torch/{RUNNING_MEAN}": running_mean,
            f"spec/{RUNNING_MEAN}": running_mean,
            f"torch/{RUNNING_VAR}": kept * p["var"] + (1 - kept) * batch_var * n / (n - 1),
            f"spec/{RUNNING_VAR}": kept * p["var"] + (1 - kept) * batch_var,
        }
    return {"input/x": x} | {k: v.astype(np.float32) for k, v in outputs.items()}


def onnx_model(p: dict[str, np.ndarray], mode: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = ["scale", "bias", "mean", "var"]
    initializers = [numpy_helper.from_array(p[n], n) for n in names]
    train = mode == "train"
    outputs = [OUTPUT_Y, RUNNING_MEAN, RUNNING_VAR] if train else [OUTPUT_Y]
    node = helper.make_node(
        "BatchNormalization", ["x", *names], outputs, name="bn", epsilon=EPSILON, momentum=MOMENTUM_ONNX, training_mode=int(train)
    )
    channels = [SHAPE[1]]
    value_infos = [helper.make_tensor_value_info(OUTPUT_Y, TensorProto.FLOAT, list(SHAPE))]
    value_infos += [helper.make_tensor_value_info(n, TensorProto.FLOAT, channels) for n in outputs[1:]]
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))], value_infos, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return model


def output_specs(mode: str) -> list[dict]:
    specs = [{"name": OUTPUT_Y, "shape": list(SHAPE), "dtype": "float32", "role": "output"}]
    if mode == "train":
        n = SHAPE[0] * SHAPE[2] * SHAPE[3]
        common = {"shape": [SHAPE[1]], "dtype": "float32", "batchnorm": "bn"}
        specs.append({"name": RUNNING_MEAN, "role": "running_mean", **common})
        specs.append({"name": RUNNING_VAR, "role": "running_var", "batch_count": n, **common})
    return specs


INPUT_SPECS = [{"name": "x", "shape": list(SHAPE), "dtype": "float32"}]


def write_export(export_dir: Path, mode: str, p: dict[str, np.ndarray]) -> None:
    import onnx

    export_dir.mkdir(parents=True)
    onnx.save(onnx_model(p, mode), export_dir / "model.onnx")
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    np.savez(export_dir / "reference.npz", **numpy_reference(x, p, mode))
    write_json(
        export_dir / "export.json",
        manifest_header("export")
        | {
            "model": "runtime-test-bn",
            "mode": mode,
            "opset": 20,
            "onnx": {"file": "model.onnx", "sha256": sha256_of(export_dir / "model.onnx")},
            "reference": {"file": "reference.npz", "sha256": sha256_of(export_dir / "reference.npz")},
            "inputs": INPUT_SPECS,
            "outputs": output_specs(mode),
            "batchnorms": [{"module": "bn", "node": "bn", "epsilon": EPSILON, "momentum_onnx": MOMENTUM_ONNX,
                            "momentum_torch": 1 - MOMENTUM_ONNX, "training_mode": int(mode == "train"),
                            "affine": True, "num_features": SHAPE[1]}],
            "validation": {},
            "versions": {"torch": RECORDED_TORCH_VERSION},
        },
    )


def write_artifact(artifact_dir: Path, export_dir: Path, mode: str, compiled_params: dict, running_var: str = "onnx") -> None:
    """Compile ``compiled_params`` (normally the export's own) with TVM's default llvm pipeline."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    artifact_dir.mkdir(parents=True)
    target = tvm.target.Target({"kind": "llvm"})
    executable = tvm.compile(from_onnx(onnx_model(compiled_params, mode), keep_params_in_input=False), target=target)
    executable.export_library(str(artifact_dir / "model.so"))
    target_json = dict(target.export())
    write_json(
        artifact_dir / "artifact.json",
        manifest_header("artifact")
        | {
            "target": {"name": "cpu", "tvm": {"kind": "llvm"}, "device": "cpu", "triple": target_json.get("mtriple", ""), "archs": []},
            "mode": mode,
            "dtype": "float32",
            "running_var": running_var,
            "library": {"file": "model.so", "sha256": sha256_of(artifact_dir / "model.so")},
            "source": {
                "onnx": str((export_dir / "model.onnx").absolute()),
                "onnx_sha256": sha256_of(export_dir / "model.onnx"),
                "export_manifest": str((export_dir / "export.json").absolute()),
            },
            "inputs": INPUT_SPECS,
            "outputs": output_specs(mode),
            "fusion": [{"batchnorm": "bn", "into": None, "op": None, "folded": False, "reason": "no preceding conv"}],
            "kernels": [],
            "versions": {"tvm": tvm.__version__, "bndeploy": "0.1.0"},
        },
    )


BAD_CHANNEL = 1


def _build(mode: str, running_var: str = "onnx", bad_channel: bool = False):
    def build(c: Case) -> None:
        p = parameters()
        write_export(c.export_dir, mode, p)
        compiled = {k: v.copy() for k, v in p.items()}
        if bad_channel:  # a wrong scale in one channel, as a broken fold would produce
            compiled["scale"][BAD_CHANNEL] += 0.5
        write_artifact(c.artifact_dir, c.export_dir, mode, compiled, running_var)

    return build


_BUILDERS = {
    "inference": _build("inference"),
    "train": _build("train"),
    "bad_channel": _build("inference", bad_channel=True),
    "train_torch_var": _build("train", running_var="torch"),
}


def edit_manifest(artifact_dir: Path, **changes) -> None:
    """Change top-level artifact.json fields (a dict value is merged one level deep)."""
    path = artifact_dir / "artifact.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        manifest[key] = manifest.get(key, {}) | value if isinstance(value, dict) else value
    path.write_text(json.dumps(manifest))


def copy_case(built: Case, to: Path) -> Case:
    """Private copies of both directories, the artifact's source paths pointing at the copied export."""
    copied = Case(Path(shutil.copytree(built.export_dir, to / "export")), built.copy_artifact(to))
    edit_manifest(
        copied.artifact_dir,
        source={"onnx": str(copied.export_dir / "model.onnx"), "export_manifest": str(copied.export_dir / "export.json")},
    )
    return copied


# Module-scoped artifacts of the cases above, shared by the check and runner tests (import them by name).
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def inference(root):
    return case(root, "inference")


@pytest.fixture(scope="module")
def train(root):
    return case(root, "train")


@pytest.fixture(scope="module")
def bad_channel(root):
    return case(root, "bad_channel")
