"""A check's result: every comparison and note, as a table for people and JSON/JUnit for machines."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from bndeploy.compare import Comparison
from bndeploy.errors import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK

if TYPE_CHECKING:
    from bndeploy.runtime.topk import TopKAgreement


@dataclass
class Report:
    artifact: str
    device: str
    target: str
    mode: str
    dtype: str
    inputs_source: str  # where the inputs came from, in words
    against: tuple[str, ...]
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # {"torch" | "onnxruntime": {"version": ..., "how": ...}}: what each reference was computed with
    references: dict[str, dict] = field(default_factory=dict)
    # Many samples (--inputs-dir, --data-loader, a golden): how many were compared, the ones that could not
    # be used ("NAME: why"), per output and reference the worst sample, and top-k agreement gates.
    samples: int = 1
    sample_errors: list[str] = field(default_factory=list)
    sample_results: list[dict] = field(default_factory=list)
    top_k: list["TopKAgreement"] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and not self.sample_errors and all(t.passed for t in self.top_k)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def exit_code(self) -> int:
        if self.sample_errors:
            return EXIT_ERROR
        return EXIT_OK if self.passed else EXIT_MISMATCH

    def summary(self) -> str:
        """The human-readable table (also the pytest helper's failure message)."""
        lines = [
            f"bndeploy check {self.artifact}",
            f"  target {self.target} on {self.device}, {self.mode} mode, {self.dtype}; inputs: {self.inputs_source}",
            *([f"  {self.references_line()}"] if self.references else []),
            "",
            *format_table(self.comparisons),
            *samples_lines(self),
        ]
        for failure in self.failures:
            lines.append("")
            lines.append(f"FAIL {failure.title}:")
            lines += ["  " + line for line in failure.details().splitlines()]
        if self.notes:
            lines.append("")
            lines += [f"note: {note}" for note in self.notes]
        lines.append("")
        lines.append(f"result: {verdict(self)}")
        return "\n".join(lines)

    def references_line(self) -> str:
        described = "; ".join(f"{name} {entry['version']} ({entry['how']})" for name, entry in self.references.items())
        return f"references: {described}"

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "device": self.device,
            "target": self.target,
            "mode": self.mode,
            "dtype": self.dtype,
            "inputs": self.inputs_source,
            "against": list(self.against),
            "references": self.references,
            "passed": self.passed,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "notes": self.notes,
            "samples": self.samples,
            "sample_results": self.sample_results,
            "sample_errors": self.sample_errors,
            "top_k": [t.to_dict() for t in self.top_k],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_junit(self, path: str | Path) -> None:
        ET.ElementTree(self.to_junit()).write(path, encoding="utf-8", xml_declaration=True)

    def to_junit(self) -> ET.Element:
        """One testsuite; one testcase per (output, reference); failures carry the details."""
        suites = ET.Element("testsuites")
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"bndeploy check {self.artifact}",
            tests=str(len(self.comparisons)),
            failures=str(len(self.failures)),
            errors="0",
        )
        if self.references:
            properties = ET.SubElement(suite, "properties")
            for name, entry in self.references.items():
                ET.SubElement(properties, "property", name=f"reference.{name}.version", value=str(entry["version"]))
                ET.SubElement(properties, "property", name=f"reference.{name}.how", value=str(entry["how"]))
        for comparison in self.comparisons:
            case = ET.SubElement(
                suite, "testcase", classname=f"bndeploy.check.{comparison.reference}", name=comparison.title
            )
            if not comparison.passed:
                failure = ET.SubElement(case, "failure", message=comparison.details().splitlines()[0])
                failure.text = comparison.details()
            ET.SubElement(case, "system-out").text = _case_figures(comparison)
        _junit_samples(self, suite)
        if self.notes:
            ET.SubElement(suite, "system-out").text = "\n".join(self.notes)
        return suites

    def write_html(self, path: str | Path) -> None:
        from bndeploy.runtime.html import render_html

        Path(path).write_text(render_html(self))


def verdict(report: Report) -> str:
    if report.sample_errors:
        return f"ERROR ({len(report.sample_errors)} sample(s) could not be used; {report.samples} compared)"
    if report.passed:
        return "PASS"
    failed_gates = sum(not t.passed for t in report.top_k)
    gates = f", {failed_gates} of {len(report.top_k)} top-k gates" if report.top_k else ""
    return f"FAIL ({len(report.failures)} of {len(report.comparisons)} comparisons{gates})"


def samples_lines(report: Report) -> list[str]:
    """Several samples: the worst one per output and reference, top-k agreement, the samples refused."""
    lines = []
    if report.sample_results or report.sample_errors:
        lines += ["", f"samples: {report.samples} compared (the table shows each output's worst sample)"]
    for r in report.sample_results:
        lines.append(f"  {r['output']} vs {r['reference']}: {r['failing']} of {r['samples']} samples fail; "
                     f"worst {r['worst_sample']} (max abs {r['worst_max_abs_error']:.2e})")
    if report.top_k:
        lines += [""] + [t.line() for t in report.top_k]
    lines += [f"ERROR sample {error}" for error in report.sample_errors]
    return lines


def _junit_samples(report: Report, suite: ET.Element) -> None:
    """A testcase per top-k gate, and an errored testcase per sample that could not be used."""
    for t in report.top_k:
        case = ET.SubElement(suite, "testcase", classname=f"bndeploy.check.{t.reference}", name=f"top-k {t.output}")
        if not t.passed:
            ET.SubElement(case, "failure", message=t.line())
    for error in report.sample_errors:
        case = ET.SubElement(suite, "testcase", classname="bndeploy.check.samples", name=error.split(":")[0])
        ET.SubElement(case, "error", message=error)
    suite.set("tests", str(len(report.comparisons) + len(report.top_k) + len(report.sample_errors)))
    suite.set("failures", str(len(report.failures) + sum(not t.passed for t in report.top_k)))
    suite.set("errors", str(len(report.sample_errors)))


COLUMNS = ("output", "vs", "max abs", "max rel", "outside tol", "atol/rtol", "result")


def format_table(comparisons: list[Comparison]) -> list[str]:
    rows = [COLUMNS] + [table_row(c) for c in comparisons]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def table_row(c: Comparison) -> tuple[str, ...]:
    if c.problem:
        return (c.output, c.reference, "-", "-", "-", str(c.tolerance), "FAIL (shape)")
    outside = f"{c.mismatches}/{c.total} ({c.mismatch_fraction:.1%})"
    if c.nan_mismatches or c.inf_mismatches:
        outside += f" incl. {c.nan_mismatches} NaN, {c.inf_mismatches} Inf"
    return (
        c.output,
        c.reference,
        f"{c.max_abs_error:.2e}",
        f"{c.max_rel_error:.2e}",
        outside,
        str(c.tolerance),
        "PASS" if c.passed else "FAIL",
    )


def _case_figures(c: Comparison) -> str:
    return (
        f"reference {c.reference_key}; max abs error {c.max_abs_error:.3g}; max rel error {c.max_rel_error:.3g}; "
        f"{c.mismatches}/{c.total} outside atol={c.tolerance.atol:g} rtol={c.tolerance.rtol:g}"
    )
