"""CUDA code generation: Relax module -> GPU-scheduled kernels -> library holding compiled device code.

TVM's `export_library` of a CUDA build only holds device code when TVM's CUDA runtime
(`libtvm_runtime_cuda.so`) is loaded, because only then does codegen call its compile callback; that
library needs the driver's `libcuda.so.1`. Without a driver TVM silently stores CUDA C source, which
would need a compiler and CUDA headers on the deployment machine. So the build runs in a child
Python process: with a real driver it uses it; without one a stub `libcuda.so.1` (built here with gcc
into a cache directory, every entry point returning an error) is preloaded in the child only, and a
compile callback with explicit `-gencode` flags makes nvcc produce one fatbin with SASS for the target
architecture plus PTX for forward compatibility. The calling process never sees the stub, and no global
TVM callback of the caller is replaced.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from bndeploy.errors import ArtifactError, BndeployError, UnsupportedModelError

NVCC_HELP = (
    "install the CUDA Toolkit 13 (https://developer.nvidia.com/cuda-downloads) and put its bin/ "
    "directory on PATH, or set CUDA_HOME to the toolkit directory"
)
CUOBJDUMP_HELP = "pip install nvidia-cuda-cuobjdump (or put the CUDA Toolkit's cuobjdump on PATH)"

# Fatbin container header (fatbinary.h): magic, version, header size, size of the rest.
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")

# nvcc flags TVM's own nvcc route uses for its generated CUDA C (half/bfloat16 operators on).
_NVCC_CODEGEN_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
]

_BUILD_TIMEOUT_S = 1800
CUDA_SOURCE_NAME = "cuda_source.cu"


# --------------------------------------------------------------------------------------------------
# Toolchain


def check_cuda_toolchain() -> str:
    """Return the path of nvcc, or raise BndeployError saying what is missing and where to get it."""
    nvcc = _find_nvcc()
    if nvcc is None:
        raise BndeployError(f"CUDA compiler nvcc not found on PATH (nor under $CUDA_HOME/bin): {NVCC_HELP}")
    return nvcc


def _find_nvcc() -> str | None:
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(Path(home, "bin", "nvcc"), os.X_OK):
            return str(Path(home, "bin", "nvcc"))
    return None


def _arch_suffix(arch: str) -> str:
    match = re.fullmatch(r"sm_(\d+[a-z]?)", arch or "")
    if not match:
        raise BndeployError(f"CUDA target needs an 'arch' such as \"sm_80\", got {arch!r}")
    return match.group(1)


def gencode_flags(arch: str) -> list[str]:
    """nvcc flags for SASS of `arch` plus PTX of the same virtual architecture (JIT on newer GPUs)."""
    suffix = _arch_suffix(arch)
    return [
        "-gencode", f"arch=compute_{suffix},code=sm_{suffix}",
        "-gencode", f"arch=compute_{suffix},code=compute_{suffix}",
    ]


def check_arch_supported(arch: str, nvcc: str) -> None:
    """Refuse an architecture this nvcc cannot generate SASS for (CUDA 13 starts at sm_75)."""
    base = "sm_" + re.match(r"\d+", _arch_suffix(arch)).group()  # sm_90a is built by the sm_90 toolchain
    supported = _nvcc_gpu_codes(nvcc)
    if base not in supported:
        raise BndeployError(f"{nvcc} cannot build CUDA architecture {arch}; it builds {', '.join(supported)}")


@functools.lru_cache(maxsize=None)
def _nvcc_gpu_codes(nvcc: str) -> tuple[str, ...]:
    proc = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BndeployError(f"{nvcc} --list-gpu-code failed: {proc.stderr.strip()}")
    return tuple(proc.stdout.split())


def compile_fatbin(code: str, arch: str, nvcc: str) -> bytes:
    """Compile CUDA C with nvcc into a fatbin with SASS for `arch` and PTX."""
    with tempfile.TemporaryDirectory(prefix="bndeploy-nvcc-") as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, "kernels.fatbin")
        src.write_text(code)
        cmd = [nvcc, "--fatbin", *_NVCC_CODEGEN_FLAGS, *gencode_flags(arch), "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BndeployError(f"nvcc failed for {arch} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return out.read_bytes()


# --------------------------------------------------------------------------------------------------
# GPU scheduling


@dataclass(frozen=True)
class ReductionSchedule:
    """How one reduction block of a scheduled PrimFunc runs on the GPU."""

    function: str
    block: str
    reduction_extent: int  # values reduced per output element
    output_extent: int  # output elements of the block
    serial_per_thread: int  # reduction iterations one thread runs in sequence

    @property
    def narrow(self) -> bool:
        """Fewer outputs than values per output: parallelism has to come from the reduction axis."""
        return self.output_extent < self.reduction_extent

    @property
    def serial(self) -> bool:
        """One thread reduces every value of its output alone (no thread cooperation)."""
        return self.serial_per_thread >= self.reduction_extent


def _int_extent(expr) -> int:
    return int(expr) if isinstance(expr, int) else int(expr.value)


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _child_stmts(stmt) -> list:
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    children = (getattr(stmt, name, None) for name in ("block", "body", "then_case", "else_case", "init"))
    return [child for child in children if isinstance(child, tirx.Stmt)]


def _vars_in(expr) -> list:
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append))
    return found


def reduction_schedules(func: tirx.PrimFunc, name: str = "main") -> list[ReductionSchedule]:
    """Describe every reduction block of a scheduled (not yet lowered) PrimFunc."""
    found: list[ReductionSchedule] = []

    def visit(stmt, loops: list) -> None:
        if isinstance(stmt, tirx.For):
            loops = loops + [stmt]
        if isinstance(stmt, s_tir.SBlockRealize):
            summary = _summarize_reduction(name, stmt, loops)
            if summary is not None:
                found.append(summary)
        for child in _child_stmts(stmt):
            visit(child, loops)

    visit(func.body, [])
    return found


def _summarize_reduction(name: str, realize, loops: list) -> ReductionSchedule | None:
    block = realize.block
    bound = list(zip(block.iter_vars, realize.iter_values))
    reduce = [(iv, value) for iv, value in bound if iv.iter_type == tirx.IterVar.CommReduce]
    if not reduce:
        return None
    reduce_vars = [var for _, value in reduce for var in _vars_in(value)]
    serial_loops = [
        loop for loop in loops
        if loop.kind != tirx.ForKind.THREAD_BINDING and any(loop.loop_var.same_as(v) for v in reduce_vars)
    ]
    return ReductionSchedule(
        function=name,
        block=block.name_hint,
        reduction_extent=_product(_int_extent(iv.dom.extent) for iv, _ in reduce),
        output_extent=_product(
            _int_extent(iv.dom.extent) for iv, _ in bound if iv.iter_type == tirx.IterVar.DataPar
        ),
        serial_per_thread=_product(_int_extent(loop.extent) for loop in serial_loops),
    )


def module_reduction_schedules(mod: tvm.IRModule) -> list[ReductionSchedule]:
    return [
        summary
        for gvar, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc)
        for summary in reduction_schedules(func, gvar.name_hint)
    ]


def serial_narrow_reductions(mod: tvm.IRModule) -> list[ReductionSchedule]:
    """Reductions that leave the GPU idle: few outputs, each reduced by one thread alone."""
    return [r for r in module_reduction_schedules(mod) if r.narrow and r.serial and r.reduction_extent > 1]


class CrossThreadReduction(GPUScheduleRule):
    """dlight rule for fused functions with a narrow reduction that dlight's own reduction rules skip.

    Such functions (a reduction fused with other blocks, as BatchNorm statistics get) otherwise fall to
    dlight's Fallback rule, which binds only the output elements to threads: for a per-channel mean
    over (N, H, W) that is C threads in one block each summing N*H*W values serially. Here every
    output element gets a thread block whose threads split the reduction and combine their partial
    results with warp shuffles and shared memory (TVM's cross-thread allreduce). Other blocks keep
    Fallback's mapping; each becomes its own kernel.
    """

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not any(r.narrow for r in reduction_schedules(func)):
            return None
        max_threads = s_tir.dlight.base.max_threads_per_block(target)
        sch = s_tir.Schedule(func)
        infos = s_tir.dlight.analysis.normalize_prim_func(sch)
        if infos is None or any("O" in info.dom_kind() for info in infos):
            return None
        infos = s_tir.dlight.base.try_inline(sch, infos)
        serial_reductions = []
        for info in infos:
            block = info.block_rv
            if any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block)):
                continue  # already placed inside a reduction's thread block
            s_loops = [loop for loop, kind in zip(sch.get_loops(block), info.dom_kind()) if kind == "S"]
            r_loops = [loop for loop, kind in zip(sch.get_loops(block), info.dom_kind()) if kind == "R"]
            if not s_loops:
                s_loops = [sch.add_unit_loop(block)]
            sch.reorder(*s_loops, *r_loops)
            if r_loops and _is_narrow(info):
                self._cross_thread(sch, block, s_loops, r_loops, max_threads)
            else:
                block_x, thread_x = sch.split(sch.fuse(*s_loops), factors=[None, max_threads])
                sch.bind(block_x, "blockIdx.x")
                sch.bind(thread_x, "threadIdx.x")
                if r_loops:
                    serial_reductions.append((block, r_loops[0]))
        for block, r_loop in serial_reductions:
            sch.decompose_reduction(block, r_loop)
        return sch

    @staticmethod
    def _cross_thread(sch, block, s_loops, r_loops, max_threads: int) -> None:
        block_x = sch.fuse(*s_loops)
        reduce = sch.fuse(*r_loops)
        threads = min(max_threads, _next_power_of_two(_int_extent(sch.get(reduce).extent)))
        _, thread_x = sch.split(reduce, factors=[None, max(threads, 32)])
        sch.bind(block_x, "blockIdx.x")
        sch.bind(thread_x, "threadIdx.x")
        _attach_pointwise_epilogues(sch, block, block_x)


def _is_narrow(info) -> bool:
    extents = [_int_extent(extent) for extent in info.dom()]
    spatial = _product(e for e, kind in zip(extents, info.dom_kind()) if kind == "S")
    reduction = _product(e for e, kind in zip(extents, info.dom_kind()) if kind == "R")
    return spatial < reduction


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _attach_pointwise_epilogues(sch, block, block_x) -> None:
    """Move a consumer computing one value per reduction output (e.g. sum -> mean) into its block.

    Larger consumers (a broadcast over N*C*H*W) stay separate kernels: placed here they would run
    serially inside one thread block.
    """
    produced = _product(_int_extent(iv.dom.extent) for iv in sch.get(block).iter_vars
                        if iv.iter_type == tirx.IterVar.DataPar)
    for consumer in sch.get_consumers(block):
        extent = _product(_int_extent(sch.get(loop).extent) for loop in sch.get_loops(consumer))
        if extent == produced:
            sch.reverse_compute_at(consumer, block_x)


class SkipNarrowReductions(GPUScheduleRule):
    """Wraps a dlight rule so that it leaves functions with a narrow reduction to CrossThreadReduction.

    dlight's Matmul rule gives each thread whole dot products: right for convolutions (many outputs,
    short reductions), serial for e.g. a 10-class classifier head over 4096 features.
    """

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        if isinstance(func, tirx.PrimFunc) and any(r.narrow for r in reduction_schedules(func)):
            return None
        return self.rule.apply(func, target, tunable)


def _schedule_rules():
    dl = s_tir.dlight
    return [
        SkipNarrowReductions(dl.gpu.Matmul()),  # conv2d as implicit GEMM
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        CrossThreadReduction(),
        dl.gpu.Fallback(),
    ]


def schedule_passes(target: tvm.target.Target) -> list:
    """TVM's CUDA legalization passes with bndeploy's reduction rule added to the dlight rules."""
    from bndeploy.compile.nan_semantics import legalize_ops

    return [
        legalize_ops(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        s_tir.dlight.ApplyDefaultSchedule(*_schedule_rules()),
    ]


def schedule_for_cuda(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize, fuse and GPU-schedule a Relax module; returns Relax + scheduled TIR (not lowered)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    with target:
        passes = cuda.library_dispatch_passes(target) + schedule_passes(target)
        scheduled = tvm.transform.Sequential(passes)(mod)
    require_parallel_reductions(scheduled)
    return scheduled


def require_parallel_reductions(scheduled: tvm.IRModule) -> None:
    serial = serial_narrow_reductions(scheduled)
    if serial:
        names = ", ".join(f"{r.function}/{r.block} ({r.reduction_extent} values per thread)" for r in serial)
        raise UnsupportedModelError(f"bndeploy could not parallelise these GPU reductions: {names}")


def _cuda_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="BndeployCUDAPipeline")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        scheduled = schedule_for_cuda(mod, target)
        with target:
            rest = cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)
            return tvm.transform.Sequential(rest)(scheduled)

    return pipeline


# --------------------------------------------------------------------------------------------------
# Build (runs in a child process, see the module docstring)


def build_cuda_library(
    mod: tvm.IRModule, target: tvm.target.Target, out_path: Path, dump_dir: Path | None = None,
    host_compiler: str | None = None,
) -> dict:
    """GPU-schedule `mod`, build it for `target` and export a library with SASS + PTX to `out_path`.

    Returns {"kernels": [device kernel names], "archs": ["sm_80"]}. With `dump_dir`, the generated
    CUDA source is written there as cuda_source.cu. ``host_compiler``: the cross gcc that links the
    library when the target's host is another CPU (Jetson: aarch64); None for this machine's compiler.
    """
    nvcc = check_cuda_toolchain()
    if target.kind.name != "cuda":
        raise BndeployError(f"build_cuda_library needs a cuda target, got {target.kind.name}")
    # A CUDA target without "arch" gets TVM's default, sm_50, which CUDA 13 no longer builds.
    check_arch_supported(str(target.attrs.get("arch", "")), nvcc)
    stub_dir = None if _real_driver_present() else ensure_driver_stub()
    with tempfile.TemporaryDirectory(prefix="bndeploy-cuda-build-") as tmp:
        request = Path(tmp, "request.json")
        result = Path(tmp, "result.json")
        write_request(request, mod, target, Path(out_path), dump_dir, nvcc, host_compiler)
        _run_child(request, result, _child_env(nvcc, stub_dir))
        outcome = json.loads(result.read_text())
    if "error" in outcome:
        error_type = {"UnsupportedModelError": UnsupportedModelError}.get(outcome["error_type"], BndeployError)
        raise error_type(outcome["error"])
    return outcome


def write_request(path: Path, mod, target, out_path: Path, dump_dir: Path | None, nvcc: str,
                  host_compiler: str | None = None) -> None:
    path.write_text(json.dumps({
        "host_compiler": host_compiler,
        "module": tvm.ir.save_json(mod),
        "target": tvm.ir.save_json(target),
        "out_path": str(Path(out_path).absolute()),
        "dump_dir": str(Path(dump_dir).absolute()) if dump_dir is not None else None,
        "nvcc": nvcc,
        "result": str(path.with_name("result.json")),
    }))


def _run_child(request: Path, result: Path, env: dict) -> None:
    """Hand the request to an idle build worker, or a new one (importing TVM there costs seconds)."""
    worker = _take_worker(env)
    try:
        worker.build(request, result)
    except BaseException:
        worker.close()
        raise
    with _IDLE_LOCK:
        _IDLE_WORKERS.append(worker)


def _take_worker(env: dict) -> "_BuildWorker":
    with _IDLE_LOCK:
        for worker in _IDLE_WORKERS:
            if worker.serves(env):
                _IDLE_WORKERS.remove(worker)
                return worker
    return _BuildWorker(env)


class _BuildWorker:
    """A child process that runs this file with ``--serve``: one request path per stdin line, one reply line.

    It keeps TVM (with the CUDA runtime and, without a GPU, the driver stub) loaded across builds, so a
    pipeline compiling many CUDA artifacts pays TVM's import once per worker.
    """

    def __init__(self, env: dict) -> None:
        self.env = env
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)

    def serves(self, env: dict) -> bool:
        return self.env == env and self.proc.poll() is None

    def build(self, request: Path, result: Path) -> None:
        self.proc.stdin.write(f"{request}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], _BUILD_TIMEOUT_S)
        reply = self.proc.stdout.readline() if ready else ""
        if reply.strip() != "done" or not result.exists():
            self.log.seek(0)
            detail = self.log.read()[-4000:] or ("timed out" if not ready else "no output")
            raise BndeployError(f"CUDA build process failed (exit {self.proc.poll()}):\n{detail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# Workers kept for the next build: as many as builds ever ran at the same time (one per calling thread).
_IDLE_WORKERS: list[_BuildWorker] = []
_IDLE_LOCK = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    for worker in _IDLE_WORKERS:
        worker.close()


def _serve() -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # anything a build prints must not corrupt the replies
    for line in sys.stdin:
        _child_main(line.strip())
        print("done", file=replies, flush=True)


def _child_env(nvcc: str, stub_dir: Path | None) -> dict:
    env = dict(os.environ)
    # libtvm_runtime_cuda.so needs libcudart.so.13, which the toolkit ships beside nvcc.
    toolkit = Path(os.path.realpath(nvcc)).parent.parent
    library_dirs = [str(d) for d in (toolkit / "lib64", toolkit / "lib") if d.is_dir()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    if stub_dir is not None:
        env["BNDEPLOY_CUDA_DRIVER_STUB"] = str(stub_dir / "libcuda.so.1")
    else:
        env.pop("BNDEPLOY_CUDA_DRIVER_STUB", None)
    return env


def _real_driver_present() -> bool:
    """True when the NVIDIA driver library loads (a GPU machine): then the stub is never used."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _tvm_cuda_runtime_path() -> Path:
    return Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"


