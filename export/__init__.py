"""Export stage: PyTorch BatchNorm models -> spec-faithful ONNX (inference and train mode) + references."""

from bndeploy.extras import require

require("export", "bndeploy.export")  # torch & co. come with the extra: one clear line instead of a traceback

from bndeploy.export.exporter import MODES, TRAIN_DROPOUT, ExportSettings, ModeNotWrittenError, export
from bndeploy.export.loader import LoadedModel, load_model, parse_shape
from bndeploy.export.models import DEFAULT_PIPELINE_MODELS, REFERENCE_MODELS

__all__ = ["MODES", "TRAIN_DROPOUT", "ExportSettings", "ModeNotWrittenError", "export", "LoadedModel", "load_model", "parse_shape",
           "REFERENCE_MODELS", "DEFAULT_PIPELINE_MODELS"]
