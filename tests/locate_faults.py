"""Faults injected into one compiled kernel (tests/test_locate.py, tests/test_pytest_plugin.py).

One BatchNorm's bias is changed in a copy of the ONNX model, that copy is compiled, and the artifact is
pointed back at the original model; every other kernel is the same, so exactly one kernel's output is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper

from bndeploy.compile import CompileSettings, compile_model
from bndeploy.files import sha256_of

SHORTCUT_BN = "stages.1.shortcut.bn"  # tiny-resnet: its conv+BN kernel has no epilogue, so its output is a boundary
BODY_BN = "stages.1.body.0.bn"  # tiny-resnet: fused with its ReLU, so it has no boundary of its own


def compile_cpu(onnx_path: Path, out: Path) -> Path:
    return compile_model(onnx_path, ["cpu"], out, CompileSettings(force=True))[0]


def with_faulty_batchnorm(export_dir: Path, batchnorm: str, out: Path) -> Path:
    """An artifact whose kernel for ``batchnorm`` adds 0.5 to channel 0, checked against the original model."""
    model = onnx.load(export_dir / "model.onnx")
    node = next(n for n in model.graph.node if n.name == batchnorm)
    bias = next(i for i in model.graph.initializer if i.name == node.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    (out / "faulty").mkdir(parents=True)
    onnx.save(model, out / "faulty" / "model.onnx")
    artifact = compile_cpu(out / "faulty" / "model.onnx", out / "artifact")
    manifest = json.loads((artifact / "artifact.json").read_text())
    manifest["source"].update(onnx=str(export_dir / "model.onnx"), onnx_sha256=sha256_of(export_dir / "model.onnx"),
                              export_manifest=str(export_dir / "export.json"))
    (artifact / "artifact.json").write_text(json.dumps(manifest))
    return artifact
