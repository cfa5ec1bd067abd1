"""`bndeploy tune`: a MetaSchedule search over one model's kernels, kept only where it beats bndeploy's own.

The kernels are exactly the ones `bndeploy compile` builds: the same import, BatchNorm passes,
channels-last layout, kernel routing and fusion, stopped before bndeploy schedules them. MetaSchedule
searches schedules for each (measured on this machine, or on boards behind a TVM RPC tracker: several
boards under one key measure in parallel), then every kernel's best schedule is measured once more next
to bndeploy's default schedule with the same builder and runner, and a tuned schedule is kept only when it
is faster. The result is a folder `bndeploy compile --tuned` reads:

    database_workload.json, database_tuning_record.json   MetaSchedule's JSON database (kept kernels only)
    tuning.json                                            what was measured, per kernel (bndeploy.layout)
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import tvm
from tvm import relax, tirx

from bndeploy.errors import BndeployError
from bndeploy.files import atomic_directory, check_output_dir, write_json

from .targets import TargetSpec, library_compiler, resolve_target
from .tir_pipeline import build_kernel

log = logging.getLogger(__name__)

TUNING_REPORT = "tuning.json"
KEEP_WHEN_FASTER_BY = 0.03  # a tuned schedule must beat the default by this share (measurement noise)


@dataclass(frozen=True)
class TuneSettings:
    trials: int = 64  # MetaSchedule measurements, over all kernels
    rpc: str | None = None  # HOST:PORT of a TVM RPC tracker whose boards measure the candidates
    key: str | None = None  # the boards' key at the tracker
    timeout_s: float = 120.0  # per build and per measurement (the first build imports TVM's intrinsics)
    num_cores: int | None = None  # cores of the measuring machine (default: this machine's usable CPUs)
    force: bool = False

    def validate(self) -> None:
        if self.trials < 1:
            raise BndeployError(f"--trials must be at least 1, got {self.trials}")
        if bool(self.rpc) != bool(self.key):
            raise BndeployError("tuning over RPC needs both --rpc HOST:PORT and --key KEY")


@dataclass
class KernelTuning:
    name: str
    calls: int  # call sites in the model
    default_us: float | None  # bndeploy's schedule, measured
    tuned_us: float | None  # MetaSchedule's best, measured again beside it
    kept: bool

    @property
    def speedup(self) -> float | None:
        if self.default_us and self.tuned_us:
            return self.default_us / self.tuned_us
        return None


@dataclass
class TuneReport:
    target: str
    onnx_sha256: str
    trials: int
    measured_on: str
    kernels: list[KernelTuning] = field(default_factory=list)

    def estimated_speedup(self) -> float | None:
        """Model time with the defaults over model time with the kept schedules, from the kernel figures."""
        default = sum((k.default_us or 0.0) * k.calls for k in self.kernels)
        tuned = sum(((k.tuned_us if k.kept else k.default_us) or 0.0) * k.calls for k in self.kernels)
        return default / tuned if tuned else None

    def table(self) -> str:
        rows = [("kernel", "calls", "default us", "tuned us", "speedup", "kept")]
        for k in self.kernels:
            rows.append((k.name, str(k.calls), _us(k.default_us), _us(k.tuned_us),
                         f"{k.speedup:.2f}x" if k.speedup else "-", "yes" if k.kept else "no"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        speedup = self.estimated_speedup()
        kept = sum(k.kept for k in self.kernels)
        lines.append("")
        lines.append(f"{kept} of {len(self.kernels)} kernels keep a tuned schedule; estimated model speedup "
                     f"{speedup:.2f}x over bndeploy's defaults (kernel times x calls)" if speedup else
                     f"{kept} of {len(self.kernels)} kernels keep a tuned schedule")
        lines.append(f"target {self.target}; {self.trials} MetaSchedule trials; measured on {self.measured_on}")
        return "\n".join(lines)


def _us(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


Progress = Callable[[str], None]


def tune_model(onnx_path, target: str, out, settings: TuneSettings = TuneSettings(),
               progress: Progress | None = None) -> TuneReport:
    """Tune the kernels of `onnx_path` for `target`; writes the tuning folder `out` and returns the report."""
    from .compiler import CompileSettings, load_source, lower_to_relax

    settings.validate()
    say = progress or (lambda message: None)
    out = Path(out)
    check_output_dir(out, settings.force)
    spec = resolve_target(target)
    if spec.device != "cpu":
        raise BndeployError(f"bndeploy tune tunes CPU targets; {spec.name!r} is a {spec.device} target")
    source = load_source(onnx_path)
    mod, _, _ = lower_to_relax(source, CompileSettings())
    tasks = kernel_tasks(mod, spec.tvm_target())
    say(f"{len(tasks)} kernels to tune for {spec.name}, {settings.trials} trials")
    with tempfile.TemporaryDirectory(prefix="bndeploy-tune-") as work:
        builder, runner = _builder(spec, settings), _runner(settings)
        searched = _search(tasks, spec, settings, work, builder, runner, say)
        say("measuring the best schedules beside bndeploy's defaults")
        report = TuneReport(spec.name, source.sha256, settings.trials, _measured_on(settings))
        report.kernels, kept = _compare(tasks, searched, spec, settings, builder, runner)
        with atomic_directory(out, settings.force) as tmp:
            _write_database(tmp, kept)
            write_json(tmp / TUNING_REPORT, {"kind": "tuning", **asdict(report)})
    return report


# --------------------------------------------------------------------------------------------------
# Tasks: the model's kernels as bndeploy builds them, unscheduled


@dataclass
class KernelTask:
    name: str
    func: tirx.PrimFunc
    calls: int

    @property
    def module(self) -> tvm.IRModule:
        return tvm.IRModule({"main": self.func.with_attr("global_symbol", "main")})


def kernel_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list[KernelTask]:
    from .cpu import fusion_passes

    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(mod)
    calls = _call_counts(fused)
    tasks = []
    for gv, func in fused.functions.items():
        if isinstance(func, tirx.PrimFunc) and _is_unscheduled(func):
            tasks.append(KernelTask(gv.name_hint, func, calls.get(gv.name_hint, 1)))
    return tasks


def _is_unscheduled(func: tirx.PrimFunc) -> bool:
    from .schedules import SCHEDULED_ATTR

    return func.attrs is None or SCHEDULED_ATTR not in func.attrs


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.call_tir"):
            name = expr.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


# --------------------------------------------------------------------------------------------------
# Search and comparison


def _builder(spec: TargetSpec, settings: TuneSettings):
    from tvm.s_tir import meta_schedule as ms

    fcompile = library_compiler(spec)
    if fcompile is None:
        return ms.builder.LocalBuilder(timeout_sec=settings.timeout_s, max_workers=1, f_build=build_kernel)
    return ms.builder.LocalBuilder(timeout_sec=settings.timeout_s, max_workers=1, f_build=build_kernel,
                                   f_export=_cross_export(spec.cross.compiler))


def _cross_export(compiler: str):
    def export(module) -> str:
        from tvm.support import cc

        path = tempfile.mktemp(suffix=".so", prefix="bndeploy-tune-")
        module.export_library(path, fcompile=cc.cross_compiler(compiler))
        return path

    return export


def _runner(settings: TuneSettings):
    from tvm.s_tir import meta_schedule as ms

    if settings.rpc is None:
        return ms.runner.LocalRunner(timeout_sec=settings.timeout_s)
    host, _, port = settings.rpc.rpartition(":")
    if not host or not port.isdigit():
        raise BndeployError(f"--rpc must be HOST:PORT of a TVM RPC tracker, got {settings.rpc!r}")
    check_board_runs_candidates(settings)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=settings.key,
                                 session_timeout_sec=int(settings.timeout_s))
    return ms.runner.RPCRunner(rpc_config=config, f_alloc_argument=alloc_board_arguments)


BOARD_FOR_TUNING = ("tuning uploads a new library for every candidate through MetaSchedule's runner, which speaks "
                    "plain TVM RPC: serve the board with `bndeploy device serve --allow-any-library` (no --allow, "
                    "no --token, no TLS), register it with a tracker without --token or TLS, on a network you trust, "
                    "for the time of the tuning")


def check_board_runs_candidates(settings: TuneSettings) -> None:
    """Fail now, in words, where every candidate would fail later: a board that loads approved libraries
    only, or a tracker or board MetaSchedule's plain client cannot talk to (token, TLS)."""
    from bndeploy.device_protocol import loads_approved_only

    board = f"the board with key {settings.key!r} at tracker {settings.rpc}"
    try:
        policy = board_policy(settings.rpc, settings.key, settings.timeout_s)
    except BndeployError as e:
        raise BndeployError(f"cannot reach {board} with plain TVM RPC ({e}); {BOARD_FOR_TUNING}") from None
    if loads_approved_only(policy):
        raise BndeployError(f"{board} loads approved libraries only; {BOARD_FOR_TUNING}")


