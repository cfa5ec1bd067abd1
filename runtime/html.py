"""A one-page, self-contained HTML report: summary table, then per output an error histogram and a
per-channel max-error chart (inline SVG, no scripts, no external files)."""

from __future__ import annotations

import math
from html import escape

from bndeploy.compare import Comparison
from bndeploy.runtime.report import COLUMNS, Report, table_row

WIDTH, HEIGHT = 560, 200
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP = 56, 34, 16
PLOT_W, PLOT_H = WIDTH - MARGIN_LEFT - 20, HEIGHT - MARGIN_BOTTOM - MARGIN_TOP

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 6px} .meta{color:#555}
table{border-collapse:collapse;margin:12px 0} th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd}
th{background:#f3f3f3} td.num{font-variant-numeric:tabular-nums;text-align:right}
.PASS{color:#1a7f37;font-weight:600} .FAIL{color:#c62828;font-weight:600}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
pre.details{background:#fdecea;padding:8px 10px;white-space:pre-wrap;margin:6px 0}
.charts{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{color:#555;font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#444} .bar{fill:#5b8def} .bar.bad{fill:#d32f2f}
.axis{stroke:#888} .tol{stroke:#c62828;stroke-dasharray:4 3}
"""


def render_html(report: Report) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bndeploy check: {verdict}</title><style>{STYLE}</style></head><body>",
        f"<h1>bndeploy check: <span class='{verdict}'>{verdict}</span></h1>",
        f"<div class='meta'>{escape(report.artifact)}<br>target {escape(report.target)} on {escape(report.device)}, "
        f"{escape(report.mode)} mode, {escape(report.dtype)}; inputs: {escape(report.inputs_source)}"
        + (f"<br>{escape(report.references_line())}" if report.references else "") + "</div>",
        summary_table(report),
        *(f"<div class='note'>{escape(note)}</div>" for note in report.notes),
    ]
    for output, comparisons in by_output(report.comparisons).items():
        parts.append(output_section(output, comparisons))
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_table(report: Report) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    rows = []
    for comparison in report.comparisons:
        cells = table_row(comparison)
        result = cells[-1].split()[0]
        body = "".join(f"<td class='num'>{escape(c)}</td>" if 2 <= i <= 4 else f"<td>{escape(c)}</td>" for i, c in enumerate(cells[:-1]))
        rows.append(f"<tr>{body}<td class='{result}'>{escape(cells[-1])}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def by_output(comparisons: list[Comparison]) -> dict[str, list[Comparison]]:
    grouped: dict[str, list[Comparison]] = {}
    for comparison in comparisons:
        grouped.setdefault(comparison.output, []).append(comparison)
    return grouped


def output_section(output: str, comparisons: list[Comparison]) -> str:
    """Charts for the output's worst comparison (a failing one first, then the largest error)."""
    shown = max(comparisons, key=lambda c: (not c.passed, c.max_abs_error))
    details = "".join(f"<pre class='details'>{escape(c.title)}: {escape(c.details())}</pre>" for c in comparisons if not c.passed)
    if shown.problem:
        return f"<h2>{escape(output)}</h2>{details}"
    return (
        f"<h2>{escape(output)} <span class='meta'>(charts: vs {escape(_reference_label(shown))})</span></h2>"
        f"{details}<div class='charts'>"
        f"<figure>{histogram_svg(shown)}<figcaption>absolute error, log-scale bins; dashed: atol</figcaption></figure>"
        f"<figure>{channel_svg(shown)}<figcaption>max absolute error per channel (axis {shown.channel_axis}); "
        f"red: channels with elements outside tolerance</figcaption></figure></div>"
    )


def _reference_label(c: Comparison) -> str:
    return c.reference if c.reference_key == c.reference else f"{c.reference}, {c.reference_key}"


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
    values = c.channel_max_abs_error
    bad = set(c.bad_channels())
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0) or 1.0
    slot = PLOT_W / max(len(values), 1)
    parts = [_svg_open("channels", c.output), _axes(f"max abs error (top {top:.2g})")]
    for channel, value in enumerate(values):
        x = MARGIN_LEFT + channel * slot
        h = PLOT_H if not math.isfinite(value) else PLOT_H * value / top
        kind = "bar bad" if channel in bad else "bar"
        shown = "NaN/Inf" if not math.isfinite(value) else f"{value:.3g}"
        parts.append(
            f"<rect class='{kind}' data-channel='{channel}' x='{x + 0.5:.1f}' y='{MARGIN_TOP + PLOT_H - h:.1f}' "
            f"width='{max(slot - 1, 0.5):.1f}' height='{h:.1f}'><title>channel {channel}: {shown}"
            f"{f', {c.channel_mismatches[channel]} outside tolerance' if channel in bad else ''}</title></rect>"
        )
        if len(values) <= 32 or channel % math.ceil(len(values) / 16) == 0 or channel in bad:
            parts.append(_x_label(x + slot / 2, str(channel), bold=channel in bad))
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


