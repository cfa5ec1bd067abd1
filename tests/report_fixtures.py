"""Synthetic check reports shaped like a real train-mode network (no compile, no TVM): one model output and
a running_mean/running_var pair per BatchNorm, each compared against torch and onnxruntime."""

from __future__ import annotations

import numpy as np

from bndeploy.compare import Gate, compare
from bndeploy.runtime.report import Report
from bndeploy.runtime.specs import TensorSpec
from bndeploy.tolerance import FP32_TRAIN

REFERENCES = ("torch", "onnxruntime")


def network_report(batchnorms: int, channels: int = 64, seed: int = 0, failing: dict[str, float] | None = None,
                   gate: Gate = Gate()) -> Report:
    """A train-mode report over ``batchnorms`` BatchNorms. Errors are random and well inside FP32_TRAIN except
    ``failing``: {output name: factor}, whose artifact values are off by factor * the tolerance's allowance."""
    rng = np.random.default_rng(seed)
    failing = failing or {}
    outputs = [TensorSpec("output", (8, 1000), "float32", role="output")]
    for i in range(batchnorms):
        label = f"layer{i // 4 + 1}.{i % 4}.bn"
        for stat in ("running_mean", "running_var"):
            outputs.append(TensorSpec(f"{label}.{stat}_updated", (channels,), "float32", role=stat,
                                      batchnorm=label, batch_count=8 * 14 * 14))
    report = Report("/art/net-train/cpu", "cpu", "cpu", "train", "float32",
                    "the export's recorded inputs (reference.npz)", REFERENCES, outputs=outputs, gate=gate)
    for spec in outputs:
        expected = rng.normal(1.0 if spec.role == "running_var" else 0.0, 0.5, spec.shape)
        if spec.role == "running_var":
            expected = np.abs(expected) + 0.1
        allowed = FP32_TRAIN.atol + FP32_TRAIN.rtol * np.abs(expected)
        # error grows with depth, as a real network's does, and stays below a quarter of the allowance
        depth_scale = 0.01 + 0.2 * len(report.comparisons) / (4 * batchnorms + 2)
        for reference in REFERENCES:
            error = allowed * rng.uniform(-depth_scale, depth_scale, spec.shape)
            if spec.name in failing:
                error[..., 0] = allowed[..., 0] * failing[spec.name]
            actual = (expected + error).astype(np.float32)
            key = f"torch/{spec.name}" if reference == "torch" else reference
            report.comparisons.append(compare(actual, expected.astype(np.float32).astype(np.float64), FP32_TRAIN,
                                              spec.name, reference, key, gate))
    report.notes.append("running_var: ONNX uses the population variance, PyTorch the unbiased one (n/(n-1), n=1568): "
                        f"torch's own value differs from the ONNX spec by max 1e-05 to 3e-03 over {batchnorms} BatchNorms "
                        "[the artifact follows the ONNX spec, so it is compared against spec/<name>]")
    report.running_var_gaps = [{"output": s.name, "batch_count": s.batch_count, "max_gap": 1e-5 * (i + 1)}
                               for i, s in enumerate(o for o in outputs if o.role == "running_var")]
    return report
