"""What runs in a CUDA build worker process (``python -m bndeploy.compile.cuda.worker_process --serve``).

It loads TVM's CUDA runtime (after the driver stub, on a machine without a GPU), then serves build
requests: each line on stdin names a request file; the build's outcome goes to the request's result file
and "done" to stdout. Anything a build prints goes to stderr, which the caller keeps for error messages.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax

from bndeploy.errors import BndeployError

from .driver_stub import load_tvm_cuda_runtime
from ..schedules.relax_rewrite import STATISTICS_FUSED_ATTR
from .gpu_schedules import lowering_pipeline, schedule_for_cuda
from .toolchain import compile_fatbin
from .worker import CUDA_SOURCE_NAME


def _serve() -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # anything a build prints must not corrupt the replies
    for line in sys.stdin:
        _child_main(line.strip())
        print("done", file=replies, flush=True)


def _child_main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    result_path = Path(request["result"])
    try:
        outcome = _build_in_this_process(request)
    except BndeployError as e:
        outcome = {"error": str(e), "error_type": type(e).__name__}
    result_path.write_text(json.dumps(outcome))


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
    scheduled = schedule_for_cuda(mod, target)
    with target:
        executable = relax.build(scheduled, target=target, relax_pipeline=lowering_pipeline(target))
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
    return {"kernels": sorted({k for code in sources for k in kernel_names_in_source(code)}), "archs": [arch],
            "statistics_fused": [int(k) for k in (scheduled.attrs or {}).get(STATISTICS_FUSED_ATTR, [])]}


def kernel_names_in_source(code: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', code)


if __name__ == "__main__":
    load_tvm_cuda_runtime()
    if sys.argv[1] == "--serve":
        _serve()
    else:
        _child_main(sys.argv[1])
