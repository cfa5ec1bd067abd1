"""One owner for the on-disk format (bndeploy.layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from bndeploy import layout
from bndeploy.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
FILE_NAMES = {layout.ONNX_FILE, layout.EXPORT_MANIFEST, layout.REFERENCE_FILE, layout.LIBRARY_FILE,
              layout.ARTIFACT_MANIFEST}


def package_sources() -> list[Path]:
    """Every Python file that ships in bndeploy's wheel."""
    return sorted(p for folder in ("bndeploy", "export", "compile", "runtime") for p in (REPO / folder).rglob("*.py"))


def string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_only_layout_spells_the_file_names():
    spelled = {str(p.relative_to(REPO)): sorted(string_constants(p) & FILE_NAMES) for p in package_sources()}
    assert {path: names for path, names in spelled.items() if names} == {"bndeploy/layout.py": sorted(FILE_NAMES)}


def test_former_compile_names_are_the_layouts():
    from bndeploy.compile.compiler import DUMP_DIR, EXPORT_MANIFEST_FILE, LIBRARY_FILE, MANIFEST_FILE

    assert (LIBRARY_FILE, MANIFEST_FILE, EXPORT_MANIFEST_FILE, DUMP_DIR) == (
        layout.LIBRARY_FILE, layout.ARTIFACT_MANIFEST, layout.EXPORT_MANIFEST, layout.DUMP_DIR)


def test_reference_file_round_trip(tmp_path):
    x, y, rv = np.arange(6.0).reshape(2, 3), np.ones(3), np.full(3, 0.5)
    layout.write_reference(tmp_path / layout.REFERENCE_FILE, {"x": x}, {"y": y, "bn.rv": rv * 2}, {"bn.rv": rv})
    arrays = layout.read_arrays(tmp_path / layout.REFERENCE_FILE)
    assert sorted(arrays) == ["input/x", "spec/bn.rv", "torch/bn.rv", "torch/y"]
    assert layout.strip_prefix(arrays, layout.SPEC) == {"bn.rv": pytest.approx(rv)}
    np.testing.assert_array_equal(layout.strip_prefix(arrays, layout.INPUT)["x"], x)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="cannot read .*bad.npz"):
        layout.read_arrays(tmp_path / "bad.npz")


def test_manifests_carry_their_kind_and_format(tmp_path):
    layout.write_manifest(tmp_path / layout.ARTIFACT_MANIFEST, layout.manifest_header(layout.ARTIFACT_KIND) | {"a": 1})
    assert layout.read_artifact_manifest(tmp_path)["a"] == 1
    with pytest.raises(ArtifactError, match="not a bndeploy export manifest"):
        layout.read_manifest(tmp_path / layout.ARTIFACT_MANIFEST, layout.EXPORT_KIND)
    newer = layout.manifest_header(layout.EXPORT_KIND) | {"format": layout.FORMAT_VERSION + 1}
    layout.write_manifest(tmp_path / layout.EXPORT_MANIFEST, newer)
    with pytest.raises(ArtifactError, match=f"reads format {layout.FORMAT_VERSION}: re-create it"):
        layout.read_export_manifest(tmp_path)