def board_policy(tracker: str, key: str, timeout_s: float) -> dict | None:
    """What a board registered at ``tracker`` loads, asked over plain TVM RPC as MetaSchedule's runner will
    talk to it: an approved-only bndeploy server's policy, or None (TVM's own server). Gives up after
    ``timeout_s``."""
    import gc

    from tvm import rpc

    from bndeploy.deadline import call_with_deadline
    from bndeploy.device_protocol import POLICY_FUNCTION, read_policy

    host, _, port = tracker.rpartition(":")

    def ask(_deadline: float) -> dict | None:
        try:
            session = rpc.connect_tracker(host, int(port)).request(key, session_timeout=int(timeout_s))
            try:
                answer = session.get_function(POLICY_FUNCTION)
            except Exception:  # TVM's own server has no such function
                return None
            policy = read_policy(answer())
            answer = session = None
            gc.collect()  # the session ends when its last remote object is freed: free the board for the runner
            return policy
        except Exception as e:  # TVM raises RPCError/TVMError/OSError with C++ text
            raise BndeployError(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__) from None

    return call_with_deadline(ask, timeout_s, "asking the board what it loads", longer="--timeout")


def alloc_board_arguments(session, device, args_info, alloc_repeat):
    """MetaSchedule's RPC runner fills arguments with a random function of TVM's compiler library, which
    a board running only TVM's runtime (`bndeploy device serve`) lacks; random data made here and copied
    over serves the same purpose. (Runs in MetaSchedule's worker process: a module-level function.)"""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor):
        tensor.copyfrom(rng.uniform(-1.0, 1.0, size=tuple(tensor.shape)).astype(tensor.dtype))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _measured_on(settings: TuneSettings) -> str:
    if settings.rpc:
        return f"boards with key {settings.key!r} at tracker {settings.rpc}"
    from bndeploy.machine import cpu_description

    return f"this machine: {cpu_description()}"


