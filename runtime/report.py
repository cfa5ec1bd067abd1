"""A check's result: every comparison and note, summarised for people (terminal, HTML) and kept whole for
machines (JSON, JUnit).

A person reads the answer first: the summary (what was compared, the gate, pass/fail counts by kind, the
worst element: the one closest to failing, or furthest past it), then only what failed or came closest to its tolerance; ``verbose`` lists
everything. "Closest to its tolerance" is the comparison's margin (bndeploy.compare: the gate's statistic
of error / allowed, <= 1 passes); the same figure sorts the terminal table, expands HTML sections and is
written to the JSON. The per-output places (kind, BatchNorm, depth in the graph) come from the artifact's
output specs.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from bndeploy.compare import Comparison, Gate, json_float
from bndeploy.errors import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK
from bndeploy.runtime.specs import TensorSpec

if TYPE_CHECKING:
    from bndeploy.runtime.topk import TopKAgreement

# A passing comparison whose margin is at least this (its error is half of what is allowed, or more) is
# "near": the terminal lists it and the HTML report expands it, as it does failures.
NEAR_MARGIN = 0.5
# Without --verbose: how many failures the terminal table lists and explains, how many near misses it
# lists beside them, and how many of the closest passing comparisons when nothing failed or came near.
SHOWN_FAILURES = 8
EXPLAINED_FAILURES = 3
SHOWN_CLOSEST = 3
SHOWN_NEAR = 5
# A report with at most this many comparisons lists them all: it fits on a screen as it is.
SMALL_REPORT = 10
KINDS = ("output", "running_mean", "running_var")


@dataclass(frozen=True)
class Place:
    """Where a compared tensor sits: its kind, its BatchNorm, and that BatchNorm's depth in the graph."""

    name: str
    kind: str  # "output", "running_mean" or "running_var"
    batchnorm: str | None
    depth: int  # 1-based position of its BatchNorm among the graph's BatchNorms; model outputs after the last


