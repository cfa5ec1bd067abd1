"""bndeploy: PyTorch BatchNorm networks -> ONNX -> TVM artifacts, checked against the references.

The three stages live in ``bndeploy.export``, ``bndeploy.compile`` and ``bndeploy.runtime`` and talk
only through files: an export directory (model.onnx, export.json, reference.npz) and an artifact
directory (the compiled library and artifact.json).
"""

__version__ = "0.1.0"
