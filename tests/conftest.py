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


# --------------------------------------------------------------------------------------------------
# Hypothesis profiles (tests/test_properties.py). "ci", the default, is small and derandomized so CI
# is reproducible; BNDEPLOY_HYPOTHESIS_PROFILE=long explores far more of the parameter space.
# Every example exports, compiles and runs a model (about a second or more), hence deadline=None.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("BNDEPLOY_HYPOTHESIS_PROFILE", "ci"))
