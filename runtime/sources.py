"""What an artifact was compiled from: the source ONNX and the export's recorded references.

Both are found through artifact.json (``source.onnx``, ``source.export_manifest``) and verified by
sha256, so a reference that changed since the export is never silently compared against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bndeploy.errors import ArtifactError
from bndeploy.files import sha256_of
from bndeploy.layout import ARTIFACT_MANIFEST, EXPORT_KIND, INPUT, read_arrays, read_manifest, reference_key, strip_prefix
from bndeploy.runtime.specs import TensorSpec, specs_from_manifest


@dataclass
class ExportReferences:
    """An export's reference.npz: ``input/<name>``, ``torch/<output>``, ``spec/<output>``."""

    manifest_path: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    def inputs(self) -> dict[str, np.ndarray]:
        return strip_prefix(self.arrays, INPUT)

    def get(self, prefix: str, output: str) -> np.ndarray:
        return self.at(reference_key(prefix, output))

    def at(self, key: str) -> np.ndarray:
        """The array stored under ``key`` (e.g. "torch/y"), or an error listing what the file holds."""
        if key not in self.arrays:
            raise ArtifactError(f"{self.reference_path}: no {key!r} (it holds {', '.join(sorted(self.arrays))})")
        return self.arrays[key]

    def has(self, prefix: str, output: str) -> bool:
        return reference_key(prefix, output) in self.arrays

    @property
    def reference_path(self) -> Path:
        return self.manifest_path.parent / self.manifest["reference"]["file"]

    def outputs(self) -> list[TensorSpec]:
        return specs_from_manifest(self.manifest, "outputs", str(self.manifest_path))


def export_manifest_path(artifact_manifest: dict, artifact_dir: Path) -> Path:
    """The recorded export.json, or a clear error saying why the torch references cannot be found."""
    recorded = (artifact_manifest.get("source") or {}).get("export_manifest")
    if not recorded:
        raise ArtifactError(
            f"{artifact_dir / ARTIFACT_MANIFEST} records no export manifest (compiled from a bare ONNX file), so there "
            "are no torch references or recorded inputs: check against onnxruntime with inputs or a seed"
        )
    path = Path(recorded)
    if not path.is_file():
        raise ArtifactError(
            f"the export this artifact was compiled from is gone: {path} (source.export_manifest in "
            f"{artifact_dir / ARTIFACT_MANIFEST}); restore or re-export it, then re-compile"
        )
    return path


def load_export_references(artifact_manifest: dict, artifact_dir: Path) -> ExportReferences:
    path = export_manifest_path(artifact_manifest, artifact_dir)
    manifest = read_manifest(path, EXPORT_KIND)
    entry = manifest.get("reference") or {}
    if not entry.get("file"):
        raise ArtifactError(f"{path}: no reference file recorded")
    reference = path.parent / entry["file"]
    if not reference.is_file():
        raise ArtifactError(f"the export's references are gone: {reference} (listed in {path}); re-export the model")
    if entry.get("sha256") and sha256_of(reference) != entry["sha256"]:
        raise ArtifactError(f"{reference} changed since the export (sha256 differs from {path}); re-export the model")
    return ExportReferences(path, manifest, read_arrays(reference))


def source_onnx_path(artifact_manifest: dict, artifact_dir: Path) -> Path:
    """The ONNX model the artifact was compiled from, unchanged since (sha256), or a clear error."""
    source = artifact_manifest.get("source") or {}
    if not source.get("onnx"):
        raise ArtifactError(f"{artifact_dir / ARTIFACT_MANIFEST} records no source ONNX model")
    path = Path(source["onnx"])
    if not path.is_file():
        raise ArtifactError(
            f"the ONNX model this artifact was compiled from is gone: {path} (source.onnx in "
            f"{artifact_dir / ARTIFACT_MANIFEST}); onnxruntime references need it"
        )
    recorded = source.get("onnx_sha256")
    if recorded and sha256_of(path) != recorded:
        raise ArtifactError(f"{path} changed since this artifact was compiled (sha256 differs); re-compile it")
    return path