def places_of(outputs: list[TensorSpec], names: list[str]) -> dict[str, Place]:
    """Places of every compared tensor. Train-mode exports list running statistics in graph order (one
    pair per BatchNorm node, in the ONNX graph's topological order), so that order is the depth."""
    depth_of: dict[str, int] = {}
    for spec in outputs:
        if spec.role in ("running_mean", "running_var") and spec.batchnorm is not None:
            depth_of.setdefault(spec.batchnorm, len(depth_of) + 1)
    specs = {spec.name: spec for spec in outputs}
    places = {}
    for name in dict.fromkeys([s.name for s in outputs] + names):
        spec = specs.get(name)
        if spec is not None and spec.role in ("running_mean", "running_var") and spec.batchnorm in depth_of:
            places[name] = Place(name, spec.role, spec.batchnorm, depth_of[spec.batchnorm])
        else:
            places[name] = Place(name, "output", None, len(depth_of) + 1)
    return places


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
    outputs: list[TensorSpec] = field(default_factory=list)  # the artifact's outputs, roles filled in
    gate: Gate = field(default_factory=Gate)
    # per BatchNorm: torch's unbiased running_var against the ONNX spec's (train mode; one note sums them up)
    running_var_gaps: list[dict] = field(default_factory=list)
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

    def for_reference(self, reference: str) -> "Report":
        """This report narrowed to one reference's comparisons (the pytest plugin's item per reference);
        notes, running_var gaps and samples that could not be used stay, as they concern every reference."""
        return dataclasses.replace(
            self,
            against=(reference,),
            comparisons=[c for c in self.comparisons if c.reference == reference],
            references={k: v for k, v in self.references.items() if k == reference},
            sample_results=[r for r in self.sample_results if r["reference"] == reference],
            top_k=[t for t in self.top_k if t.reference == reference],
        )

    def places(self) -> dict[str, Place]:
        return places_of(self.outputs, [c.output for c in self.comparisons])

    def by_depth(self) -> list[Comparison]:
        """Every comparison in graph order (BatchNorm depth, then the model outputs), references kept in order."""
        places = self.places()
        order = {name: i for i, name in enumerate(places)}
        return sorted(self.comparisons, key=lambda c: (places[c.output].depth, order[c.output]))

    def by_margin(self) -> list[Comparison]:
        """Failures first, then the rest; each from the highest margin (closest to failing) down."""
        return sorted(self.comparisons, key=lambda c: (c.passed, -_sortable(c.margin)))

    def attention(self) -> list[Comparison]:
        """What a person should look at: every failure and every near miss (margin >= NEAR_MARGIN)."""
        return [c for c in self.by_margin() if not c.passed or c.margin >= NEAR_MARGIN]

    def summary(self, verbose: bool = False) -> str:
        """The terminal report (also the pytest helper's failure message): the answer first, then the detail."""
        lines = [*self.header_lines(), "", *format_table(kind_rows(self), KIND_COLUMNS)]
        shown = self.by_depth() if verbose else self.shown_comparisons()
        if shown:
            lines += ["", self.shown_title(shown, verbose), *format_table([table_row(c) for c in shown], COLUMNS)]
            lines += ["", "error statistics (over finite elements):",
                      *format_table([statistics_row(c) for c in shown], statistics_columns(self.gate))]
        lines += samples_lines(self)
        explained = self.failures if verbose else self.by_margin()[: min(EXPLAINED_FAILURES, len(self.failures))]
        for failure in explained:
            lines += ["", f"FAIL {failure.title}:", *("  " + line for line in failure.details().splitlines())]
        if len(self.failures) > len(explained):
            lines += ["", f"({len(self.failures) - len(explained)} more failures explained with --verbose, "
                          "and in the JSON, JUnit and HTML reports)"]
        if self.notes:
            lines += ["", *(f"note: {note}" for note in self.notes)]
        if verbose and self.running_var_gaps:
            lines += ["", "running_var, torch's unbiased update minus the ONNX spec's, per BatchNorm:",
                      *(f"  {g['output']}: max {g['max_gap']:.3g} (n={g['batch_count']})" for g in self.running_var_gaps)]
        lines += ["", f"result: {self.verdict()}"]
        return "\n".join(lines)

    def header_lines(self) -> list[str]:
        lines = [
            f"bndeploy check {self.artifact}",
            f"  target {self.target} on {self.device}, {self.mode} mode, {self.dtype}; inputs: {self.inputs_source}",
            *([f"  {self.references_line()}"] if self.references else []),
            f"  compared: {self.compared_line()}",
            f"  gate: {self.gate.describe()}; tolerance (atol/rtol) {self.tolerances_line()}",
        ]
        worst = self.worst_element_line()
        return lines + ([f"  worst element: {worst}"] if worst else [])

    def compared_line(self) -> str:
        places = self.places()
        compared = {c.output for c in self.comparisons}
        counts = {kind: sum(1 for p in places.values() if p.kind == kind and p.name in compared) for kind in KINDS}
        batchnorms = {p.batchnorm for p in places.values() if p.batchnorm is not None and p.name in compared}
        what = _plural(counts["output"], "output")
        statistics = counts["running_mean"] + counts["running_var"]
        if statistics:
            what += f" and {_plural(statistics, 'running statistic')} of {_plural(len(batchnorms), 'BatchNorm')}"
        return (f"{what} against {' and '.join(self.against)}: {_plural(len(self.comparisons), 'comparison')}, "
                f"{len(self.comparisons) - len(self.failures)} pass, {len(self.failures)} fail")

    def tolerances_line(self) -> str:
        return ", ".join(dict.fromkeys(str(c.tolerance) for c in self.comparisons)) or "-"

    def worst_element_line(self) -> str | None:
        """The element with the highest error/allowed over every comparison; a shape or NaN/Inf failure first."""
        if not self.comparisons:
            return None
        top = max(self.comparisons, key=_element_severity)
        if top.problem:
            return f"{top.title}: {top.problem}"
        if top.nonfinite_mismatches:
            return f"{top.title}: NaN/Inf mismatch at {list(top.nonfinite_positions[0])}"
        stats = top.statistics
        if stats.tightest_index is None:
            return None
        return (f"{top.title} at {list(stats.tightest_index)}: artifact {stats.tightest_actual:.7g} vs reference "
                f"{stats.tightest_expected:.7g} (abs error {abs(stats.tightest_actual - stats.tightest_expected):.3g}, "
                f"error/allowed {stats.margin_max:.3g})")

    def shown_comparisons(self) -> list[Comparison]:
        """Without --verbose: the worst failures, then the near misses; with neither, the closest few
        (a small report: everything)."""
        if len(self.comparisons) <= SMALL_REPORT:
            return self.by_depth()
        ranked = self.by_margin()
        failed = [c for c in ranked if not c.passed][:SHOWN_FAILURES]
        passing = [c for c in ranked if c.passed]
        near = [c for c in passing if c.margin >= NEAR_MARGIN][:SHOWN_NEAR]
        return failed + near if failed or near else passing[:SHOWN_CLOSEST]

    def shown_title(self, shown: list[Comparison], verbose: bool) -> str:
        if verbose or len(shown) == len(self.comparisons):
            return f"every comparison, in graph order ({len(shown)}; margin = {self.gate.label} of error/allowed, <= 1 passes):"
        what = "failed and closest to tolerance" if self.failures else "closest to tolerance"
        return (f"{what} ({len(shown)} of {len(self.comparisons)}; margin = {self.gate.label} "
                f"of error/allowed, <= 1 passes; --verbose for all):")

    def verdict(self) -> str:
        if self.sample_errors:
            return f"ERROR ({len(self.sample_errors)} sample(s) could not be used; {self.samples} compared)"
        if self.passed:
            return f"PASS ({len(self.comparisons)} of {len(self.comparisons)} comparisons)"
        failed_gates = sum(not t.passed for t in self.top_k)
        gates = f", {failed_gates} of {len(self.top_k)} top-k gates" if self.top_k else ""
        return f"FAIL ({len(self.failures)} of {len(self.comparisons)} comparisons{gates})"

    def references_line(self) -> str:
        described = "; ".join(f"{name} {entry['version']} ({entry['how']})" for name, entry in self.references.items())
        return f"references: {described}"

    def to_dict(self) -> dict:
        places = self.places()
        return {
            "artifact": self.artifact,
            "device": self.device,
            "target": self.target,
            "mode": self.mode,
            "dtype": self.dtype,
            "inputs": self.inputs_source,
            "against": list(self.against),
            "references": self.references,
            "gate": self.gate.to_dict(),
            "passed": self.passed,
            "summary": {"comparisons": len(self.comparisons), "failed": len(self.failures), "near_margin": NEAR_MARGIN,
                        "by_kind": {kind: n | {"max_margin": json_float(n["max_margin"])}
                                    for kind, n in kind_counts(self).items()}},
            "outputs": [{"name": p.name, "kind": p.kind, "batchnorm": p.batchnorm, "depth": p.depth} for p in places.values()],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "running_var_gaps": self.running_var_gaps,
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
        """One testsuite; one testcase per (output, reference) with every figure; failures carry the details."""
        suites = ET.Element("testsuites")
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"bndeploy check {self.artifact}",
            tests=str(len(self.comparisons)),
            failures=str(len(self.failures)),
            errors="0",
        )
        properties = ET.SubElement(suite, "properties")
        for name, entry in self.references.items():
            ET.SubElement(properties, "property", name=f"reference.{name}.version", value=str(entry["version"]))
            ET.SubElement(properties, "property", name=f"reference.{name}.how", value=str(entry["how"]))
        ET.SubElement(properties, "property", name="gate", value=self.gate.describe())
        for comparison in self.comparisons:
            case = ET.SubElement(
                suite, "testcase", classname=f"bndeploy.check.{comparison.reference}", name=comparison.title
            )
            if not comparison.passed:
                failure = ET.SubElement(case, "failure", message=comparison.details().splitlines()[0])
                failure.text = comparison.details()
            ET.SubElement(case, "system-out").text = case_figures(comparison)
        _junit_samples(self, suite)
        suite_out = self.notes + [f"running_var gap {g['output']}: max {g['max_gap']!r} (n={g['batch_count']})"
                                  for g in self.running_var_gaps]
        if suite_out:
            ET.SubElement(suite, "system-out").text = "\n".join(suite_out)
        return suites

    def write_html(self, path: str | Path) -> None:
        from bndeploy.runtime.html import render_html

        Path(path).write_text(render_html(self))


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


