"""bndeploy.runtime: load compiled artifacts, run them, and check them against the references.

Imports only TVM's runtime and numpy (onnxruntime lazily, for the "onnxruntime" reference), so it
runs on an edge device that has neither torch nor onnx.
"""

from bndeploy.compare import Comparison, compare
from bndeploy.runtime.artifact import Artifact, load_artifact
from bndeploy.runtime.check import GoldenOutput, check, choose_inputs
from bndeploy.runtime.images import ImagePreprocessing
from bndeploy.runtime.inputs import generate_inputs, load_inputs_file, validate_inputs
from bndeploy.runtime.report import Report
from bndeploy.runtime.runners import IntermediatesUnsupported, OnnxRuntimeRunner, RecordedTorchRunner, Runner
from bndeploy.runtime.samples import DataLoader, InputsDir
from bndeploy.runtime.testing import assert_artifact_matches
from bndeploy.tolerance import FP16, FP32_INFERENCE, FP32_TRAIN, Tolerance, Tolerances, default_tolerance

__all__ = [
    "Artifact",
    "Comparison",
    "DataLoader",
    "FP16",
    "FP32_INFERENCE",
    "FP32_TRAIN",
    "GoldenOutput",
    "ImagePreprocessing",
    "InputsDir",
    "IntermediatesUnsupported",
    "OnnxRuntimeRunner",
    "RecordedTorchRunner",
    "Report",
    "Runner",
    "Tolerance",
    "Tolerances",
    "assert_artifact_matches",
    "check",
    "choose_inputs",
    "compare",
    "default_tolerance",
    "generate_inputs",
    "load_artifact",
    "load_inputs_file",
    "validate_inputs",
]
