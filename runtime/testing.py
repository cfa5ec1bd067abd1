"""pytest helper: ``assert_artifact_matches(artifact_dir)`` fails with the check's summary table."""

from __future__ import annotations

from pathlib import Path

from bndeploy.runtime.check import check
from bndeploy.runtime.report import Report


def assert_artifact_matches(artifact_dir: str | Path, **kwargs) -> Report:
    """Run ``check(artifact_dir, **kwargs)``; raise AssertionError(summary table) on any mismatch."""
    __tracebackhide__ = True
    report = check(artifact_dir, **kwargs)
    if not report.passed:
        raise AssertionError("\n" + report.summary())
    return report
