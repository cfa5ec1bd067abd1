"""`bndeploy bench`: bndeploy's own path (export -> compile -> runtime) against ONNX Runtime and PyTorch eager.

Every case is a torch module that goes through exactly what a user runs: `bndeploy.export` writes the
ONNX (BatchNorm visible), `compile_model` builds the artifact for the chosen target, and the runtime's
`load_artifact(...).run` is what is timed. ONNX Runtime (default graph optimisations, as deployed) runs the
same ONNX file and PyTorch eager the same module, all with the same number of threads, in one process, in
interleaved rounds (medians). Each row also gives the achieved rate against this machine's bound (the
FMA peak measured by the kernel the artifact carries, or the memory bandwidth), the compile time, and
where the artifact spends its time (`bndeploy profile`'s kernel classes).

Suites: default (the three conv3x3+BN+ReLU reference shapes and BatchNorm in both modes), quick, conv
(every conv class of real CNNs), fold (BatchNorm folded into ConvTranspose and Linear: a DCGAN generator,
an MLP head), zoo (six torchvision networks at batch 1 and 8), zoo-smoke (CI-sized).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.layout import ONNX_FILE
from bndeploy.machine import cpu_description, usable_cpus
from bndeploy.timing import calls_per_sample, interleaved_medians_ms

if TYPE_CHECKING:
    from bndeploy.runtime.profile import MachineBounds

REFERENCE_CONVS = [(1, 64, 56), (8, 128, 28), (1, 256, 14)]
BN_SHAPE = (32, 64, 56, 56)
ZOO_BATCHES = (1, 8)


@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    build: Callable[[], "object"]  # () -> torch.nn.Module (eval mode)
    input_shape: tuple[int, ...]
    mode: str = "inference"
    memory_bound: bool = False  # rate in GB/s against the bandwidth, else GFLOP/s against the FMA peak


@dataclass
class MainKernel:
    """The kernel an artifact spends most of its time in, as `bndeploy profile` measured it."""

    name: str
    kind: str
    share: float
    ms: float
    flops: int
    nbytes: int
    best_ms: float  # the fastest profile round's


@dataclass
class Row:
    case: str
    shape: str
    mode: str
    ms: dict[str, float]
    compile_s: float
    flops: int  # useful FLOPs of one run (every kernel's)
    nbytes: int  # least memory traffic of one run (inputs read per pass, outputs written)
    main_kernel: MainKernel
    max_error: float
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ms["bndeploy"] / self.ms["onnxruntime"]

    def rate(self, memory_bound: bool) -> str:
        seconds = self.ms["bndeploy"] * 1e-3
        return f"{self.nbytes / seconds / 1e9:.1f} GB/s" if memory_bound else f"{self.flops / seconds / 1e9:.0f} GFLOP/s"

    def percent_of_bound(self, bounds: "MachineBounds", memory_bound: bool) -> float | None:
        return bounds.percent_of_bound(0 if memory_bound else self.flops, self.nbytes, self.ms["bndeploy"])

    def kernel_percent_of_bound(self, bounds: "MachineBounds", best: bool = False) -> float | None:
        kernel = self.main_kernel
        return bounds.percent_of_bound(kernel.flops, kernel.nbytes, kernel.best_ms if best else kernel.ms)


# ---------------------------------------------------------------------------------------------
# cases


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
    def build():
        import torch

        from bndeploy.export.models import randomize_batchnorm_state

        torch.manual_seed(0)
        block = torch.nn.Sequential(
            torch.nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            torch.nn.BatchNorm2d(c_out), torch.nn.ReLU())
        return randomize_batchnorm_state(block, 1).eval()

    return build


def _batchnorm(channels: int):
    def build():
        import torch

        from bndeploy.export.models import randomize_batchnorm_state

        return randomize_batchnorm_state(torch.nn.BatchNorm2d(channels), 1).eval()

    return build


def _linear_bn(features_in: int, features_out: int):
    def build():
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(features_in, features_out), torch.nn.ReLU()).eval()

    return build


def _reference(name: str):
    def build():
        from bndeploy.export.models import REFERENCE_MODELS

        return REFERENCE_MODELS[name].factory()

    return build


def _zoo(name: str):
    def build():
        from bndeploy.export.zoo import zoo_model

        return zoo_model(name)

    return build


def conv_case(n: int, c: int, hw: int, mode: str = "inference") -> Case:
    return Case("conv3x3+bn+relu", f"{n},{c},{hw}", _conv_bn_relu(c, c, 3), (n, c, hw, hw), mode)


def train_cases() -> list[Case]:
    """Each train-mode block beside its inference (folded) artifact: what batch statistics cost."""
    blocks = [(conv_case(*shape, "inference"), conv_case(*shape, "train")) for shape in REFERENCE_CONVS]
    resnet = [Case("tiny-resnet", "8,3,16", _reference("tiny-resnet"), (8, 3, 16, 16), mode)
              for mode in ("inference", "train")]
    return [case for pair in blocks for case in pair] + resnet


def bn_case(mode: str) -> Case:
    return Case(f"batchnorm2d {mode}", ",".join(map(str, BN_SHAPE)), _batchnorm(BN_SHAPE[1]), BN_SHAPE, mode,
                memory_bound=True)


CONV_CLASSES = [
    Case("conv3x3 s1", "1,64,56->64", _conv_bn_relu(64, 64, 3), (1, 64, 56, 56)),
    Case("conv3x3 s2", "1,64,56->128", _conv_bn_relu(64, 128, 3, 2), (1, 64, 56, 56)),
    Case("conv1x1", "1,144,28->32", _conv_bn_relu(144, 32, 1), (1, 144, 28, 28)),
    Case("conv1x1 expand", "1,40,28->240", _conv_bn_relu(40, 240, 1), (1, 40, 28, 28)),
    Case("conv7x7 s2 stem", "1,3,224->64", _conv_bn_relu(3, 64, 7, 2), (1, 3, 224, 224)),
    Case("depthwise3x3 s1", "1,144,56", _conv_bn_relu(144, 144, 3, 1, 144), (1, 144, 56, 56)),
    Case("depthwise3x3 s2", "1,96,112", _conv_bn_relu(96, 96, 3, 2, 96), (1, 96, 112, 112)),
    Case("depthwise5x5 s1", "1,240,28", _conv_bn_relu(240, 240, 5, 1, 240), (1, 240, 28, 28)),
    Case("grouped3x3 (8/group)", "1,104,28", _conv_bn_relu(104, 104, 3, 1, 13), (1, 104, 28, 28)),
    Case("grouped3x3 (16/group) s2", "1,128,28", _conv_bn_relu(128, 128, 3, 2, 8), (1, 128, 28, 28)),
    Case("linear+relu", "8,1280->1000", _linear_bn(1280, 1000), (8, 1280)),
]


# BatchNorm folded into the linear ops other than Conv: a GAN generator (ConvTranspose) and an MLP head (Linear)
FOLD_MODELS = [
    Case("dcgan-generator", "batch 64", _reference("dcgan-generator"), (64, 64, 1, 1)),
    Case("mlp-head", "batch 256", _reference("mlp-head"), (256, 128)),
]


def zoo_cases(names, batches, image=224) -> list[Case]:
    return [Case(name, f"batch {batch}", _zoo(name), (batch, 3, image, image)) for batch in batches for name in names]


def suite_cases(suite: str, models: tuple[str, ...] = ()) -> list[Case]:
    from bndeploy.export.zoo import ZOO

    if suite == "default":
        return [conv_case(*shape) for shape in REFERENCE_CONVS] + [bn_case("inference"), bn_case("train")]
    if suite == "quick":
        return [conv_case(*REFERENCE_CONVS[0]), bn_case("inference")]
    if suite == "conv":
        return list(CONV_CLASSES)
    if suite == "fold":
        return list(FOLD_MODELS)
    if suite == "zoo":
        return zoo_cases(models or ZOO, ZOO_BATCHES)
    if suite == "zoo-smoke":
        return zoo_cases(("resnet18",), (1,), image=64)
    if suite == "train":
        return train_cases()
    if suite == "zoo-train":
        return [replace(case, mode="train") for case in zoo_cases(models or ZOO, (8,))]
    raise ValueError(f"unknown suite {suite!r}")


SUITES = ("default", "quick", "conv", "fold", "zoo", "zoo-smoke", "train", "zoo-train")


# ---------------------------------------------------------------------------------------------
# running a case through the product


@dataclass(frozen=True)
class BenchSettings:
    suite: str = "default"
    target: str = "cpu"
    threads: int = 0  # 0: every usable CPU
    rounds: int = 7
    work: Path | None = None  # exports and artifacts; a temporary folder when None
    models: tuple[str, ...] = ()  # zoo suite: these torchvision models only (default: the whole zoo)
    predict: bool = False  # no timing: llvm-mca's prediction of each conv kernel's register tile (any CPU target)


def run_case(case: Case, settings: BenchSettings, work: Path, threads: int) -> tuple[Row, object, dict]:
    """Export, compile and time one case; returns the row, the profile of its artifact and the timed calls."""
    import torch

    from bndeploy.runtime import load_artifact
    from bndeploy.runtime.profile import profile_loaded

    module = case.build()
    onnx_path, artifact_dir, compile_s, inputs = export_and_compile(case, module, settings, work)
    artifact = load_artifact(artifact_dir)
    feeds = {spec.name: t.numpy() for spec, t in zip(artifact.inputs, inputs)}
    session = _ort_session(onnx_path, threads)
    torch.set_num_threads(threads)
    module.train(case.mode == "train")
    torch_input = inputs[0]
    output_name = artifact.outputs[0].name
    got = artifact.run(feeds)[output_name]
    want = session.run([output_name], feeds)[0]
    candidates = {
        "bndeploy": lambda: artifact.run(feeds),
        "onnxruntime": lambda: session.run(None, feeds),
        "torch": lambda: module(torch_input),
    }
    with torch.no_grad():
        ms = interleaved_medians_ms(candidates, settings.rounds, calls_per_sample(candidates["bndeploy"]))
    prof = profile_loaded(artifact, feeds, rounds=settings.rounds)
    top = prof.kernels[0]
    main = MainKernel(top.name, top.kind, prof.share(top), top.ms, top.flops, top.nbytes, top.best_ms)
    row = Row(case.name, case.shape, case.mode, ms, compile_s, sum(k.flops for k in prof.kernels),
              _min_traffic(case, feeds, got), main, float(np.nanmax(np.abs(got - want))) if got.size else 0.0)
    return row, prof, candidates


def export_and_compile(case: Case, module, settings: BenchSettings, work: Path, dump: bool = False):
    """(exported ONNX, artifact dir, compile seconds, inputs): exactly a user's export and compile."""
    from bndeploy.compile import CompileSettings, compile_model
    from bndeploy.export import ExportSettings, export
    from bndeploy.export.loader import LoadedModel
    from bndeploy.export.models import seeded_normal

    folder = work / f"{case.name}-{case.shape}-{case.mode}".replace(" ", "_").replace("/", "_").replace(">", "")
    inputs = (seeded_normal(case.input_shape, 0),)
    exported = export(LoadedModel(case.name, module, inputs), folder / "export",
                      ExportSettings(modes=(case.mode,), force=True,
                                     train_dropout="identity" if case.mode == "train" else None))[case.mode]
    start = time.perf_counter()
    onnx_path = exported / ONNX_FILE
    (artifact_dir,) = compile_model(onnx_path, [settings.target], folder / "artifact",
                                    CompileSettings(force=True, dump=dump))
    return onnx_path, artifact_dir, time.perf_counter() - start, inputs


