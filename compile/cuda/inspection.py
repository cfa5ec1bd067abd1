"""What a CUDA library holds: the fatbins inside it, and their SASS/PTX architectures and kernels (cuobjdump)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from bndeploy.errors import ArtifactError, BndeployError

from .toolchain import find_nvcc

CUOBJDUMP_HELP = "pip install nvidia-cuda-cuobjdump (or put the CUDA Toolkit's cuobjdump on PATH)"

# Fatbin container header (fatbinary.h): magic, version, header size, size of the rest.
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")


def find_cuobjdump() -> str:
    try:
        import nvidia.cu13  # the nvidia-cuda-cuobjdump wheel installs nvidia/cu13/bin/cuobjdump

        for root in nvidia.cu13.__path__:
            candidate = Path(root, "bin", "cuobjdump")
            if os.access(candidate, os.X_OK):
                return str(candidate)
    except ImportError:
        pass
    nvcc = find_nvcc()
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
    """Device code inside a bndeploy CUDA library: {"archs": SASS archs, "ptx": PTX archs, "kernels",
    "resources": {kernel: {"registers", "shared", "local"}}} (per thread registers, bytes of shared memory
    per block, bytes of local memory per thread: spills, when not 0; for the SASS of the last arch read)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: CUDA library not found")
    fatbins = extract_fatbins(path)
    if not fatbins:
        raise ArtifactError(f"{path}: holds no compiled CUDA device code (CUDA source only?)")
    cuobjdump = find_cuobjdump()
    archs, ptx, kernels, resources = set(), set(), set(), {}
    with tempfile.TemporaryDirectory(prefix="bndeploy-cuobjdump-") as tmp:
        for index, fatbin in enumerate(fatbins):
            file = Path(tmp, f"device{index}.fatbin")
            file.write_bytes(fatbin)
            listing = _run_cuobjdump(cuobjdump, "-lelf", "-lptx", file)
            archs.update(re.findall(r"^ELF file\s+\d+:\s+\S+\.(sm_\w+)\.cubin$", listing, re.M))
            ptx.update("compute_" + a[3:] for a in re.findall(r"^PTX file\s+\d+:\s+\S+\.(sm_\w+)\.ptx$", listing, re.M))
            symbols = _run_cuobjdump(cuobjdump, "-symbols", file)
            kernels.update(re.findall(r"^\s*FUNC\s+GLOBAL\s+\S+\s+ENTRY\s+(\S+)$", symbols, re.M))
            resources.update(_resource_usage(_run_cuobjdump(cuobjdump, "--dump-resource-usage", file)))
    return {"archs": sorted(archs), "ptx": sorted(ptx), "kernels": sorted(kernels), "resources": resources}


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(listing: str) -> dict:
    return {name: {"registers": int(reg), "shared": int(shared), "local": int(local)}
            for name, reg, shared, local in _RESOURCES.findall(listing)}


def _run_cuobjdump(cuobjdump: str, *args) -> str:
    proc = subprocess.run([cuobjdump, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArtifactError(f"cuobjdump {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return proc.stdout
