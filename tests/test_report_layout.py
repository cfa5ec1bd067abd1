"""Reports that stay readable on a real network: the terminal summary comes first and fits on one screen,
the HTML report opens with the summary and the per-layer overview (looked at in a real headless browser),
and JSON/JUnit keep every figure. Synthetic ResNet-18- and DenseNet-shaped reports need no compile; one
real train-mode check of the tiny-resnet reference model shows the depths come from the graph."""

import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import network_report

from bndeploy.runtime.report import NEAR_MARGIN, SHOWN_FAILURES, places_of
from bndeploy.runtime.specs import TensorSpec

SCREEN_LINES = 40  # a terminal screen
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def resnet18_shaped():
    """ResNet-18 in train mode: 1 output + 20 BatchNorms x 2 statistics, each vs torch and onnxruntime."""
    return network_report(20)


@pytest.fixture(scope="module")
def one_failure():
    return network_report(20, failing={"layer3.2.bn.running_var_updated": 3.0})


def test_terminal_summary_answers_first_and_fits_on_one_screen(resnet18_shaped):
    text = resnet18_shaped.summary()
    lines = text.splitlines()
    assert len(lines) <= SCREEN_LINES, text
    assert lines[2] == ("  compared: 1 output and 40 running statistics of 20 BatchNorms against torch and onnxruntime: "
                        "82 comparisons, 82 pass, 0 fail")
    assert lines[3].startswith("  gate: every element within atol + rtol*|reference| (--check-stat max)")
    closest = max(resnet18_shaped.comparisons, key=lambda c: c.statistics.margin_max)
    assert lines[4].startswith(f"  worst element: {closest.title} at [{closest.statistics.tightest_index[0]}]")
    kinds = {line.split()[0]: line.split()[1:5] for line in lines[6:10]}
    assert kinds["output"] == ["1", "2", "2", "0"] and kinds["running_var"] == ["20", "40", "40", "0"]
    # Only the closest comparisons are listed, highest margin first; --verbose lists all 82.
    listed = _table_rows(text, "closest to tolerance (3 of 82")
    ranked = resnet18_shaped.by_margin()
    assert [(r[0], r[1]) for r in listed] == [(c.output, c.reference) for c in ranked[:3]]
    assert [float(r[2]) for r in listed] == sorted((float(r[2]) for r in listed), reverse=True)
    assert sum(line.startswith("note: running_var:") for line in lines) == 1
    assert lines[-1] == "result: PASS (82 of 82 comparisons)"

    verbose = resnet18_shaped.summary(verbose=True)
    assert len(_table_rows(verbose, "every comparison, in graph order (82")) == 82
    assert "layer5.3.bn.running_var_updated: max 0.0002 (n=1568)" in verbose  # per-BatchNorm figures


def test_failures_come_first_with_their_explanation(one_failure):
    text = one_failure.summary()
    assert len(text.splitlines()) <= SCREEN_LINES
    rows = _table_rows(text, "failed and closest to tolerance")
    assert [r[0] for r in rows[:2]] == ["layer3.2.bn.running_var_updated"] * 2 and {r[-1] for r in rows[:2]} == {"FAIL"}
    assert rows[2:] == []  # nothing else came near (margin >= 0.5)
    assert "FAIL layer3.2.bn.running_var_updated vs torch:\n  1 of 64 elements (1.56%) outside" in text
    assert "worst element: layer3.2.bn.running_var_updated vs " in text and "error/allowed 3)" in text
    assert text.endswith("result: FAIL (2 of 82 comparisons)")