def tuning_target(spec: TargetSpec, settings: TuneSettings) -> tvm.target.Target:
    """The compile target with the core count MetaSchedule sizes its parallel loops for."""
    from bndeploy.machine import usable_cpus

    return tvm.target.Target({**spec.tvm, "num-cores": settings.num_cores or usable_cpus()})


def _search(tasks: list[KernelTask], spec: TargetSpec, settings: TuneSettings, work: str, builder, runner,
            say: Progress):
    from tvm.s_tir import meta_schedule as ms

    target = tuning_target(spec, settings)
    contexts = [ms.TuneContext(mod=task.module, target=target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=task.name) for task in tasks]
    return ms.tune_tasks(
        tasks=contexts, task_weights=[float(task.calls) for task in tasks], work_dir=work,
        max_trials_global=settings.trials, num_trials_per_iter=min(16, settings.trials),
        builder=builder, runner=runner, cost_model="xgb",
        measure_callbacks=[*ms.MeasureCallback.create("default"), trials_progress(settings.trials, say)],
    )


def trials_progress(total: int, say: Progress, steps: int = 10):
    """A MetaSchedule measure callback that says how many trials are measured, at most `steps` times over the
    budget `total` (a search may measure a batch past it): a search runs for minutes to hours, silent
    otherwise."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    started = time.monotonic()

    @derived_object
    class TrialsProgress(PyMeasureCallback):
        def __init__(self):
            self.measured, self.failed, self.said = 0, 0, 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.measured += len(runner_results)
            self.failed += sum(1 for b, r in zip(builder_results, runner_results) if b.error_msg or r.error_msg)
            step = min(steps, self.measured * steps // max(total, 1))
            if step > self.said:
                self.said = step
                failed = f", {self.failed} failed to build or run" if self.failed else ""
                say(f"trials measured: {self.measured} (budget {total}){failed}, {time.monotonic() - started:.0f} s")

    return TrialsProgress()


def _compare(tasks: list[KernelTask], searched, spec: TargetSpec, settings: TuneSettings, builder, runner):
    """Measure every kernel's best searched schedule and bndeploy's default one in one batch with the same
    builder and runner; returns the results and the (task, record) pairs to keep."""
    from .schedules import schedule_func

    target = tuning_target(spec, settings)
    records = [searched.query_tuning_record(task.module, target, "main") for task in tasks]
    defaults = [_as_module(schedule_func(task.func)) for task in tasks]
    tuned = [searched.query_ir_module(task.module, target, "main") if record is not None else None
             for task, record in zip(tasks, records)]
    candidates = defaults + [module for module in tuned if module is not None]
    times = iter(_measure(candidates, target, builder, runner))
    default_us = [next(times) for _ in defaults]
    tuned_us = [next(times) if module is not None else None for module in tuned]
    results, kept = [], []
    for task, record, default, best in zip(tasks, records, default_us, tuned_us):
        keep = best is not None and (default is None or best < default * (1 - KEEP_WHEN_FASTER_BY))
        results.append(KernelTuning(task.name, task.calls, default, best, keep))
        if keep:
            kept.append((task, record))
    return results, kept


def _as_module(func: tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _measure(modules: list[tvm.IRModule], target, builder, runner) -> list[float | None]:
    """Median run time in microseconds of each scheduled kernel (None where it failed to build or run)."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(module, target) for module in modules])
    inputs, positions = [], []
    for index, (module, result) in enumerate(zip(modules, built)):
        if result.error_msg:
            log.info("bndeploy tune: a kernel failed to build (%s)", result.error_msg.strip().splitlines()[-1][:200])
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(module["main"])
        inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu", args))
        positions.append(index)
    times: list[float | None] = [None] * len(modules)
    for index, future in zip(positions, runner.run(inputs)):
        result = future.result()
        if result.error_msg or not result.run_secs:
            log.info("bndeploy tune: a kernel failed to run (%s)", (result.error_msg or "no time").strip().splitlines()[-1][:200])
            continue
        seconds = sorted(float(s) for s in result.run_secs)
        times[index] = seconds[len(seconds) // 2] * 1e6
    return times


def _write_database(folder: Path, kept) -> None:
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(folder))
    for task, record in kept:
        workload = database.commit_workload(task.module)
        database.commit_tuning_record(ms.database.TuningRecord(
            record.trace, workload, record.run_secs, record.target, record.args_info))


def load_database(folder) -> "object":
    """The tuning folder's MetaSchedule database, for `bndeploy compile --tuned`."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    if not (folder / TUNING_REPORT).is_file():
        raise BndeployError(f"{folder} is not a bndeploy tuning folder (no {TUNING_REPORT}); create it with bndeploy tune")
    return ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)

