"""Every export is checked before it is written: ONNX checker, shape inference, ONNX Runtime vs torch.

The comparison and the tolerance are the runtime's (``bndeploy.runtime.compare``, ``FP32_TRAIN``): ORT and
torch both compute in fp32 with different kernels and reduction orders, the same situation a train-mode
artifact is checked in, and any semantic error (momentum, epsilon, variance kind, mode) is orders of
magnitude larger.
"""

from __future__ import annotations

import numpy as np
import onnx

from bndeploy.errors import BndeployError
from bndeploy.export.reference import ReferenceRun
from bndeploy.runtime.compare import compare
from bndeploy.runtime.tolerance import FP32_TRAIN as TOLERANCE


class ExportValidationError(BndeployError):
    """The exported ONNX does not reproduce the torch model; nothing was written."""


def check_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full ONNX checker plus strict shape inference; returns the model with inferred shapes."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportValidationError(f"exported ONNX is invalid: {e}") from e


def run_onnxruntime(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def compare_with_reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray], reference: ReferenceRun) -> dict:
    """ONNX Runtime vs torch (outputs, running_mean) and vs the ONNX spec (running statistics).

    Raises ExportValidationError on a mismatch; returns the figures recorded in export.json, including
    the size of the population-vs-unbiased running_var difference between torch and the ONNX spec.
    """
    figures, failures = {}, []
    for name, actual in run_onnxruntime(model, inputs).items():
        key = f"spec/{name}" if name in reference.spec else f"torch/{name}"
        expected = reference.spec.get(name, reference.outputs[name])
        result = compare(actual, expected, TOLERANCE, name, "onnxruntime", key)
        entry = {"against": key, "max_abs_error": result.max_abs_error}
        if name in reference.spec:
            entry["torch_minus_spec_max_abs"] = float(np.abs(reference.outputs[name].astype(np.float64) - expected).max())
        figures[name] = entry
        if not result.passed:
            failures.append(f"{name}: {result.details().splitlines()[0]}")
    if failures:
        raise ExportValidationError("exported ONNX does not match the torch model: " + "; ".join(failures))
    return {"tolerance": TOLERANCE.to_dict(), "onnxruntime": figures}