def test_many_failures_stay_on_one_screen():
    broken = {f"layer{i // 4 + 1}.{i % 4}.bn.running_mean_updated": 2.0 + i for i in range(20)}
    report = network_report(20, failing=broken)
    text = report.summary()
    assert len(report.failures) == 40
    lines = text.splitlines()
    # the first screen holds the summary and the table of the worst failures; their explanations follow
    table_end = lines.index("", lines.index(next(line for line in lines if line.startswith("failed and closest"))))
    assert table_end < SCREEN_LINES and len(lines) <= 1.5 * SCREEN_LINES, text
    rows = _table_rows(text, "failed and closest to tolerance")
    assert len(rows) == SHOWN_FAILURES and {r[-1] for r in rows} == {"FAIL"}
    assert rows[0][0] == "layer5.3.bn.running_mean_updated"  # the largest error (21x allowed) first
    assert "(37 more failures explained with --verbose, and in the JSON, JUnit and HTML reports)" in text
    assert report.summary(verbose=True).count("\nFAIL ") == 40


def test_shape_and_nan_failures_lead_the_summary(tmp_path):
    from bndeploy.compare import compare
    from bndeploy.runtime import Report, Tolerance

    tolerance = Tolerance(1e-3, 0.0)
    far_off = compare(np.array([5.0, 1.0]), np.ones(2), tolerance, "a", "torch", "torch/a")
    nan = compare(np.array([1.0, np.nan]), np.ones(2), tolerance, "b", "torch", "torch/b")
    report = Report("/x", "cpu", "cpu", "inference", "float32", "test", ("torch",), [far_off, nan])
    assert "  worst element: b vs torch: NaN/Inf mismatch at [1]" in report.summary().splitlines()
    report.comparisons.append(compare(np.zeros((2, 3)), np.zeros((3, 2)), tolerance, "c", "torch", "torch/c"))
    assert "  worst element: c vs torch: shape [2, 3] differs from the reference's [3, 2] (torch/c)" in report.summary()
    report.write_html(tmp_path / "r.html")  # no charts for a shape failure, its details instead
    page = (tmp_path / "r.html").read_text()
    assert page.count("<details class='output failed'") == 3 and "data-output='c'" in page


