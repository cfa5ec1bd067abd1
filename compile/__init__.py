"""Compile stage: ONNX -> TVM Relax (bndeploy's BatchNorm passes) -> CPU / CUDA artifact directories."""

from bndeploy.extras import require

require("compile", "bndeploy.compile")  # onnx comes with the extra: one clear line instead of a traceback

from .compiler import CompileSettings, compile_model, kernel_names, load_source, lower_to_relax
from .passes import fusion_report, rewrite_batchnorms
from .targets import TargetSpec, known_target_names, resolve_target

__all__ = [
    "CompileSettings",
    "TargetSpec",
    "compile_model",
    "fusion_report",
    "kernel_names",
    "known_target_names",
    "load_source",
    "lower_to_relax",
    "resolve_target",
    "rewrite_batchnorms",
]
