"""The "onnxruntime" reference: an ONNX model run by ONNX Runtime's CPU provider, exactly as written.

ONNX Runtime rewrites a graph before it runs it (by default every optimization level: it folds
Conv+BatchNorm, fuses activations, folds constants), so a default session runs a fused model of its own.
A reference must be the ONNX graph as written, so every session here has graph optimizations disabled
(ORT_DISABLE_ALL). Export validation and ``bndeploy check`` both use it.

onnxruntime is imported only here, only when this reference is asked for, so the runtime itself works
on a device that has just TVM's runtime and numpy.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.extras import MissingDependencyError, missing_message

HOW = "run on the source ONNX with graph optimizations disabled (ORT_DISABLE_ALL): the graph as written"

# ORT type strings for the float inputs we may need to cast (fp16 artifact fed fp16 by the user).
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return None


def reference_session_options():
    """ORT session options for a reference: every graph optimization off, errors-only logging."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: no warnings about initializers or unused outputs
    return options


def reference_session(model: str | Path | bytes):
    """An ORT CPU session for ``model`` (a path or serialized bytes) running the graph as written."""
    ort = _import_onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, reference_session_options(), providers=["CPUExecutionProvider"])


def run_onnxruntime(model: str | Path | bytes, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model`` by name, computed by ORT on ``inputs`` (floats cast to the model's types)."""
    where = describe_model(model)
    try:
        session = reference_session(model)
    except BndeployError:
        raise
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        raise BndeployError(f"onnxruntime could not run {where}: {e}") from None
    return run_session(session, inputs, where)


def run_session(session, inputs: Mapping[str, np.ndarray], where: str,
                names: list[str] | None = None) -> dict[str, np.ndarray]:
    """``names`` (default: every graph output) computed by a reference session, by name."""
    try:
        feed = cast_to_model_types(session, inputs)
        names = names or [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    except BndeployError:
        raise
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        raise BndeployError(f"onnxruntime could not run {where}: {e}") from None


def describe_model(model: str | Path | bytes) -> str:
    return "the exported model" if isinstance(model, bytes) else str(model)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            missing_message("check", "the onnxruntime reference", ["onnxruntime"]) + "; or check against torch only (--against torch)"
        ) from None
    return onnxruntime


def cast_to_model_types(session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for model_input in session.get_inputs():
        array = inputs[model_input.name]
        wanted = _ORT_FLOAT_TYPES.get(model_input.type)
        if wanted is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(wanted)
        feed[model_input.name] = array
    return feed
