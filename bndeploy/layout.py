"""The on-disk format, owned here: file names, reference.npz keys, manifest kinds, the format version, and
the readers and writers of each. The stages talk only through these directories, so every stage reads and
writes them through this module (ARCHITECTURE.md describes the fields).

Export directory (``bndeploy export``, one per mode)::

    model.onnx      the ONNX model
    export.json     manifest of kind "export"
    reference.npz   input/<name>, torch/<output>, spec/<output>

Artifact directory (``bndeploy compile``, one per target)::

    model.so        the compiled library
    artifact.json   manifest of kind "artifact"
    dump/           only with --dump

Golden directory (``bndeploy check --save-golden``)::

    golden.json     manifest of kind "golden": provenance, the model's inputs/outputs, one entry per sample
    samples/        one .npz per sample: input/<name>, and <reference>/<output> per reference compared
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy import __version__
from bndeploy.errors import ArtifactError
from bndeploy.files import write_json

# Bumped when a manifest changes in a way older readers cannot handle.
FORMAT_VERSION = 1

EXPORT_KIND = "export"
ARTIFACT_KIND = "artifact"
GOLDEN_KIND = "golden"

# Export directory
ONNX_FILE = "model.onnx"
EXPORT_MANIFEST = "export.json"
REFERENCE_FILE = "reference.npz"

# Artifact directory
LIBRARY_FILE = "model.so"
ARTIFACT_MANIFEST = "artifact.json"
DUMP_DIR = "dump"
ASSEMBLY_DUMP = "library.s"  # under DUMP_DIR: a CPU library's assembly (compile --dump)

# Golden directory
GOLDEN_MANIFEST = "golden.json"
GOLDEN_SAMPLES_DIR = "samples"

# reference.npz key prefixes: the recorded inputs, what PyTorch produced, what the ONNX spec prescribes
# (running statistics of a train-mode export only).
INPUT, TORCH, SPEC = "input", "torch", "spec"


# --------------------------------------------------------------------------------------------------
# reference.npz


def reference_key(prefix: str, name: str) -> str:
    """``torch/y`` for the prefix ``torch`` and the tensor ``y``."""
    return f"{prefix}/{name}"


def with_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {reference_key(prefix, name): value for name, value in arrays.items()}


def strip_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays stored under ``prefix``, keyed by tensor name."""
    start = reference_key(prefix, "")
    return {key[len(start):]: value for key, value in arrays.items() if key.startswith(start)}


def has_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> bool:
    return any(key.startswith(reference_key(prefix, "")) for key in arrays)


def write_reference(path: str | os.PathLike, inputs: Mapping[str, np.ndarray], torch: Mapping[str, np.ndarray],
                    spec: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **with_prefix(INPUT, inputs), **with_prefix(TORCH, torch), **with_prefix(SPEC, spec))


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles), or ArtifactError saying why it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Golden samples


def golden_sample_file(index: int) -> str:
    """A golden sample's path relative to the golden directory (what golden.json records)."""
    return f"{GOLDEN_SAMPLES_DIR}/{index:06d}.npz"


def write_golden_sample(path: str | os.PathLike, inputs: Mapping[str, np.ndarray],
                        expected: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """``input/<name>`` for each input, ``<reference>/<output>`` for what each reference produced."""
    arrays = with_prefix(INPUT, inputs)
    for reference, outputs in expected.items():
        arrays |= with_prefix(reference, outputs)
    np.savez(path, **arrays)


# --------------------------------------------------------------------------------------------------
# Manifests


def manifest_header(kind: str) -> dict:
    return {"kind": kind, "format": FORMAT_VERSION, "bndeploy_version": __version__}


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    write_json(path, manifest)


def read_manifest(path: str | os.PathLike, kind: str) -> dict:
    """Read a bndeploy manifest of the given kind (EXPORT_KIND, ARTIFACT_KIND or GOLDEN_KIND), refusing foreign or newer ones."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise ArtifactError(f"{path}: not a bndeploy {kind} manifest")
    fmt = data.get("format")
    if fmt != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: manifest format {fmt!r} written by bndeploy {data.get('bndeploy_version', '?')}; "
            f"this bndeploy {__version__} reads format {FORMAT_VERSION}: re-create it with this version"
        )
    return data


def read_artifact_manifest(directory: str | os.PathLike) -> dict:
    return read_manifest(Path(directory) / ARTIFACT_MANIFEST, ARTIFACT_KIND)


def read_export_manifest(directory: str | os.PathLike) -> dict:
    return read_manifest(Path(directory) / EXPORT_MANIFEST, EXPORT_KIND)


def read_golden_manifest(directory: str | os.PathLike) -> dict:
    return read_manifest(Path(directory) / GOLDEN_MANIFEST, GOLDEN_KIND)


def recorded_library_sha256(directory: str | os.PathLike) -> str:
    """The library sha256 an artifact's artifact.json records (what a device's allowlist approves)."""
    path = Path(directory) / ARTIFACT_MANIFEST
    digest = str((read_artifact_manifest(directory).get("library") or {}).get("sha256", ""))
    if len(digest) != 64:
        raise ArtifactError(f"{path}: no library sha256 recorded")
    return digest.lower()
