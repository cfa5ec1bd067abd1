"""CUDA builds in worker processes: the calling side.

A build needs TVM's CUDA runtime loaded (and, without a GPU, the driver stub), which must never happen in
the calling process; so each build is a request handed to a worker process (worker_process.py) that keeps
TVM loaded across builds. Idle workers are kept for the next build, one per calling thread at most.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import tvm

from bndeploy.errors import BndeployError, UnsupportedModelError

from .driver_stub import STUB_ENV, ensure_driver_stub, real_driver_present
from .toolchain import check_arch_supported, check_cuda_toolchain

_BUILD_TIMEOUT_S = 1800
CUDA_SOURCE_NAME = "cuda_source.cu"  # the generated CUDA C, in the artifact's dump/ folder with --dump
WORKER_MODULE = "bndeploy.compile.cuda.worker_process"


def build_cuda_library(
    mod: tvm.IRModule, target: tvm.target.Target, out_path: Path, dump_dir: Path | None = None,
    host_compiler: str | None = None,
) -> dict:
    """GPU-schedule `mod`, build it for `target` and export a library with SASS + PTX to `out_path`.

    Returns {"kernels": [device kernel names], "archs": ["sm_80"], "statistics_fused": [ordinals of the convs
    that sum BatchNorm statistics in their epilogue]}. With `dump_dir`, the generated
    CUDA source is written there as cuda_source.cu. ``host_compiler``: the cross gcc that links the
    library when the target's host is another CPU (Jetson: aarch64); None for this machine's compiler.
    """
    nvcc = check_cuda_toolchain()
    if target.kind.name != "cuda":
        raise BndeployError(f"build_cuda_library needs a cuda target, got {target.kind.name}")
    # A CUDA target without "arch" gets TVM's default, sm_50, which CUDA 13 no longer builds.
    check_arch_supported(str(target.attrs.get("arch", "")), nvcc)
    stub_dir = None if real_driver_present() else ensure_driver_stub()
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
    """A child process running worker_process.py: one request path per stdin line, one reply line.

    It keeps TVM (with the CUDA runtime and, without a GPU, the driver stub) loaded across builds, so a
    pipeline compiling many CUDA artifacts pays TVM's import once per worker. It runs in an empty folder of
    its own, so nothing in the caller's current folder can shadow a module it imports.
    """

    def __init__(self, env: dict) -> None:
        self.env = env
        self.log = tempfile.TemporaryFile(mode="w+")
        self.folder = tempfile.mkdtemp(prefix="bndeploy-cuda-worker-")
        cmd = [sys.executable, "-m", WORKER_MODULE, "--serve"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
        shutil.rmtree(self.folder, ignore_errors=True)


# Workers kept for the next build: as many as builds ever ran at the same time (one per calling thread).
_IDLE_WORKERS: list[_BuildWorker] = []
_IDLE_LOCK = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    for worker in _IDLE_WORKERS:
        worker.close()


def _child_env(nvcc: str, stub_dir: Path | None) -> dict:
    env = dict(os.environ)
    # libtvm_runtime_cuda.so needs libcudart.so.13, which the toolkit ships beside nvcc.
    toolkit = Path(os.path.realpath(nvcc)).parent.parent
    library_dirs = [str(d) for d in (toolkit / "lib64", toolkit / "lib") if d.is_dir()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    if stub_dir is not None:
        env[STUB_ENV] = str(stub_dir / "libcuda.so.1")
    else:
        env.pop(STUB_ENV, None)
    return env
