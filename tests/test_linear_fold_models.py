"""BatchNorm folded into the linear ops other than Conv, on the models of the issue that asked for it:
a DCGAN-style generator (ConvTranspose2d -> BN -> ReLU) and an MLP head (Linear -> BatchNorm1d -> ReLU),
exported by bndeploy in both modes, compiled for the CPU, checked against torch and ONNX Runtime.

The per-form numerics (ConvTranspose 1d/2d/3d, groups, strides, output_padding, dilation; Gemm transB,
alpha/beta, C; MatMul with the weight on either side; reshapes looked through; an axis that does not fold)
are compile_cases.linear_fold_cases, run by test_compile_numerics and test_compile_passes.
"""

from __future__ import annotations

import json

import pytest

from bndeploy.compile import compile_model
from bndeploy.runtime import check

# model: (op the BatchNorms fold into, how many, the bndeploy kernel each such op (and the last layer) runs in)
EXPECTED = {"dcgan-generator": ("ConvTranspose", 2, "bndeploy_col2im"), "mlp-head": ("Gemm/MatMul", 1, "bndeploy_dense")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_batchnorm_folds_into_the_linear_op_before_it(name, exported, tmp_path):
    kind, count, kernel = EXPECTED[name]
    (artifact,) = compile_model(exported(name)["inference"] / "model.onnx", ["cpu"], tmp_path / "inference")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert [(f["op"], f["folded"]) for f in manifest["fusion"]] == [(kind, True)] * count
    assert all(f["into"] for f in manifest["fusion"])
    # one kernel per linear op, its BN bias and activation fused in; no scale-and-shift pass of its own
    assert [k for k in manifest["kernels"] if "multiply" in k or "batch" in k] == []
    assert sum(kernel in k for k in manifest["kernels"]) == count + 1
    assert check(artifact).passed


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_mode_is_not_folded_and_says_why(name, exported, tmp_path):
    (artifact,) = compile_model(exported(name)["train"] / "model.onnx", ["cpu"], tmp_path / "train")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["fusion"] and not any(f["folded"] for f in manifest["fusion"])
    assert all(f["reason"].startswith("training mode") and f["op"] == EXPECTED[name][0] for f in manifest["fusion"])
    assert check(artifact).passed
