"""One owner for the on-disk format (bndeploy.layout) and for the exit codes (bndeploy.errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from bndeploy import layout
from bndeploy.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
FILE_NAMES = {layout.ONNX_FILE, layout.EXPORT_MANIFEST, layout.REFERENCE_FILE, layout.LIBRARY_FILE,
              layout.ARTIFACT_MANIFEST, layout.GOLDEN_MANIFEST}


def package_sources() -> list[Path]:
    """Every Python file that ships in bndeploy's wheel."""
    return sorted(p for folder in ("bndeploy", "export", "compile", "runtime") for p in (REPO / folder).rglob("*.py"))


def string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def assigned_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_only_layout_spells_the_file_names():
    spelled = {str(p.relative_to(REPO)): sorted(string_constants(p) & FILE_NAMES) for p in package_sources()}
    assert {path: names for path, names in spelled.items() if names} == {"bndeploy/layout.py": sorted(FILE_NAMES)}


def test_exit_codes_have_one_definition():
    defining = [str(p.relative_to(REPO)) for p in package_sources() if any(n.startswith("EXIT_") for n in assigned_names(p))]
    assert defining == ["bndeploy/errors.py"]


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


STAGES = {"export": "bndeploy.export", "compile": "bndeploy.compile", "runtime": "bndeploy.runtime"}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_do_not_import_each_other(stage):
    """They talk through directories; what they share (format, numerics, errors) lives in bndeploy/."""
    others = [package for name, package in STAGES.items() if name != stage]
    crossing = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.startswith(tuple(others)))
                for p in (REPO / stage).rglob("*.py")}
    assert {path: modules for path, modules in crossing.items() if modules} == {}