def driver_symbols(runtime_lib: Path) -> list[str]:
    """Driver API entry points (cuXxx) that TVM's CUDA runtime library imports."""
    nm = shutil.which("nm")
    if nm is None:
        raise BndeployError("nm (GNU binutils) not found: it is needed to build the CUDA driver stub")
    out = subprocess.run([nm, "-D", "--undefined-only", str(runtime_lib)], capture_output=True, text=True,
                         check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return sorted(n for n in names if re.fullmatch(r"cu[A-Z]\w*", n))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bndeploy"


def ensure_driver_stub(cache_dir: Path | None = None) -> Path:
    """Build (once, cached) a stub libcuda.so.1 whose every function fails with CUDA_ERROR_NO_DEVICE.

    It only lets TVM's CUDA runtime library load on a machine without a driver so that codegen runs
    its compile callback; nothing is ever launched through it.
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BndeployError("gcc not found: it is needed to build the CUDA driver stub on a machine without a GPU")
    symbols = driver_symbols(_tvm_cuda_runtime_path())
    source = "".join(f"int {name}(void) {{ return 100; }}\n" for name in symbols)  # 100: no device
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    stub_dir = (cache_dir or _cache_dir()) / f"cuda-driver-stub-{digest}"
    if (stub_dir / "libcuda.so.1").exists():
        return stub_dir
    stub_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stub-", dir=stub_dir.parent))
    try:
        (tmp / "stub.c").write_text(source)
        cmd = [gcc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp / "libcuda.so.1"), str(tmp / "stub.c")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BndeployError(f"building the CUDA driver stub failed:\n{proc.stderr[-2000:]}")
        try:
            os.rename(tmp, stub_dir)
        except OSError:
            if not (stub_dir / "libcuda.so.1").exists():  # else a concurrent build won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stub_dir


def _child_main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    result_path = Path(request["result"])
    try:
        outcome = _build_in_this_process(request)
    except BndeployError as e:
        outcome = {"error": str(e), "error_type": type(e).__name__}
    result_path.write_text(json.dumps(outcome))


def _load_tvm_cuda_runtime() -> None:
    """Load the driver stub (if given) and TVM's CUDA runtime before TVM's import tries and gives up."""
    stub = os.environ.get("BNDEPLOY_CUDA_DRIVER_STUB")
    if stub:
        ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)  # satisfies the runtime's DT_NEEDED libcuda.so.1
    try:
        ctypes.CDLL(str(_tvm_cuda_runtime_path()))
    except OSError as e:
        raise BndeployError(f"TVM's CUDA runtime library cannot be loaded for the build: {e}") from None


def _build_in_this_process(request: dict) -> dict:
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise BndeployError("TVM's CUDA runtime did not register; cannot produce CUDA device code")
    mod = tvm.ir.load_json(request["module"])
    target = tvm.ir.load_json(request["target"])
    arch, nvcc = str(target.arch), request["nvcc"]
    sources: list[str] = []

    def compile_callback(code: str) -> bytearray:
        sources.append(code)
        return bytearray(compile_fatbin(code, arch, nvcc))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    with target:
        executable = relax.build(mod, target=target, relax_pipeline=_cuda_pipeline(target))
    if not sources:
        raise BndeployError("TVM produced no CUDA device code (its compile callback was never called)")
    out_path = Path(request["out_path"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if request.get("host_compiler"):
        from tvm.support import cc

        executable.export_library(str(out_path), fcompile=cc.cross_compiler(request["host_compiler"]))
    else:
        executable.export_library(str(out_path))
    if request["dump_dir"]:
        Path(request["dump_dir"]).mkdir(parents=True, exist_ok=True)
        Path(request["dump_dir"], CUDA_SOURCE_NAME).write_text("\n".join(sources))
    return {"kernels": sorted({k for code in sources for k in kernel_names_in_source(code)}), "archs": [arch]}


def kernel_names_in_source(code: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', code)


# --------------------------------------------------------------------------------------------------
# Inspection


def find_cuobjdump() -> str:
    try:
        import nvidia.cu13  # the nvidia-cuda-cuobjdump wheel installs nvidia/cu13/bin/cuobjdump

        for root in nvidia.cu13.__path__:
            candidate = Path(root, "bin", "cuobjdump")
            if os.access(candidate, os.X_OK):
                return str(candidate)
    except ImportError:
        pass
    nvcc = _find_nvcc()
    beside_nvcc = Path(os.path.realpath(nvcc)).parent / "cuobjdump" if nvcc else None
    found = shutil.which("cuobjdump") or (str(beside_nvcc) if beside_nvcc and beside_nvcc.exists() else None)
    if found is None:
        raise BndeployError(f"cuobjdump not found: {CUOBJDUMP_HELP}")
    return found


def extract_fatbins(library: Path) -> list[bytes]:
    """The fatbin containers embedded in a library (TVM stores them inside its module blob)."""
    data = Path(library).read_bytes()
    magic = struct.pack("<I", _FATBIN_MAGIC)
    fatbins, start = [], data.find(magic)
    while start >= 0:
        _, _, header_size, body_size = _FATBIN_HEADER.unpack_from(data, start)
        end = start + header_size + body_size
        if end > len(data):
            raise ArtifactError(f"{library}: truncated CUDA fatbin at offset {start}")
        fatbins.append(data[start:end])
        start = data.find(magic, end)
    return fatbins


def inspect_cuda_library(path) -> dict:
    """Device code inside a bndeploy CUDA library: {"archs": SASS archs, "ptx": PTX archs, "kernels"}."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: CUDA library not found")
    fatbins = extract_fatbins(path)
    if not fatbins:
        raise ArtifactError(f"{path}: holds no compiled CUDA device code (CUDA source only?)")
    cuobjdump = find_cuobjdump()
    archs, ptx, kernels = set(), set(), set()
    with tempfile.TemporaryDirectory(prefix="bndeploy-cuobjdump-") as tmp:
        for index, fatbin in enumerate(fatbins):
            file = Path(tmp, f"device{index}.fatbin")
            file.write_bytes(fatbin)
            listing = _run_cuobjdump(cuobjdump, "-lelf", "-lptx", file)
            archs.update(re.findall(r"^ELF file\s+\d+:\s+\S+\.(sm_\w+)\.cubin$", listing, re.M))
            ptx.update("compute_" + a[3:] for a in re.findall(r"^PTX file\s+\d+:\s+\S+\.(sm_\w+)\.ptx$", listing, re.M))
            symbols = _run_cuobjdump(cuobjdump, "-symbols", file)
            kernels.update(re.findall(r"^\s*FUNC\s+GLOBAL\s+\S+\s+ENTRY\s+(\S+)$", symbols, re.M))
    return {"archs": sorted(archs), "ptx": sorted(ptx), "kernels": sorted(kernels)}


def _run_cuobjdump(cuobjdump: str, *args) -> str:
    proc = subprocess.run([cuobjdump, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArtifactError(f"cuobjdump {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc.stdout


if __name__ == "__main__":
    _load_tvm_cuda_runtime()
    if sys.argv[1] == "--serve":
        _serve()
    else:
        _child_main(sys.argv[1])