def predict_case(case: Case, settings: BenchSettings, work: Path) -> list:
    """llvm-mca's prediction for the register tile of each of bndeploy's kernels in the case's compiled library."""
    from bndeploy.compile.targets import resolve_target
    from bndeploy.compile.schedules.fma_peak import FMA_PEAK_SYMBOL
    from bndeploy.compile.throughput import predict_kernels
    from bndeploy.layout import ASSEMBLY_DUMP, DUMP_DIR

    _, artifact_dir, _, _ = export_and_compile(case, case.build(), settings, work, dump=True)
    spec = resolve_target(settings.target)
    cpu = str(spec.tvm_target().attrs.get("mcpu", ""))
    asm = (artifact_dir / DUMP_DIR / ASSEMBLY_DUMP).read_text()
    return [p for p in predict_kernels(asm, spec.triple, cpu, only="bndeploy_") if p.kernel != FMA_PEAK_SYMBOL]


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _min_traffic(case: Case, feeds: dict, output: np.ndarray) -> int:
    """Bytes a memory-bound case must move at least: inputs read once per pass, the output written."""
    reads = sum(a.nbytes for a in feeds.values())
    passes = 2 if case.mode == "train" else 1  # train BN reads x for its statistics, then to normalise
    return passes * reads + output.nbytes