COLUMNS = ("output", "vs", "margin", "max abs", "max rel", "outside tol", "atol/rtol", "result")
KIND_COLUMNS = ("kind", "tensors", "comparisons", "pass", "fail", "max margin", "at")


def statistics_columns(gate: Gate) -> tuple[str, ...]:
    q = f"q{gate.quantile:g}"
    return ("output", "vs", "mean abs", "median abs", f"{q} abs", "mean rel", "median rel", f"{q} rel", "cosine", "SNR dB")


def format_table(rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> list[str]:
    rows = [columns] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def table_row(c: Comparison) -> tuple[str, ...]:
    if c.problem:
        return (c.output, c.reference, "inf", "-", "-", "-", str(c.tolerance), "FAIL (shape)")
    outside = f"{c.mismatches}/{c.total} ({c.mismatch_fraction:.1%})"
    if c.nonfinite_mismatches:
        outside += f" incl. {c.nan_mismatches} NaN, {c.inf_mismatches} Inf"
    return (
        c.output,
        c.reference,
        format_margin(c.margin),
        f"{c.max_abs_error:.2e}",
        f"{c.max_rel_error:.2e}",
        outside,
        str(c.tolerance),
        "PASS" if c.passed else "FAIL",
    )


def statistics_row(c: Comparison) -> tuple[str, ...]:
    s = c.statistics
    return (c.output, c.reference, *(_figure(v) for v in (s.mean_abs, s.median_abs, s.quantile_abs, s.mean_rel,
                                                          s.median_rel, s.quantile_rel)),
            format_cosine(s.cosine), "-" if s.snr_db is None else f"{s.snr_db:.1f}")


def kind_counts(report: Report) -> dict[str, dict]:
    """Per kind (output, running_mean, running_var): tensors, comparisons, passes, failures, the highest margin."""
    places = report.places()
    counts = {}
    for kind in KINDS:
        group = [c for c in report.comparisons if places[c.output].kind == kind]
        if not group:
            continue
        top = max(group, key=lambda c: _sortable(c.margin))
        counts[kind] = {"tensors": len({c.output for c in group}), "comparisons": len(group),
                        "passed": sum(c.passed for c in group), "failed": sum(not c.passed for c in group),
                        "max_margin": top.margin, "max_margin_at": top.title}
    return counts


def kind_rows(report: Report) -> list[tuple[str, ...]]:
    return [(kind, str(n["tensors"]), str(n["comparisons"]), str(n["passed"]), str(n["failed"]),
             format_margin(n["max_margin"]), n["max_margin_at"]) for kind, n in kind_counts(report).items()]


def format_margin(margin: float) -> str:
    return "inf" if math.isinf(margin) else f"{margin:.3g}"


def format_cosine(cosine: float | None) -> str:
    """Near 1 the distance from 1 is the information: 1-3.2e-11 rather than 1.000000."""
    if cosine is None:
        return "-"
    if cosine == 1.0:
        return "1"
    return f"1-{1 - cosine:.1e}" if cosine > 0.999 else f"{cosine:.6f}"


def case_figures(c: Comparison) -> str:
    """Every figure of one comparison, one per line (JUnit system-out)."""
    s = c.statistics
    return "\n".join([
        f"reference {c.reference_key}; {c.mismatches}/{c.total} outside atol={c.tolerance.atol:g} rtol={c.tolerance.rtol:g}",
        f"gate {c.gate.label}: margin {c.margin!r} (error/allowed, <= 1 passes)",
        f"max abs error {c.max_abs_error!r}; max rel error {c.max_rel_error!r}",
        f"abs error over {s.count} finite elements: mean {s.mean_abs!r}, median {s.median_abs!r}, "
        f"q{s.quantile:g} {s.quantile_abs!r}",
        f"rel error: mean {s.mean_rel!r}, median {s.median_rel!r}, q{s.quantile:g} {s.quantile_rel!r}",
        f"cosine similarity {s.cosine!r}; SNR {s.snr_db!r} dB",
        f"margins: max {s.margin_max!r}, mean {s.margin_mean!r}, median {s.margin_median!r}, "
        f"q{s.quantile:g} {s.margin_quantile!r}",
    ])


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _element_severity(c: Comparison) -> tuple[bool, bool, float]:
    """A shape failure, then a NaN/Inf mismatch, then the highest element error/allowed."""
    return c.problem is not None, c.nonfinite_mismatches > 0, _sortable(c.statistics.margin_max)


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
