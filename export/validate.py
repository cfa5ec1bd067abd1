"""Every export is checked before it is written: ONNX checker, shape inference, ONNX Runtime vs torch."""

from __future__ import annotations

import numpy as np
import onnx

from bndeploy.errors import BndeployError
from bndeploy.export.reference import ReferenceRun

# ORT and torch both compute in fp32 but with different kernels (conv algorithm, reduction order), so
# they differ by a few fp32 ulps of the largest intermediate; 1e-4 absolute + 1e-4 relative covers the
# reference CNN (logits of magnitude ~10, reductions over <= 1152 terms) with a wide margin, while any
# semantic error (wrong momentum, eps, variance kind, mode) is orders of magnitude larger.
ATOL = 1e-4
RTOL = 1e-4


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


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0))


def within_tolerance(actual: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.allclose(actual, expected, atol=ATOL, rtol=RTOL, equal_nan=True))


def compare_with_reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray], reference: ReferenceRun) -> dict:
    """ONNX Runtime vs torch (outputs, running_mean) and vs the ONNX spec (running statistics).

    Raises ExportValidationError on a mismatch; returns the figures recorded in export.json, including
    the size of the population-vs-unbiased running_var difference between torch and the ONNX spec.
    """
    ort_out = run_onnxruntime(model, inputs)
    figures, failures = {}, []
    for name, actual in ort_out.items():
        expected = reference.spec.get(name, reference.outputs[name])
        against = "onnx_spec" if name in reference.spec else "torch"
        entry = {"against": against, "max_abs_error": max_abs_error(actual, expected)}
        if name in reference.spec:
            entry["torch_minus_spec_max_abs"] = max_abs_error(reference.outputs[name], reference.spec[name])
        figures[name] = entry
        if actual.shape != expected.shape or not within_tolerance(actual, expected):
            failures.append(f"{name}: onnxruntime vs {against} max |error| {entry['max_abs_error']:.3g} "
                            f"(tolerance atol={ATOL}, rtol={RTOL})")
    if failures:
        raise ExportValidationError("exported ONNX does not match the torch model: " + "; ".join(failures))
    return {"tolerance": {"atol": ATOL, "rtol": RTOL}, "onnxruntime": figures}
