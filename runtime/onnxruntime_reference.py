"""The "onnxruntime" reference: the source ONNX model run by ONNX Runtime's CPU provider.

onnxruntime is imported only here, only when this reference is asked for, so the runtime itself
works on a device that has just TVM's runtime and numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.extras import MissingDependencyError, missing_message

# ORT type strings for the float inputs we may need to cast (fp16 artifact fed fp16 by the user).
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def run_onnxruntime(onnx_path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            missing_message("check", "the onnxruntime reference", ["onnxruntime"]) + "; or check against torch only (--against torch)"
        ) from None
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feed = _cast_to_model_types(session, inputs)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        raise BndeployError(f"onnxruntime could not run {onnx_path}: {e}") from None


def _cast_to_model_types(session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for model_input in session.get_inputs():
        array = inputs[model_input.name]
        wanted = _ORT_FLOAT_TYPES.get(model_input.type)
        if wanted is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(wanted)
        feed[model_input.name] = array
    return feed
