"""The HTML report: one self-contained page (inline CSS and SVG; no scripts, no external files) that opens
with the answer and then the detail:
1. the verdict and the summary (what was compared, the gate, counts by kind, the worst element);
2. an overview chart: every comparison's margin (error / allowed, log scale) against its layer depth, with
   the tolerance (margin 1) drawn; each point links to its section;
3. one collapsible section per output or running statistic with every figure of each reference and the
   charts of its worst comparison (error histogram, max error per channel): failing and near-failing
   sections open, the rest closed;
4. the full table of every comparison, closed.
Closed sections are not laid out by the browser, and a wide channel chart draws its passing bars as one
path, so a 120-BatchNorm network's report stays small and quick to open.
"""

from __future__ import annotations

import math
from html import escape

from bndeploy.compare import Comparison
from bndeploy.runtime.report import (
    COLUMNS,
    NEAR_MARGIN,
    Place,
    Report,
    format_margin,
    kind_counts,
    statistics_columns,
    statistics_row,
    table_row,
)

WIDTH, HEIGHT = 560, 200
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP = 56, 34, 16
PLOT_W, PLOT_H = WIDTH - MARGIN_LEFT - 20, HEIGHT - MARGIN_BOTTOM - MARGIN_TOP
# Channel charts wider than this draw their passing bars as one path (no per-bar tooltip).
PER_BAR_CHANNELS = 64

