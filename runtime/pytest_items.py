"""The pytest plugin's session side (``pytest --bndeploy DIR``; bndeploy/pytest_plugin.py loads it only then):
compiled artifacts become test items, so ``--junitxml`` and a CI system's test view list them.

One item per (artifact, reference), named ``<artifact dir>::<reference>`` (``art/resnet18-train::onnxruntime``).
The check runs once per artifact, when its first item runs (every reference and the artifact run once);
the other items read the cached ``Report``, narrowed to their reference (``Report.for_reference``). A
failure prints that report's summary table, and with ``--bndeploy-locate`` the first diverging ONNX node
(runtime/testing.py owns the message; runtime/locate.py finds the node). A directory whose manifest cannot
be read is a collection error in one line; an artifact that cannot be checked (a tampered library, a
missing reference) fails each of its items in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from bndeploy.compare import DEFAULT_ERROR_QUANTILE, Gate
from bndeploy.errors import BndeployError
from bndeploy.files import atomic_file
from bndeploy.layout import ARTIFACT_MANIFEST, read_artifact_manifest
from bndeploy.runtime.check import REFERENCES, check, parse_against, reference_names
from bndeploy.runtime.cli import tolerances_from_options
from bndeploy.runtime.report import Report
from bndeploy.runtime.testing import ArtifactMismatch, assert_report_passes, locate_summary
from bndeploy.tolerance import Tolerance


def start_session(config: pytest.Config, roots: list[str]) -> None:
    """Register the artifact collector for this session and make the artifacts its collection arguments."""
    try:
        settings = settings_from_options(config, roots)
    except BndeployError as e:
        raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(ArtifactChecks(settings), "bndeploy-artifacts")
    collect_only_artifacts(config, settings.artifacts)


@dataclass(frozen=True)
class PluginSettings:
    """What the options ask for, checked at start-up."""

    artifacts: tuple[Path, ...]  # every artifact directory found under the --bndeploy paths, in order
    against: tuple[str, ...]
    atol: float | None = None
    rtol: float | None = None
    tol: tuple[str, ...] = ()
    gate: Gate = Gate()
    locate: bool = False
    html: Path | None = None


def settings_from_options(config: pytest.Config, roots: list[str]) -> PluginSettings:
    against = parse_against(config.getoption("bndeploy_against") or ",".join(REFERENCES))
    quantile = config.getoption("bndeploy_error_quantile")
    html = config.getoption("bndeploy_html")
    return PluginSettings(
        artifacts=tuple(directory for root in roots for directory in find_artifacts(Path(root))),
        against=against,
        atol=config.getoption("bndeploy_atol"),
        rtol=config.getoption("bndeploy_rtol"),
        tol=tuple(config.getoption("bndeploy_tol")),
        gate=Gate(config.getoption("bndeploy_check_stat"), DEFAULT_ERROR_QUANTILE if quantile is None else quantile),
        locate=config.getoption("bndeploy_locate"),
        html=Path(html).absolute() if html else None,
    )


def find_artifacts(root: Path) -> list[Path]:
    """``root`` itself when it holds artifact.json, else every directory under it that does (sorted)."""
    if not root.is_dir():
        raise BndeployError(f"--bndeploy {root}: no such directory (give an artifact directory or a folder of them)")
    if (root / ARTIFACT_MANIFEST).is_file():
        return [root.absolute()]
    found = sorted(p.parent.absolute() for p in root.rglob(ARTIFACT_MANIFEST))
    if not found:
        raise BndeployError(f"--bndeploy {root}: no {ARTIFACT_MANIFEST} under it; compile artifacts into it with "
                            "`bndeploy compile MODEL.onnx --target cpu --out DIR`")
    return found


def collect_only_artifacts(config: pytest.Config, artifacts: tuple[Path, ...]) -> None:
    """The artifacts become collection arguments; with no test paths on the command line they are the only
    ones (not the testpaths or the current directory)."""
    given = config.args_source == pytest.Config.ArgsSource.ARGS
    paths = [str(p) for p in artifacts]
    config.args = [*config.args, *(p for p in paths if p not in config.args)] if given else paths


class ArtifactChecks:
    """Registered for a session with --bndeploy: collects artifact directories and runs each check once."""

    def __init__(self, settings: PluginSettings) -> None:
        self.settings = settings
        self.artifacts = set(settings.artifacts)
        self.outcomes: dict[Path, CheckOutcome] = {}
        self.locations: dict[Path, str] = {}
        self.html_written: list[Path] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector):
        if path.absolute() in self.artifacts:
            return ArtifactDirectory.from_parent(parent, path=path, checks=self)
        return None

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.html_written:
            terminalreporter.write_line(f"bndeploy: {len(self.html_written)} HTML report(s) in {self.settings.html}")

    def outcome(self, directory: Path) -> "CheckOutcome":
        """The check of one artifact, run by the first item that asks for it."""
        directory = directory.absolute()
        if directory not in self.outcomes:
            self.outcomes[directory] = self._run_check(directory)
        return self.outcomes[directory]

    def _run_check(self, directory: Path) -> "CheckOutcome":
        s = self.settings
        try:
            tolerances = tolerances_from_options(directory, s.atol, s.rtol, list(s.tol))
            report = check(directory, against=s.against, tolerances=tolerances, gate=s.gate)
        except BndeployError as e:
            return CheckOutcome(error=str(e))
        outcome = CheckOutcome(report=report, tolerance=tolerances.default if tolerances else None)
        if s.html is not None:
            outcome.html = self._write_html(directory, report)
        return outcome

    def _write_html(self, directory: Path, report: Report) -> Path:
        self.settings.html.mkdir(parents=True, exist_ok=True)
        path = self.settings.html / f"{report_name(directory)}.html"
        with atomic_file(path) as tmp:
            report.write_html(tmp)
        self.html_written.append(path)
        return path

    def location(self, directory: Path) -> str:
        """--bndeploy-locate's summary for a failing artifact (found once, shown by each failing item)."""
        directory = directory.absolute()
        if directory not in self.locations:
            self.locations[directory] = locate_summary(directory, self.outcome(directory).tolerance)
        return self.locations[directory]


