"""Asserting that an artifact matches its references, for pytest: the one owner of the failure message.

``assert_artifact_matches(artifact_dir)`` (a helper for a user's own tests) and the pytest plugin's items
(runtime/pytest_plugin.py) both fail through ``assert_report_passes``: an ``ArtifactMismatch`` whose message
is the check's summary table, followed by ``--locate``'s summary when asked, and whose ``headline`` is the
one line a CI test view shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bndeploy.errors import BndeployError
from bndeploy.runtime.check import check
from bndeploy.runtime.report import Report
from bndeploy.tolerance import Tolerance


class ArtifactMismatch(AssertionError):
    """A check that did not pass; ``str()`` is the report's summary (and the location, when one was asked for)."""

    def __init__(self, report: Report, location: str | None = None) -> None:
        self.report, self.location = report, location
        super().__init__(mismatch_text(report, location))

    @property
    def headline(self) -> str:
        worst = self.report.worst_element_line()
        return self.report.verdict() + (f"; worst element: {worst}" if worst else "")


def mismatch_text(report: Report, location: str | None = None) -> str:
    return report.summary() + (f"\n\n{location}" if location else "")


def assert_report_passes(report: Report, locate: Callable[[], str] | None = None) -> None:
    """Raise ArtifactMismatch for a report that did not pass; ``locate`` gives the location text then."""
    __tracebackhide__ = True
    if not report.passed:
        raise ArtifactMismatch(report, locate() if locate is not None else None)


def locate_summary(artifact_dir: str | Path, tolerance: Tolerance | None = None, device: str | None = None) -> str:
    """``check --locate``'s summary, or one line saying why the location could not be found."""
    from bndeploy.runtime.locate import LocateSettings, locate

    try:
        return locate(artifact_dir, device=device, settings=LocateSettings(tolerance=tolerance)).summary()
    except BndeployError as e:
        return f"locate: not possible for {artifact_dir}: {e}"


def assert_artifact_matches(artifact_dir: str | Path, locate: bool = False, **kwargs) -> Report:
    """Run ``check(artifact_dir, **kwargs)``; on any mismatch raise ArtifactMismatch (an AssertionError) whose
    message is the summary table, with ``locate=True`` followed by the first diverging ONNX node."""
    __tracebackhide__ = True
    report = check(artifact_dir, **kwargs)
    tolerances = kwargs.get("tolerances")
    tolerance = getattr(tolerances, "default", tolerances if isinstance(tolerances, Tolerance) else None)
    assert_report_passes(report, (lambda: locate_summary(artifact_dir, tolerance, kwargs.get("device")))
                         if locate else None)
    return report
