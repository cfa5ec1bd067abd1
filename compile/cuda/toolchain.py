"""The CUDA toolchain: find nvcc, the flags for an architecture, and compiling CUDA C into a fatbin."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bndeploy.errors import BndeployError

NVCC_HELP = (
    "install the CUDA Toolkit 13 (https://developer.nvidia.com/cuda-downloads) and put its bin/ "
    "directory on PATH, or set CUDA_HOME to the toolkit directory"
)

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

def check_cuda_toolchain() -> str:
    """Return the path of nvcc, or raise BndeployError saying what is missing and where to get it."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BndeployError(f"CUDA compiler nvcc not found on PATH (nor under $CUDA_HOME/bin): {NVCC_HELP}")
    return nvcc


def find_nvcc() -> str | None:
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