# ---------------------------------------------------------------------------------------------
# report


def format_table(rows: list[Row], cases: list[Case], context: dict) -> str:
    """One row per case. "% of bound": the whole run against this machine's bound for its work (FLOPs at
    the FMA peak, or bytes at the memory bandwidth); "main kernel": the kernel class the artifact spends
    most time in, its share, and that kernel alone against its own bound: its median profile round, and
    its fastest."""
    from bndeploy.runtime.profile import MachineBounds, format_percent

    bounds = MachineBounds(context.get("fma_peak_gflops"), context["bandwidth_gbs"], "")
    header = ["case", "shape", "mode", "bndeploy ms", "ORT ms", "torch ms", "bndeploy/ORT", "rate", "% of bound",
              "main kernel (share, % of its bound, best round)", "compile s", "max|err| vs ORT"]
    lines = [header]
    for row, case in zip(rows, cases):
        lines.append([row.case, row.shape, row.mode, f"{row.ms['bndeploy']:.3f}", f"{row.ms['onnxruntime']:.3f}",
                      f"{row.ms['torch']:.3f}", f"{row.ratio:.2f}x", row.rate(case.memory_bound),
                      format_percent(row.percent_of_bound(bounds, case.memory_bound)),
                      f"{row.main_kernel.kind} ({100 * row.main_kernel.share:.0f}%, "
                      f"{format_percent(row.kernel_percent_of_bound(bounds))}, "
                      f"{format_percent(row.kernel_percent_of_bound(bounds, best=True))})",
                      f"{row.compile_s:.1f}", f"{row.max_error:.1e}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + ["", *summary_lines(rows, context)])


def summary_lines(rows: list[Row], context: dict) -> list[str]:
    lines = train_over_inference_lines(context)
    for mode_shape, group in _geomean_groups(rows).items():
        ratios = [r.ratio for r in group]
        geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append(f"geomean bndeploy/ORT {mode_shape}: {geomean:.2f}x over {len(ratios)} cases "
                     f"(max {max(ratios):.2f}x, {group[ratios.index(max(ratios))].case})")
    peak = context.get("fma_peak_gflops")
    lines.append(
        f"CPU: {context['cpu']}; target {context['target']} ({context['isa']}); peers {context.get('peers', 'unnamed')}; "
        f"{context['threads']} threads for every runtime; {context['rounds']} interleaved rounds, medians. Bounds "
        f"measured here: FMA peak "
        f"{f'{peak:.0f} GFLOP/s' if peak else 'not measured'} (the fastest of the artifacts' FMA loops), memory "
        f"{context['bandwidth_gbs']:.1f} GB/s (parallel copy of 64 MB; data that stays in cache can beat it). "
        "Shared cores make absolute times noisy; compare ratios.")
    return lines


def train_over_inference_lines(context: dict) -> list[str]:
    """For a case timed in both modes: the train-mode artifact's time over the inference (folded) one's, from
    rounds that interleave the two (timed in rounds of their own, a slowed vCPU would move the ratio)."""
    return [f"{pair['case']} {pair['shape']}: train mode {pair['bndeploy']:.2f}x the inference (folded) artifact's "
            f"time; ONNX Runtime {pair['onnxruntime']:.2f}x (the two modes interleaved)"
            for pair in context.get("train_over_inference", [])]


def time_train_over_inference(calls: dict, rounds: int) -> list[dict]:
    """[{case, shape, bndeploy: train/inference, onnxruntime: train/inference}] for each case timed in both
    modes, `calls` holding each (case, shape, mode)'s timed calls (run_case's)."""
    ratios = []
    for (case, shape, mode), train in calls.items():
        folded = calls.get((case, shape, "inference")) if mode == "train" else None
        if folded is None:
            continue
        candidates = {f"{runtime} {which}": timed[runtime] for which, timed in (("train", train), ("inference", folded))
                      for runtime in ("bndeploy", "onnxruntime")}
        ms = interleaved_medians_ms(candidates, rounds, calls_per_sample(folded["bndeploy"]))
        ratios.append({"case": case, "shape": shape, **{runtime: ms[f"{runtime} train"] / ms[f"{runtime} inference"]
                                                        for runtime in ("bndeploy", "onnxruntime")}})
    return ratios


def _geomean_groups(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    modes = {row.mode for row in rows}
    for row in rows:
        key = row.shape if row.shape.startswith("batch") else "all"
        groups.setdefault(f"{key}, {row.mode}" if len(modes) > 1 else key, []).append(row)
    return groups


def run_suite(settings: BenchSettings, say=print) -> tuple[list[Row], list[Case], dict]:
    from bndeploy.compile.targets import resolve_target

    from bndeploy.runtime.artifact import use_all_cpus

    spec = resolve_target(settings.target)
    if spec.device != "cpu" or spec.cross is not None:
        raise BndeployError(f"target {spec.name!r} does not run on this machine: time it on the device "
                            f"(bndeploy check --rpc), or predict its CPU kernels with --predict")
    threads = settings.threads or usable_cpus()
    use_all_cpus(threads)
    cases = suite_cases(settings.suite, settings.models)
    rows, context = [], {"cpu": cpu_description(), "target": spec.name, "threads": threads, "rounds": settings.rounds,
                         "peers": peer_description()}
    in_both_modes = ({(c.name, c.shape) for c in cases if c.mode == "train"}
                     & {(c.name, c.shape) for c in cases if c.mode == "inference"})
    calls = {}
    with _work_folder(settings.work) as work:
        for index, case in enumerate(cases, start=1):
            say(f"[{index}/{len(cases)}] {case.name} {case.shape} ({case.mode}): export, compile for {spec.name}, time")
            row, prof, timed = run_case(case, settings, work, threads)
            if (case.name, case.shape) in in_both_modes:
                calls[(case.name, case.shape, case.mode)] = timed
            rows.append(row)
            # Bounds are maxima: the best measurement over the suite (a slowed vCPU only lowers one).
            context["fma_peak_gflops"] = max(context.get("fma_peak_gflops") or 0.0, prof.bounds.peak_gflops or 0.0) or None
            context["bandwidth_gbs"] = max(context.get("bandwidth_gbs", 0.0), prof.bounds.bandwidth_gbs)
            context.setdefault("isa", prof.bounds.peak_source.split()[0])
        if calls:
            say("both modes of each block, interleaved: train over inference")
            context["train_over_inference"] = time_train_over_inference(calls, settings.rounds)
    return rows, cases, context


def peer_description() -> str:
    """The peers' versions and the vector ISA torch dispatches to: both pick their kernels from CPUID (ORT's
    version says "+no-avx512" for the copy scripts/ort-without-avx512.py writes)."""
    import onnxruntime
    import torch

    return (f"ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels)")


class _work_folder:
    def __init__(self, given: Path | None):
        self._given, self._tmp = given, None

    def __enter__(self) -> Path:
        if self._given is not None:
            self._given.mkdir(parents=True, exist_ok=True)
            return self._given
        self._tmp = tempfile.TemporaryDirectory(prefix="bndeploy-bench-")
        return Path(self._tmp.name)

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()


def predict_suite(settings: BenchSettings, say=print) -> list[tuple[str, object]]:
    """(case label, LoopPrediction) for every conv kernel of every case, compiled for the target."""
    from bndeploy.compile.targets import resolve_target

    spec = resolve_target(settings.target)
    if spec.device != "cpu":
        raise BndeployError(f"--predict reads CPU assembly; {spec.name!r} is a {spec.device} target")
    cases, rows = suite_cases(settings.suite, settings.models), []
    with _work_folder(settings.work) as work:
        for index, case in enumerate(cases, start=1):
            say(f"[{index}/{len(cases)}] {case.name} {case.shape} ({case.mode}): export, compile for {spec.name}, predict")
            rows += [(f"{case.name} {case.shape}", prediction) for prediction in predict_case(case, settings, work)]
    return rows


def main(args) -> int:
    models = tuple(m for m in (args.models or "").split(",") if m)
    settings = BenchSettings(args.suite, args.target, args.threads, args.rounds, args.work, models, args.predict)
    if settings.predict:
        return _main_predict(settings, args.json)
    rows, cases, context = run_suite(settings, say=lambda line: print(line, flush=True))
    print()
    print(format_table(rows, cases, context))
    if args.json:
        from bndeploy.files import write_json

        write_json(args.json, {"context": context, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]})
    return 0


def _main_predict(settings: BenchSettings, json_path: Path | None) -> int:
    from bndeploy.compile.throughput import format_predictions

    rows = predict_suite(settings, say=lambda line: print(line, flush=True))
    print()
    print(f"target {settings.target}, suite {settings.suite}")
    print(format_predictions(rows))
    if json_path:
        from bndeploy.files import write_json

        write_json(json_path, {"context": {"target": settings.target, "predicted": "llvm-mca"},
                               "rows": [{"case": case} | asdict(p) | {"percent_of_peak": p.percent_of_peak}
                                        for case, p in rows]})
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark bndeploy's compiled artifacts against ONNX Runtime and torch")
    parser.add_argument("--suite", choices=SUITES, default="default",
                        help="default: conv3x3+BN+ReLU reference shapes + BatchNorm both modes; quick: one conv + BN; "
                             "conv: every conv class; fold: a DCGAN generator and an MLP head (BN folded into ConvTranspose "
                             "and Linear); zoo: six torchvision networks at batch 1 and 8; zoo-smoke: ResNet-18 "
                             "at 64x64 (CI); train: the conv3x3+BN+ReLU shapes and tiny-resnet in both modes; "
                             "zoo-train: the zoo in train mode at batch 8")
    parser.add_argument("--target", default="cpu",
                        help="timing: cpu (this host), x86-64-avx2 or x86-64-avx512; --predict: any CPU target "
                             "(default: %(default)s)")
    parser.add_argument("--predict", action="store_true",
                        help="no timing: llvm-mca's predicted throughput of each conv kernel's register tile, for CPUs "
                             "no board here can time (cortex-a76, carmel, ...)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=0, help="threads for every runtime (default: all usable CPUs)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--work", type=Path, help="keep exports and artifacts in this folder (default: a temporary one)")
    parser.add_argument("--models", help="zoo suite: comma-separated torchvision models (default: the whole zoo)")
    parser.set_defaults(func=main)
