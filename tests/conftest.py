"""Shared fixtures: reference models are exported once per test session (both modes) and reused."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def exported(export_root):
    """exported(name) -> {mode: export dir}; each reference model is exported at most once per session."""
    from bndeploy.export import ExportSettings, export, load_model

    cache: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in cache:
            cache[name] = export(load_model(name), export_root / name, ExportSettings())
        return cache[name]

    return get
