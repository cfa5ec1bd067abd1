"""TVM's CUDA runtime on a machine without a GPU driver: a stub libcuda.so.1 that lets it load.

``libtvm_runtime_cuda.so`` needs the driver's ``libcuda.so.1``; without it TVM never calls its CUDA compile
callback and exports CUDA source instead of device code. The stub (built once with gcc into a cache
directory, every entry point returning CUDA_ERROR_NO_DEVICE) is only ever loaded in a build worker process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm

from bndeploy.errors import BndeployError

STUB_ENV = "BNDEPLOY_CUDA_DRIVER_STUB"  # the stub a worker process loads (set only in its environment)


def real_driver_present() -> bool:
    """True when the NVIDIA driver library loads (a GPU machine): then the stub is never used."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def tvm_cuda_runtime_path() -> Path:
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
    symbols = driver_symbols(tvm_cuda_runtime_path())
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


def load_tvm_cuda_runtime() -> None:
    """Load the driver stub (if given) and TVM's CUDA runtime before TVM's import tries and gives up."""
    stub = os.environ.get(STUB_ENV)
    if stub:
        ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)  # satisfies the runtime's DT_NEEDED libcuda.so.1
    try:
        ctypes.CDLL(str(tvm_cuda_runtime_path()))
    except OSError as e:
        raise BndeployError(f"TVM's CUDA runtime library cannot be loaded for the build: {e}") from None
