"""CUDA code generation: Relax module -> GPU-scheduled kernels -> library holding compiled device code.

TVM's `export_library` of a CUDA build only holds device code when TVM's CUDA runtime
(`libtvm_runtime_cuda.so`) is loaded, because only then does codegen call its compile callback; that
library needs the driver's `libcuda.so.1`. Without a driver TVM silently stores CUDA C source, which
would need a compiler and CUDA headers on the deployment machine. So the build runs in a worker
process: with a real driver it uses it; without one a stub `libcuda.so.1` is preloaded in the worker
only, and a compile callback with explicit `-gencode` flags makes nvcc produce one fatbin with SASS for
the target architecture plus PTX for forward compatibility. The calling process never sees the stub,
and no global TVM callback of the caller is replaced.

One concern per file:

- toolchain.py: nvcc (found on PATH or under CUDA_HOME), architecture flags, CUDA C -> fatbin;
- gpu_schedules.py: dlight rules plus bndeploy's cross-thread reduction, and the serial-reduction check;
- fuse_statistics.py: the Relax rewrite that sums a train-mode BN's batch statistics in the conv before it;
- conv_stats.py: that conv + statistics kernel and the kernel combining its tiles' sums (compute and schedule);
- driver_stub.py: the stub libcuda.so.1 and loading TVM's CUDA runtime in a worker;
- worker.py: the calling side: build requests handed to persistent worker processes;
- worker_process.py: what a worker process runs (one build per request);
- inspection.py: the fatbins inside a library and what cuobjdump says of them.
"""

from .driver_stub import driver_symbols, ensure_driver_stub, real_driver_present, tvm_cuda_runtime_path
from .gpu_schedules import (CrossThreadReduction, ReductionSchedule, SkipNarrowReductions, module_reduction_schedules,
                            reduction_schedules, require_parallel_reductions, schedule_for_cuda, schedule_passes,
                            serial_narrow_reductions)
from .inspection import CUOBJDUMP_HELP, extract_fatbins, find_cuobjdump, inspect_cuda_library
from .toolchain import NVCC_HELP, check_arch_supported, check_cuda_toolchain, compile_fatbin, find_nvcc, gencode_flags
from .worker import CUDA_SOURCE_NAME, build_cuda_library, write_request

__all__ = [
    "CUDA_SOURCE_NAME",
    "CUOBJDUMP_HELP",
    "CrossThreadReduction",
    "NVCC_HELP",
    "ReductionSchedule",
    "SkipNarrowReductions",
    "build_cuda_library",
    "check_arch_supported",
    "check_cuda_toolchain",
    "compile_fatbin",
    "driver_symbols",
    "ensure_driver_stub",
    "extract_fatbins",
    "find_cuobjdump",
    "find_nvcc",
    "gencode_flags",
    "inspect_cuda_library",
    "module_reduction_schedules",
    "real_driver_present",
    "reduction_schedules",
    "require_parallel_reductions",
    "schedule_for_cuda",
    "schedule_passes",
    "serial_narrow_reductions",
    "tvm_cuda_runtime_path",
    "write_request",
]