OVERVIEW_W, OVERVIEW_H = 1100, 300
OV_LEFT, OV_RIGHT, OV_TOP, OV_BOTTOM = 64, 190, 16, 40
OV_PLOT_W, OV_PLOT_H = OVERVIEW_W - OV_LEFT - OV_RIGHT, OVERVIEW_H - OV_TOP - OV_BOTTOM
KIND_COLORS = {"output": "#222222", "running_mean": "#1f6fd1", "running_var": "#e08a00"}
FAIL_COLOR = "#d32f2f"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px} .meta{color:#555}
table{border-collapse:collapse;margin:8px 0} th,td{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}
th{background:#f3f3f3;font-weight:600} td.num{font-variant-numeric:tabular-nums;text-align:right}
table.figures,details.all table{font-size:12px} table.figures td,table.figures th,details.all td,details.all th{white-space:nowrap}
.PASS{color:#1a7f37;font-weight:600} .FAIL{color:#c62828;font-weight:600}
ul.facts{margin:6px 0;padding-left:18px} ul.facts li{margin:1px 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
pre.details{background:#fdecea;padding:8px 10px;white-space:pre-wrap;margin:6px 0}
details.output{border:1px solid #ddd;border-radius:4px;margin:6px 0;padding:2px 10px}
details.output[open]{padding-bottom:8px} details.output>summary{cursor:pointer;padding:3px 0}
details.output.near>summary{background:#fff8e1} details.output.failed>summary{background:#fdecea}
.charts{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{color:#555;font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#444} .bar{fill:#5b8def} .bar.bad{fill:#d32f2f}
.axis,.grid,.tol,.nearline{shape-rendering:crispEdges} .axis{stroke:#888} .grid{stroke:#eee} .tol{stroke:#c62828;stroke-dasharray:4 3} .nearline{stroke:#f0b400;stroke-dasharray:2 3}
.series{fill:none;stroke-width:1;opacity:.45}
"""


def render_html(report: Report) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    places = report.places()
    section_ids = {name: f"out-{i}" for i, name in enumerate(places)}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bndeploy check: {verdict}</title><style>{STYLE}</style></head><body>",
        f"<h1>bndeploy check: <span class='{verdict}'>{verdict}</span> "
        f"<span class='meta'>({escape(report.verdict().partition(' (')[2])}</span></h1>",
        f"<div class='meta'>{escape(report.artifact)}<br>target {escape(report.target)} on {escape(report.device)}, "
        f"{escape(report.mode)} mode, {escape(report.dtype)}; inputs: {escape(report.inputs_source)}"
        + (f"<br>{escape(report.references_line())}" if report.references else "") + "</div>",
        summary_section(report),
        "<section id='overview'><h2>Overview: error / allowed by layer depth</h2>",
        overview_svg(report, places, section_ids),
        "</section>",
        *(f"<div class='note'>{escape(note)}</div>" for note in report.notes),
    ]
    parts += output_sections(report, places, section_ids)
    parts += [all_comparisons(report), "</body></html>"]
    return "\n".join(parts)


def summary_section(report: Report) -> str:
    facts = [f"compared: {report.compared_line()}",
             f"gate: {report.gate.describe()}; tolerance (atol/rtol) {report.tolerances_line()}",
             f"margin = the gate's statistic of error / allowed: 1 is the tolerance; {NEAR_MARGIN:g} or more is "
             "near (expanded below with the failures)"]
    worst = report.worst_element_line()
    if worst:
        facts.append(f"worst element: {worst}")
    head = "".join(f"<th>{h}</th>" for h in ("kind", "tensors", "comparisons", "pass", "fail", "max margin", "at"))
    rows = "".join(
        f"<tr><td>{kind}</td><td class='num'>{n['tensors']}</td><td class='num'>{n['comparisons']}</td>"
        f"<td class='num PASS'>{n['passed']}</td><td class='num{' FAIL' if n['failed'] else ''}'>{n['failed']}</td>"
        f"<td class='num'>{format_margin(n['max_margin'])}</td><td>{escape(n['max_margin_at'])}</td></tr>"
        for kind, n in kind_counts(report).items()
    )
    items = "".join(f"<li>{escape(fact)}</li>" for fact in facts)
    return f"<section id='summary'><ul class='facts'>{items}</ul><table class='kinds'><tr>{head}</tr>{rows}</table></section>"


# --- the overview: margin against depth


def overview_svg(report: Report, places: dict[str, Place], section_ids: dict[str, str]) -> str:
    comparisons = report.comparisons
    depth_count = max((p.depth for p in places.values()), default=1)
    low, high = _log_range([c.margin for c in comparisons])
    references = list(dict.fromkeys(c.reference for c in comparisons))

    def x_of(place: Place, reference: str) -> float:
        shift = (references.index(reference) - (len(references) - 1) / 2) * min(4.0, OV_PLOT_W / depth_count / 3)
        return OV_LEFT + (place.depth - 0.5) / depth_count * OV_PLOT_W + shift

    def y_of(margin: float) -> float:
        if math.isinf(margin):
            return OV_TOP
        exponent = low if margin <= 0 else min(max(math.log10(margin), low), high)
        return OV_TOP + OV_PLOT_H * (high - exponent) / (high - low)

    parts = [
        f"<svg class='chart overview' xmlns='http://www.w3.org/2000/svg' width='{OVERVIEW_W}' height='{OVERVIEW_H}' "
        f"viewBox='0 0 {OVERVIEW_W} {OVERVIEW_H}' role='img' aria-label='error over allowed by layer depth'>",
        *_overview_axes(low, high, depth_count, places, y_of),
    ]
    for (kind, reference), series in _series(comparisons, places).items():
        points = " ".join(f"{x_of(places[c.output], reference):.1f},{y_of(c.margin):.1f}" for c in series)
        parts.append(f"<polyline class='series' stroke='{KIND_COLORS[kind]}' points='{points}'/>")
    for c in comparisons:
        place = places[c.output]
        parts.append(_overview_point(c, place, x_of(place, c.reference), y_of(c.margin), references,
                                     section_ids[c.output], depth_count))
    parts += _overview_legend(references, {places[c.output].kind for c in comparisons})
    parts.append("</svg>")
    return "".join(parts)


def _log_range(margins: list[float]) -> tuple[float, float]:
    """Decades the overview's y axis spans: always the tolerance (1) and a decade above it."""
    finite = [m for m in margins if 0 < m < math.inf]
    low = math.floor(math.log10(min(finite))) if finite else -3
    high = math.ceil(math.log10(max(finite))) if finite else 1
    return max(min(low, -1), -12), max(high, 1)


def _series(comparisons: list[Comparison], places: dict[str, Place]) -> dict[tuple[str, str], list[Comparison]]:
    """Running statistics by (kind, reference) in depth order, for the thin lines that show the trend."""
    series: dict[tuple[str, str], list[Comparison]] = {}
    for c in sorted(comparisons, key=lambda c: places[c.output].depth):
        if places[c.output].kind != "output":
            series.setdefault((places[c.output].kind, c.reference), []).append(c)
    return {key: group for key, group in series.items() if len(group) > 1}


def _overview_axes(low: int, high: int, depth_count: int, places: dict[str, Place], y_of) -> list[str]:
    bottom, right = OV_TOP + OV_PLOT_H, OV_LEFT + OV_PLOT_W
    parts = []
    for exponent in range(low, high + 1):
        y = y_of(10.0**exponent)
        parts.append(f"<line class='grid' x1='{OV_LEFT}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}'/>")
        parts.append(f"<text x='{OV_LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>1e{exponent}</text>")
    parts += [
        f"<line class='axis' x1='{OV_LEFT}' x2='{right}' y1='{bottom}' y2='{bottom}'/>",
        f"<line class='axis' x1='{OV_LEFT}' x2='{OV_LEFT}' y1='{OV_TOP}' y2='{bottom}'/>",
        f"<text x='14' y='{OV_TOP + OV_PLOT_H / 2:.0f}' transform='rotate(-90 14 {OV_TOP + OV_PLOT_H / 2:.0f})' "
        "text-anchor='middle'>error / allowed (log)</text>",
    ]
    for name, margin in (("tol", 1.0), ("nearline", NEAR_MARGIN)):
        y = y_of(margin)
        parts.append(f"<line class='{name}' x1='{OV_LEFT}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}'/>")
    parts.append(f"<text x='{right - 4}' y='{y_of(1.0) - 4:.1f}' text-anchor='end' style='fill:{FAIL_COLOR}'>"
                 "tolerance: error = allowed</text>")
    has_batchnorms = any(p.kind != "output" for p in places.values())
    step = max(1, math.ceil(depth_count / 20))
    for depth in range(1, depth_count + 1):
        last = depth == depth_count
        if (depth % step or depth_count - depth < step) and not last:  # no label crowding the last one
            continue
        x = OV_LEFT + (depth - 0.5) / depth_count * OV_PLOT_W
        label = "outputs" if has_batchnorms and last else str(depth)
        parts.append(f"<text x='{x:.1f}' y='{bottom + 14}' text-anchor='middle'>{label}</text>")
    axis = "BatchNorm position in the graph (model outputs last)" if has_batchnorms else "output"
    parts.append(f"<text x='{OV_LEFT + OV_PLOT_W / 2:.0f}' y='{bottom + 32}' text-anchor='middle'>{axis}</text>")
    return parts


def _overview_point(c: Comparison, place: Place, x: float, y: float, references: list[str], section: str,
                    depth_count: int) -> str:
    color = KIND_COLORS[place.kind]
    fill = FAIL_COLOR if not c.passed else color
    where = f"BatchNorm {place.batchnorm}, {place.depth} of {depth_count - 1}" if place.batchnorm else "model output"
    title = f"{c.title}: margin {format_margin(c.margin)} ({where}); max abs error {c.max_abs_error:.3g}"
    data = (f"class='point' data-output='{escape(c.output, quote=True)}' data-reference='{escape(c.reference, quote=True)}' "
            f"data-depth='{place.depth}' data-margin='{format_margin(c.margin)}' data-passed='{str(c.passed).lower()}'")
    shape = _marker(references.index(c.reference), x, y, fill, color)
    return f"<a href='#{section}'><g {data}>{shape}<title>{escape(title)}</title></g></a>"


def _marker(index: int, x: float, y: float, fill: str, stroke: str) -> str:
    """Circle for the first reference (torch), square for the second, diamond after."""
    if index == 0:
        return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{fill}' stroke='{stroke}'/>"
    if index == 1:
        return f"<rect x='{x - 3.2:.1f}' y='{y - 3.2:.1f}' width='6.4' height='6.4' fill='{fill}' stroke='{stroke}'/>"
    return (f"<path d='M{x:.1f} {y - 4:.1f}L{x + 4:.1f} {y:.1f}L{x:.1f} {y + 4:.1f}L{x - 4:.1f} {y:.1f}Z' "
            f"fill='{fill}' stroke='{stroke}'/>")


def _overview_legend(references: list[str], kinds: set[str]) -> list[str]:
    x, y = OV_LEFT + OV_PLOT_W + 20, OV_TOP + 10
    parts = []
    for kind in (k for k in KIND_COLORS if k in kinds):
        parts.append(f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{KIND_COLORS[kind]}'/>"
                     f"<text x='{x + 16}' y='{y + 1}'>{kind}</text>")
        y += 18
    parts.append(f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{FAIL_COLOR}'/><text x='{x + 16}' y='{y + 1}'>failed</text>")
    y += 26
    for index, reference in enumerate(references):
        parts.append(_marker(index, x + 5, y - 3, "#ffffff", "#222222") + f"<text x='{x + 16}' y='{y + 1}'>vs {escape(reference)}</text>")
        y += 18
    return parts


# --- one section per output or running statistic


def output_sections(report: Report, places: dict[str, Place], section_ids: dict[str, str]) -> list[str]:
    """Failing and near-failing outputs first (open, by margin), then the rest in graph order (closed)."""
    grouped: dict[str, list[Comparison]] = {}
    for c in report.by_depth():
        grouped.setdefault(c.output, []).append(c)
    attention = list(dict.fromkeys(c.output for c in report.attention()))
    rest = [name for name in grouped if name not in attention]
    parts = []
    if attention:
        parts.append(f"<h2>Failed or near the tolerance ({len(attention)})</h2>")
        parts += [output_section(report, name, grouped[name], places[name], section_ids[name], True) for name in attention]
    if rest:
        title = "Everything else, in graph order" if attention else "Every output and running statistic, in graph order"
        parts.append(f"<h2>{title} ({len(rest)}, closed)</h2>")
        parts += [output_section(report, name, grouped[name], places[name], section_ids[name], False) for name in rest]
    return parts


def output_section(report: Report, output: str, comparisons: list[Comparison], place: Place, section: str,
                   expanded: bool) -> str:
    """The output's figures against every reference, then charts for its worst comparison."""
    shown = max(comparisons, key=lambda c: (not c.passed, c.margin))
    failed = any(not c.passed for c in comparisons)
    state = "failed" if failed else "near" if shown.margin >= NEAR_MARGIN else "passed"
    verdict = "FAIL" if failed else "PASS"
    where = f"{place.kind} of {place.batchnorm} (BatchNorm {place.depth})" if place.batchnorm else "model output"
    summary = (f"<summary><span class='{verdict}'>{verdict}</span> <b>{escape(output)}</b> "
               f"<span class='meta'>{escape(where)}; margin {format_margin(shown.margin)} vs {escape(shown.reference)}</span></summary>")
    details = "".join(f"<pre class='details'>{escape(c.title)}: {escape(c.details())}</pre>" for c in comparisons if not c.passed)
    body = [summary, figures_table(comparisons, report), details]
    if not shown.problem:
        body.append(
            f"<div class='charts'><figure>{histogram_svg(shown)}<figcaption>{escape(shown.title)}: absolute error, "
            f"log-scale bins; dashed: atol</figcaption></figure>"
            f"<figure>{channel_svg(shown)}<figcaption>max absolute error per channel (axis {shown.channel_axis}); "
            f"red: channels with elements outside tolerance</figcaption></figure></div>"
        )
    return (f"<details class='output {state}' id='{section}' data-output='{escape(output, quote=True)}' "
            f"data-kind='{place.kind}'{' open' if expanded else ''}>{''.join(body)}</details>")


def figures_table(comparisons: list[Comparison], report: Report) -> str:
    """Every figure of each comparison: the gate's columns, then the statistics."""
    columns = COLUMNS[1:-1] + statistics_columns(report.gate)[2:] + COLUMNS[-1:]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    return f"<table class='figures'><tr>{head}</tr>{''.join(_figures_row(c) for c in comparisons)}</table>"


def _figures_row(c: Comparison) -> str:
    cells = table_row(c)[1:-1] + statistics_row(c)[2:]
    result = "PASS" if c.passed else "FAIL"
    body = "".join(f"<td>{escape(v)}</td>" if i == 0 else f"<td class='num'>{escape(v)}</td>" for i, v in enumerate(cells))
    return f"<tr>{body}<td class='{result}'>{escape(table_row(c)[-1])}</td></tr>"


def all_comparisons(report: Report) -> str:
    columns = COLUMNS[:-1] + statistics_columns(report.gate)[2:] + COLUMNS[-1:]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = []
    for c in report.by_depth():
        cells = table_row(c)[:-1] + statistics_row(c)[2:]
        body = "".join(f"<td>{escape(v)}</td>" if i < 2 else f"<td class='num'>{escape(v)}</td>" for i, v in enumerate(cells))
        rows.append(f"<tr>{body}<td class='{'PASS' if c.passed else 'FAIL'}'>{escape(table_row(c)[-1])}</td></tr>")
    return (f"<details class='all'><summary>Every comparison ({len(report.comparisons)}), in graph order</summary>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></details>")


# --- the two charts of one comparison


def histogram_svg(c: Comparison) -> str:
    """Bars: exact matches, then one per log-scale bin; ticks at whole decades; dashed line at atol."""
    edges, counts = c.histogram.get("edges", []), c.histogram.get("counts", [])
    values = [c.histogram.get("exact", 0)] + counts
    slot = PLOT_W / len(values)
    top = max(values) or 1
    parts = [_svg_open("histogram", c.output), _axes(f"elements (max {top})")]
    for i, value in enumerate(values):
        x, h = MARGIN_LEFT + i * slot, PLOT_H * value / top
        label = "exact" if i == 0 else f"{edges[i - 1]:.1e} to {edges[i]:.1e}"
        parts.append(
            f"<rect class='bar' x='{x + 1:.1f}' y='{MARGIN_TOP + PLOT_H - h:.1f}' width='{max(slot - 2, 1):.1f}' "
            f"height='{h:.1f}'><title>{label}: {value}</title></rect>"
        )
    parts.append(_x_label(MARGIN_LEFT + slot / 2, "exact"))
    for i, edge in enumerate(edges[1:], start=1):  # the first edge touches the "exact" label
        exponent = math.log10(edge)
        if abs(exponent - round(exponent)) < 1e-9:
            parts.append(_x_label(MARGIN_LEFT + (i + 1) * slot, f"1e{round(exponent)}"))
    if len(edges) > 1 and c.tolerance.atol > 0:
        # atol's position on the log axis (slot 0 is the exact-match bar); edges always span it.
        step = math.log10(edges[1]) - math.log10(edges[0])
        x = MARGIN_LEFT + (1 + (math.log10(c.tolerance.atol) - math.log10(edges[0])) / step) * slot
        parts.append(f"<line class='tol' x1='{x:.1f}' x2='{x:.1f}' y1='{MARGIN_TOP}' y2='{MARGIN_TOP + PLOT_H}'/>")
        parts.append(f"<text x='{x - 3:.1f}' y='{MARGIN_TOP + 10}' text-anchor='end' style='fill:#c62828'>atol</text>")
    parts.append("</svg>")
    return "".join(parts)


def channel_svg(c: Comparison) -> str:
    """Max error per channel; channels with mismatches are separate red bars (with data-channel). Up to
    PER_BAR_CHANNELS channels every bar has its tooltip; beyond, the bars are one filled step outline."""
    values = c.channel_max_abs_error
    bad = set(c.bad_channels())
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0) or 1.0
    slot = PLOT_W / max(len(values), 1)
    per_bar = len(values) <= PER_BAR_CHANNELS
    parts = [_svg_open("channels", c.output), _axes(f"max abs error (top {top:.2g})")]
    bottom = MARGIN_TOP + PLOT_H
    outline = [f"M{MARGIN_LEFT} {bottom}"]
    for channel, value in enumerate(values):
        x = MARGIN_LEFT + channel * slot
        h = PLOT_H if not math.isfinite(value) else PLOT_H * value / top
        if per_bar or channel in bad:
            kind = "bar bad" if channel in bad else "bar"
            shown = "NaN/Inf" if not math.isfinite(value) else f"{value:.3g}"
            parts.append(
                f"<rect class='{kind}' data-channel='{channel}' x='{x + 0.5:.1f}' y='{bottom - h:.1f}' "
                f"width='{max(slot - 1, 0.5):.1f}' height='{h:.1f}'><title>channel {channel}: {shown}"
                f"{f', {c.channel_mismatches[channel]} outside tolerance' if channel in bad else ''}</title></rect>"
            )
        if not per_bar:
            outline.append(f"V{bottom - h:.1f}H{x + slot:.1f}")
        if per_bar and len(values) <= 32 or channel % math.ceil(len(values) / 16) == 0 or channel in bad:
            parts.append(_x_label(x + slot / 2, str(channel), bold=channel in bad))
    if not per_bar:
        parts.insert(2, f"<path class='bar' d='{''.join(outline)}V{bottom}Z'/>")
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(kind: str, output: str) -> str:
    return (
        f"<svg class='chart {kind}' data-output='{escape(output, quote=True)}' xmlns='http://www.w3.org/2000/svg' "
        f"width='{WIDTH}' height='{HEIGHT}' viewBox='0 0 {WIDTH} {HEIGHT}' role='img'>"
    )


def _axes(y_label: str) -> str:
    bottom = MARGIN_TOP + PLOT_H
    return (
        f"<line class='axis' x1='{MARGIN_LEFT}' x2='{MARGIN_LEFT + PLOT_W}' y1='{bottom}' y2='{bottom}'/>"
        f"<line class='axis' x1='{MARGIN_LEFT}' x2='{MARGIN_LEFT}' y1='{MARGIN_TOP}' y2='{bottom}'/>"
        f"<text x='12' y='{MARGIN_TOP + PLOT_H / 2:.0f}' transform='rotate(-90 12 {MARGIN_TOP + PLOT_H / 2:.0f})' "
        f"text-anchor='middle'>{escape(y_label)}</text>"
    )


def _x_label(x: float, text: str, bold: bool = False) -> str:
    weight = " font-weight='700' style='fill:#d32f2f'" if bold else ""
    return f"<text x='{x:.1f}' y='{MARGIN_TOP + PLOT_H + 14}' text-anchor='middle'{weight}>{escape(text)}</text>"