def test_json_and_junit_keep_every_figure(one_failure, tmp_path):
    one_failure.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["comparisons"]) == 82 and data["summary"]["failed"] == 2
    assert data["summary"]["by_kind"]["running_var"]["failed"] == 2 and data["summary"]["near_margin"] == NEAR_MARGIN
    assert all(set(c["statistics"]) >= {"mean_abs", "median_abs", "quantile_abs", "cosine", "snr_db"} for c in data["comparisons"])
    assert len(data["running_var_gaps"]) == 20 and data["running_var_gaps"][0]["batch_count"] == 1568
    depths = {o["name"]: o["depth"] for o in data["outputs"]}
    assert depths["layer1.0.bn.running_mean_updated"] == 1 and depths["layer5.3.bn.running_var_updated"] == 20
    assert depths["output"] == 21
    one_failure.write_junit(tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 82 and len([c for c in cases if c.find("failure") is not None]) == 2
    assert all("cosine similarity" in c.find("system-out").text for c in cases)
    assert suite.find("system-out").text.count("running_var gap ") == 20


def test_depth_is_the_batchnorms_position_in_the_graph():
    specs = [TensorSpec("y", (1,), "float32", role="output"),
             TensorSpec("b.running_mean_updated", (4,), "float32", role="running_mean", batchnorm="b"),
             TensorSpec("b.running_var_updated", (4,), "float32", role="running_var", batchnorm="b"),
             TensorSpec("a.running_mean_updated", (4,), "float32", role="running_mean", batchnorm="a"),
             TensorSpec("a.running_var_updated", (4,), "float32", role="running_var", batchnorm="a")]
    places = places_of(specs, ["y", "extra"])
    assert [(p.name, p.kind, p.depth) for p in places.values()] == [
        ("y", "output", 3), ("b.running_mean_updated", "running_mean", 1), ("b.running_var_updated", "running_var", 1),
        ("a.running_mean_updated", "running_mean", 2), ("a.running_var_updated", "running_var", 2),
        ("extra", "output", 3)]


def test_html_opens_with_the_overview_and_expands_only_what_needs_attention(one_failure, tmp_path):
    path = tmp_path / "r.html"
    one_failure.write_html(path)
    page = path.read_text()
    summary_at, overview_at, first_section = (page.index("<section id='summary'>"), page.index("<svg class='chart overview'"),
                                              page.index("<details class='output"))
    assert summary_at < overview_at < first_section
    points = re.findall(r"<g class='point' data-output='([^']+)' data-reference='(\w+)' data-depth='(\d+)' "
                        r"data-margin='([^']+)' data-passed='(\w+)'", page)
    assert len(points) == 82
    assert {(o, r) for o, r, *_ in points} == {(c.output, c.reference) for c in one_failure.comparisons}
    assert {o: int(d) for o, _, d, *_ in points}["layer3.2.bn.running_var_updated"] == 11
    assert [o for o, _, _, _, passed in points if passed == "false"] == ["layer3.2.bn.running_var_updated"] * 2
    opened = re.findall(r"<details class='output (\w+)' id='[^']+' data-output='([^']+)'[^>]*? open>", page)
    attention = {c.output for c in one_failure.attention()}
    assert {name for _, name in opened} == attention and ("failed", "layer3.2.bn.running_var_updated") in opened
    assert page.count("<details class='output") == 41
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # every chart is well-formed XML


# --- a real headless browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's chromium driven by playwright (.ci/install-edge installs chromium; the test extra playwright)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install 'bndeploy[test]' brings playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (.ci/install-edge installs it)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"], viewport=VIEWPORT)
        yield context
        context.close()


def open_report(browser, path: Path) -> tuple[object, float]:
    page = browser.new_page()
    start = time.perf_counter()
    page.goto(path.as_uri(), wait_until="load")
    page.evaluate("() => new Promise(requestAnimationFrame)")  # laid out and painted once
    return page, time.perf_counter() - start


def test_browser_shows_the_overview_above_the_fold(browser, one_failure, tmp_path):
    from PIL import Image

    path = tmp_path / "resnet18.html"
    one_failure.write_html(path)
    page, seconds = open_report(browser, path)
    layout = page.evaluate("""() => {
        const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        const sections = [...document.querySelectorAll('details.output')];
        return {overview: box(document.querySelector('svg.overview')),
                open: sections.filter(d => d.open).map(d => d.dataset.output),
                closedChartsShown: sections.filter(d => !d.open)
                    .filter(d => d.querySelector('svg.histogram').checkVisibility()).length,
                openChartsShown: sections.filter(d => d.open)
                    .filter(d => d.querySelector('svg.histogram').checkVisibility()).length,
                points: document.querySelectorAll('svg.overview g.point').length,
                failed: [...document.querySelectorAll("svg.overview g.point[data-passed='false']")].map(box),
                tolerance: box(document.querySelector('svg.overview line.tol'))};
    }""")
    left, top, right, bottom = layout["overview"]
    assert bottom <= VIEWPORT["height"] and right - left >= 1000, layout  # the whole overview on the first screen
    assert layout["points"] == 82 and layout["closedChartsShown"] == 0 and layout["openChartsShown"] == 1
    assert set(layout["open"]) == {c.output for c in one_failure.attention()}
    shot = tmp_path / "resnet18.png"
    page.screenshot(path=str(shot))
    image = Image.open(shot).convert("RGB")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    chart = np.asarray(image.crop((int(left), int(top), int(right), int(bottom))))
    colors = _pixel_counts(chart)
    # drawn, not blank: running_mean/var markers and lines, and the dashed tolerance line across the plot
    assert colors["running_mean"] > 100 and colors["running_var"] > 100, colors
    assert colors["white"] < 0.97 * chart.shape[0] * chart.shape[1]
    line_left, line_top, line_right, line_bottom = layout["tolerance"]
    band = np.asarray(image.crop((int(line_left), int(line_top) - 1, int(line_right), int(line_bottom) + 2))).astype(int)
    red_columns = ((band[..., 0] > band[..., 1] + 60) & (band[..., 0] > band[..., 2] + 60)).any(axis=0)
    assert red_columns.mean() > 0.4, red_columns.mean()  # dashes: about half of the plot's width is red
    assert len(layout["failed"]) == 2
    for left_, top_, right_, bottom_ in layout["failed"]:  # the failed points are painted red where the DOM puts them
        marker = np.asarray(image.crop((int(left_), int(top_), int(right_) + 1, int(bottom_) + 1)))
        assert _pixel_counts(marker)["failed"] >= 6, (left_, top_)
    print(f"\nResNet-18-shaped report: {path.stat().st_size / 1e6:.2f} MB, opened in {seconds:.2f} s; screenshot "
          f"{shot.stat().st_size / 1e3:.0f} kB, overview at y {top:.0f}-{bottom:.0f} of {VIEWPORT['height']}")
    page.close()


def test_a_densenet_sized_report_stays_fast_to_open(browser, tmp_path):
    """120 BatchNorms of up to 1024 channels x 2 statistics x 2 references: 482 comparisons."""
    report = network_report(120, channels=1024, failing={"layer30.3.bn.running_mean_updated": 1.5})
    path = tmp_path / "densenet.html"
    started = time.perf_counter()
    report.write_html(path)
    render_seconds = time.perf_counter() - started
    size_mb = path.stat().st_size / 1e6
    page, seconds = open_report(browser, path)
    assert page.evaluate("document.querySelectorAll('svg.overview g.point').length") == 482
    assert page.evaluate("document.querySelectorAll('details.output[open]').length") == 1
    shot = tmp_path / "densenet.png"
    page.screenshot(path=str(shot))
    print(f"\nDenseNet-sized report (482 comparisons, 1024 channels each): {size_mb:.2f} MB written in "
          f"{render_seconds:.2f} s, opened in {seconds:.2f} s")
    assert size_mb < 6 and seconds < 5
    page.close()


def test_a_real_train_mode_check_reads_depth_from_the_graph(exported, tmp_path_factory, browser, capsys):
    """tiny-resnet (9 BatchNorms) exported in train mode, compiled for this CPU, checked against both references."""
    import onnx

    from bndeploy.cli import main
    from bndeploy.compile import CompileSettings, compile_model

    export_dir = exported("tiny-resnet")["train"]
    out = tmp_path_factory.mktemp("tiny-resnet-train")
    (artifact,) = compile_model(export_dir / "model.onnx", ["cpu"], out / "cpu", CompileSettings())
    html = out / "report.html"
    assert main(["check", str(artifact), "--html", str(html), "--json", str(out / "r.json")]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= SCREEN_LINES
    assert "compared: 1 output and 18 running statistics of 9 BatchNorms against torch and onnxruntime: " \
           "38 comparisons, 38 pass, 0 fail" in text
    assert sum(line.startswith("note: running_var:") for line in text.splitlines()) == 1
    graph_order = [n.name for n in onnx.load(export_dir / "model.onnx").graph.node if n.op_type == "BatchNormalization"]
    outputs = json.loads((out / "r.json").read_text())["outputs"]
    depth = {o["batchnorm"]: o["depth"] for o in outputs if o["batchnorm"]}
    assert [depth[name] for name in graph_order] == list(range(1, 10))
    page, _ = open_report(browser, html)
    assert page.evaluate("document.querySelectorAll('svg.overview g.point').length") == 38
    assert page.evaluate("document.querySelector('svg.overview').getBoundingClientRect().bottom") <= VIEWPORT["height"]
    page.close()
    shutil.rmtree(out / "cpu")


# --- helpers


def _table_rows(text: str, title: str) -> list[list[str]]:
    """Rows of the table under the line starting with ``title`` (header skipped), split on whitespace."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def _pixel_counts(pixels: np.ndarray) -> dict[str, int]:
    """How many pixels are near each of the overview's colours (anti-aliasing blurs edges, so a tolerance)."""
    targets = {"failed": (0xD3, 0x2F, 0x2F), "running_mean": (0x1F, 0x6F, 0xD1),
               "running_var": (0xE0, 0x8A, 0x00), "white": (255, 255, 255)}
    return {name: int((np.abs(pixels.astype(int) - rgb).sum(axis=2) < 40).sum()) for name, rgb in targets.items()}
