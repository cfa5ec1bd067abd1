"""``bndeploy pipeline``: export -> compile -> run and check, for the embedded default or a user's model.

With no arguments it runs the seed BatchNorm2d, the conv->BN blocks and the small trained CNN, each in
inference and train mode, compiled for the host CPU (and CUDA when nvcc is present: compiled, and run
when a GPU is present), and prints one summary table. The stages talk only through their directories.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bndeploy.errors import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, BndeployError
from bndeploy.files import write_json
from bndeploy.layout import ONNX_FILE, read_artifact_manifest
from bndeploy.progress import NoProgress, Progress, progress_for

MARKER = ".bndeploy-pipeline"


@dataclass(frozen=True)
class PipelineSettings:
    models: tuple[str, ...] = ()              # empty: the embedded default models
    modes: tuple[str, ...] = ("inference", "train")
    targets: tuple[str, ...] = ()             # empty: cpu, plus cuda when nvcc is installed
    out: Path = Path("bndeploy-out")
    force: bool = False
    timing_rounds: int = 2
    train_dropout: str | None = None          # "identity": train mode of a model with dropout, dropout as identity


@dataclass
class Row:
    model: str
    mode: str
    target: str
    folded: str = ""          # "folded/total" BatchNorms
    max_error: float | None = None
    result: str = "error"     # pass | FAIL | compiled | error
    bndeploy_ms: float | None = None
    onnxruntime_ms: float | None = None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.bndeploy_ms is None or not self.onnxruntime_ms:
            return None
        return self.bndeploy_ms / self.onnxruntime_ms


@dataclass
class PipelineResult:
    rows: list[Row] = field(default_factory=list)
    out: Path = Path()
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if any(r.result == "error" for r in self.rows):
            return EXIT_ERROR
        return EXIT_MISMATCH if any(r.result == "FAIL" for r in self.rows) else EXIT_OK

    def table(self) -> str:
        header = ("model", "mode", "target", "BN fused", "max |err|", "result", "bndeploy ms", "ORT ms", "ratio")
        lines = [header] + [_cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{r.model}/{r.mode}/{r.target}: {r.detail}" for r in self.rows if r.detail]
        if any(r.result == "compiled" for r in self.rows):
            notes.append("compiled: CUDA artifacts were built (device code inside) but not run: no CUDA device here")
        verdict = {EXIT_OK: "PASS", EXIT_MISMATCH: "FAIL (mismatch)", EXIT_ERROR: "ERROR"}[self.exit_code]
        return "\n".join(text + [""] + notes + [f"result: {verdict} in {self.seconds:.1f} s; outputs in {self.out}"])


def _cells(r: Row) -> tuple[str, ...]:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    return (r.model, r.mode, r.target, r.folded or "-", fmt(r.max_error, ".2e"), r.result,
            fmt(r.bndeploy_ms, ".3f"), fmt(r.onnxruntime_ms, ".3f"), fmt(r.ratio, ".2f"))


def run_pipeline(settings: PipelineSettings = PipelineSettings(), user_model=None,
                 progress: Progress | None = None) -> PipelineResult:
    """Run every (model, mode, target); ``user_model`` is a ``bndeploy.export.LoadedModel`` to use instead.
    ``progress`` (bndeploy.progress) hears of every stage as it starts and ends, from several threads."""
    from bndeploy.export import DEFAULT_PIPELINE_MODELS

    progress = progress or NoProgress()
    start = time.perf_counter()
    out = _prepare_output(Path(settings.out), settings.force)
    targets = settings.targets or default_targets()
    result = PipelineResult(out=out.absolute())
    names = [user_model.name] if user_model is not None else list(settings.models or DEFAULT_PIPELINE_MODELS)
    later: list = []
    with progress.stage("pipeline", f"{len(names)} model(s), {'/'.join(settings.modes)}, on {', '.join(targets)}"):
        # Two CUDA builds at a time: each is mostly nvcc and TVM codegen in its own worker process.
        with ThreadPoolExecutor(max_workers=2) as background:
            for name in names:
                _run_model(name, user_model, out, settings, targets, progress, background, later, result)
        _finish(later, settings.timing_rounds, progress)
    result.seconds = time.perf_counter() - start
    (out / "summary.txt").write_text(result.table() + "\n")
    write_json(out / "summary.json", {"exit_code": result.exit_code, "seconds": result.seconds,
                                      "rows": [asdict(r) | {"ratio": r.ratio} for r in result.rows]})
    return result


def _run_model(name, user_model, out: Path, settings: PipelineSettings, targets, progress: Progress, background,
               later, result: PipelineResult) -> None:
    from bndeploy.export import ModeNotWrittenError, load_model

    refused: dict[str, str] = {}
    try:
        with progress.stage(name, "export"):
            loaded = user_model if user_model is not None else load_model(name)
            exports = _export(loaded, out / name / "export", settings.modes, settings.train_dropout)
    except ModeNotWrittenError as e:  # e.g. train mode of a model with dropout: the other modes go on
        exports, refused = e.written, e.refused
    except Exception as e:  # one broken model must not hide the others' results
        exports, refused = {}, {mode: _describe(e) for mode in settings.modes}
    for mode in settings.modes:
        if mode in refused:
            result.rows.append(Row(name, mode, "-", detail=f"export: {refused[mode]}"))
        else:
            result.rows += _compile_and_check(name, mode, exports[mode], targets, out / name / mode, progress,
                                              background, later)


def _describe(error: Exception) -> str:
    if isinstance(error, BndeployError):
        return str(error)
    return f"internal error: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


def default_targets() -> tuple[str, ...]:
    return ("cpu", "cuda") if shutil.which("nvcc") else ("cpu",)


def _prepare_output(out: Path, force: bool) -> Path:
    """The pipeline owns its output folder: it replaces one it made before, anything else only with force."""
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()) and not force:
        raise BndeployError(f"{out} exists and was not made by bndeploy pipeline; pass --force or another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by bndeploy pipeline; replaced by its next run\n")
    return out


def _export(loaded, out: Path, modes, train_dropout: str | None) -> dict[str, Path]:
    from bndeploy.export import ExportSettings, export

    return export(loaded, out, ExportSettings(modes=tuple(modes), train_dropout=train_dropout))


def _compile_and_check(name, mode, export_dir: Path, targets, out: Path, progress: Progress, background,
                       later) -> list[Row]:
    """Compile and check the CPU targets now; CUDA builds (nvcc in a worker process) go to ``background``
    so they overlap with the CPU work. Latency measurements and GPU checks wait in ``later`` until no
    build runs, so nothing competes with a timed run."""
    rows = {target: Row(name, mode, target) for target in targets}
    groups = [[t for t in targets if not t.startswith("cuda")], [t for t in targets if t.startswith("cuda")]]
    for group in filter(None, groups):
        build = lambda group=group: _compile(rows, group, export_dir, out, progress)
        if group[0].startswith("cuda"):
            later.append(background.submit(build))
            continue
        for row, artifact in build():
            _check(row, artifact, progress)
            later.append((row, artifact))
    return list(rows.values())


def _compile(rows: dict, group: list[str], export_dir: Path, out: Path, progress: Progress) -> list:
    """One compile_model call for the group (the ONNX is imported and rewritten once)."""
    from bndeploy.compile import CompileSettings, compile_model

    target_out = out / group[0] if len(group) == 1 else out
    try:
        with progress.stage(_subject(rows[group[0]]), f"compile for {', '.join(group)}"):
            artifacts = compile_model(export_dir / ONNX_FILE, group, target_out, CompileSettings())
    except Exception as e:  # one broken model must not hide the others' results
        for target in group:
            rows[target].detail = f"compile: {_describe(e)}"
        return []
    for target, artifact in zip(group, artifacts):
        rows[target].folded = _folded(artifact)
    return [(rows[target], artifact) for target, artifact in zip(group, artifacts)]


def _subject(row: Row) -> str:
    return f"{row.model}/{row.mode}"


def _finish(later: list, rounds: int, progress: Progress) -> None:
    """After every build: check the CUDA artifacts (where a GPU is), then time every checked artifact."""
    checked = []
    for item in later:
        if isinstance(item, tuple):
            checked.append(item)
            continue
        for row, artifact in item.result():
            _check(row, artifact, progress)
            checked.append((row, artifact))
    for row, artifact in checked:
        if row.result in ("pass", "FAIL"):
            with progress.stage(_subject(row), f"time on {row.target}"):
                row.bndeploy_ms, row.onnxruntime_ms = _latency(artifact, rounds)


def _folded(artifact: Path) -> str:
    """"folded k/n" (inference: BNs folded into their linear op), "stats k/n" (train: BNs whose batch
    statistics are summed in their conv's epilogue)."""
    fusion = read_artifact_manifest(artifact).get("fusion", [])
    trained = [f for f in fusion if "statistics" in f]
    if trained:
        return f"stats {sum(1 for f in trained if f['statistics'].startswith('fused'))}/{len(fusion)}"
    return f"folded {sum(1 for f in fusion if f.get('folded'))}/{len(fusion)}"


def _check(row: Row, artifact: Path, progress: Progress) -> None:
    from bndeploy.runtime import check

    if not _device_available(artifact):
        row.result = "compiled"
        return
    try:
        with progress.stage(_subject(row), f"check on {row.target}"):
            report = check(artifact)
    except Exception as e:  # one broken artifact must not hide the others' results
        row.detail = f"check: {_describe(e)}"
        return
    report_base = artifact.parent / f"{artifact.name}-check"
    report.write_json(f"{report_base}.json")
    report.write_junit(f"{report_base}.junit.xml")
    row.result = "pass" if report.passed else "FAIL"
    row.max_error = max((c.max_abs_error for c in report.comparisons), default=None)
    if not report.passed:
        row.detail = "; ".join(c.title for c in report.failures) + f" (see {report_base}.json)"


def _device_available(artifact: Path) -> bool:
    manifest = read_artifact_manifest(artifact)
    if manifest["target"]["device"] != "cuda":
        return True
    import tvm

    return bool(tvm.cuda(0).exist)


def _latency(artifact_dir: Path, rounds: int) -> tuple[float, float]:
    import onnxruntime as ort

    from bndeploy.runtime import load_artifact

    from bndeploy.runtime.sources import load_export_references
    from bndeploy.timing import interleaved_medians_ms

    artifact = load_artifact(artifact_dir)
    feed = load_export_references(artifact.manifest, artifact.directory).inputs()
    session = ort.InferenceSession(artifact.manifest["source"]["onnx"], providers=["CPUExecutionProvider"])
    medians = interleaved_medians_ms({"bndeploy": lambda: artifact.run(feed),
                                      "onnxruntime": lambda: session.run(None, feed)}, rounds=rounds, calls=5)
    return medians["bndeploy"], medians["onnxruntime"]


def register(sub: argparse._SubParsersAction) -> None:
    from bndeploy.export import TRAIN_DROPOUT

    p = sub.add_parser("pipeline", help="export, compile, run and check: the embedded default or your model",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="*", help="reference model names or one file.py:factory / model.pt "
                   "(default: the embedded default set)")
    p.add_argument("--mode", choices=["inference", "train", "both"], default="both")
    p.add_argument("--target", action="append", default=[], help="compile target (repeatable; default: cpu, "
                   "plus cuda when nvcc is installed)")
    p.add_argument("--input-shape", action="append", default=None, help="input shape for your own model")
    p.add_argument("--weights", help="state_dict for file.py:factory")
    p.add_argument("--out", default="bndeploy-out", help="output folder (default: ./bndeploy-out)")
    p.add_argument("--force", action="store_true", help="replace an --out folder not made by the pipeline")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds per artifact (each: 5 calls of each runtime)")
    p.add_argument("--train-dropout", choices=TRAIN_DROPOUT, help="train mode of a model with active dropout: "
                   "export dropout as identity (see bndeploy export --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bndeploy.export import REFERENCE_MODELS, load_model, parse_shape

    user = [m for m in args.model if m not in REFERENCE_MODELS]
    if user and len(args.model) > 1:
        raise BndeployError("give either reference model names or one model of your own, not both")
    user_model = None
    if user:
        shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
        user_model = load_model(user[0], shapes, args.weights)
    modes = ("inference", "train") if args.mode == "both" else (args.mode,)
    settings = PipelineSettings(models=tuple(args.model) if not user else (), modes=modes,
                                targets=tuple(args.target), out=Path(args.out), force=args.force,
                                timing_rounds=args.rounds, train_dropout=args.train_dropout)
    progress = progress_for(sys.stderr)  # a live display on a terminal, whole lines in CI or a pipe
    try:
        result = run_pipeline(settings, user_model, progress)
    finally:
        progress.close()
    print(result.table())
    return result.exit_code
