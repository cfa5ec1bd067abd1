"""A check's result: every comparison and note, as a table for people and JSON/JUnit for machines."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from bndeploy.compare import Comparison
from bndeploy.errors import EXIT_MISMATCH, EXIT_OK


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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_MISMATCH

    def summary(self) -> str:
        """The human-readable table (also the pytest helper's failure message)."""
        lines = [
            f"bndeploy check {self.artifact}",
            f"  target {self.target} on {self.device}, {self.mode} mode, {self.dtype}; inputs: {self.inputs_source}",
            *([f"  {self.references_line()}"] if self.references else []),
            "",
            *format_table(self.comparisons),
        ]
        for failure in self.failures:
            lines.append("")
            lines.append(f"FAIL {failure.title}:")
            lines += ["  " + line for line in failure.details().splitlines()]
        if self.notes:
            lines.append("")
            lines += [f"note: {note}" for note in self.notes]
        lines.append("")
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} of {len(self.comparisons)} comparisons)"
        lines.append(f"result: {verdict}")
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
        if self.notes:
            ET.SubElement(suite, "system-out").text = "\n".join(self.notes)
        return suites

    def write_html(self, path: str | Path) -> None:
        from bndeploy.runtime.html import render_html

        Path(path).write_text(render_html(self))


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