def report_name(directory: Path) -> str:
    """A file name for an artifact's report: its path relative to the working directory, made flat."""
    try:
        shown = directory.relative_to(Path.cwd())
    except ValueError:
        shown = directory
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(shown)).strip("-.") or "artifact"


@dataclass
class CheckOutcome:
    report: Report | None = None  # None when the check could not run
    error: str | None = None  # why it could not (a BndeployError's message)
    tolerance: Tolerance | None = None  # the tolerance given for every output (locate uses it), None for the defaults
    html: Path | None = None


class ArtifactDirectory(pytest.Directory):
    """An artifact directory: one item per reference it is checked against."""

    def __init__(self, *, checks: ArtifactChecks, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checks = checks

    def collect(self):
        read_artifact_manifest(self.path)
        for reference in reference_names(self.checks.settings.against):
            yield ReferenceItem.from_parent(self, name=reference, reference=reference)

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(BndeployError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class ReferenceItem(pytest.Item):
    """One artifact against one reference: passes when every comparison with that reference passes."""

    def __init__(self, *, reference: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference = reference

    @property
    def checks(self) -> ArtifactChecks:
        return self.parent.checks

    def runtest(self) -> None:
        outcome = self.checks.outcome(self.path)
        if outcome.error is not None:
            raise BndeployError(outcome.error)
        report = outcome.report.for_reference(self.reference)
        self.user_properties += junit_properties(report, outcome.html)
        if not report.comparisons:
            pytest.skip(f"nothing compared against {self.reference}: " + ("; ".join(report.notes) or "no outputs"))
        assert_report_passes(report, (lambda: self.checks.location(self.path)) if self.checks.settings.locate else None)

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(ArtifactMismatch):
            return MismatchRepr(str(excinfo.value), excinfo.value.headline, self.path)
        if excinfo.errisinstance(BndeployError):
            return MismatchRepr(f"bndeploy: {excinfo.value}", str(excinfo.value), self.path)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.nodeid


def junit_properties(report: Report, html: Path | None) -> list[tuple[str, str]]:
    """Figures a CI view can show beside the item (JUnit <properties>)."""
    worst = max((c.margin for c in report.comparisons), default=0.0)
    properties = [("bndeploy.comparisons", str(len(report.comparisons))), ("bndeploy.failed", str(len(report.failures))),
                  ("bndeploy.max_margin", f"{worst:.3g}"), ("bndeploy.gate", report.gate.describe())]
    properties += [(f"bndeploy.reference.{k}.version", str(v.get("version"))) for k, v in report.references.items()]
    return properties + ([("bndeploy.html", str(html))] if html is not None else [])


@dataclass
class Crash:
    """What pytest's short summary and the JUnit failure message show: one line (pytest reads ``.message``)."""

    path: str
    lineno: int
    message: str


class MismatchRepr:
    """A failure's text without a Python traceback: the report (pytest prints ``toterminal``)."""

    def __init__(self, text: str, headline: str, path: Path) -> None:
        self.text = text
        self.reprcrash = Crash(str(path), 0, headline)

    def toterminal(self, tw) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text
