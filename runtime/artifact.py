"""Load a compiled artifact (artifact.json + model.so) and run it through TVM's Relax VM.

Imports only TVM's runtime and numpy: an edge device has neither torch nor onnx. The library's
sha256 is checked before it is loaded, because loading a shared library runs its code.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.files import sha256_of
from bndeploy.layout import ARTIFACT_MANIFEST, read_artifact_manifest
from bndeploy.runtime.inputs import validate_inputs
from bndeploy.runtime.specs import TensorSpec, specs_from_manifest

# platform.machine() spellings -> the architecture field of an LLVM target triple.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


class Artifact:
    """A loaded artifact. ``run`` takes and returns arrays keyed by ONNX tensor names."""

    def __init__(self, directory: Path, manifest: dict, device: str, vm, module=None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.device = device
        self.inputs: list[TensorSpec] = specs_from_manifest(manifest, "inputs", str(directory / ARTIFACT_MANIFEST))
        self.outputs: list[TensorSpec] = specs_from_manifest(manifest, "outputs", str(directory / ARTIFACT_MANIFEST))
        self._vm = vm
        self._module = module

    @contextlib.contextmanager
    def instrumented(self, callback):
        """Within the block, the VM calls ``callback(func, name, before_run, result, *args)`` around every
        kernel it runs (TVM's VM instrumentation); return 0 from it to let the kernel run."""
        self._vm.set_instrument(callback)
        try:
            yield self
        finally:
            self._vm.set_instrument(None)

    def library_function(self, symbol: str):
        """A function the library exports (e.g. the FMA-peak kernel), or None."""
        if self._module is None:
            return None
        try:
            return self._module.get_function(symbol, query_imports=True)
        except (AttributeError, RuntimeError):
            return None

    @property
    def mode(self) -> str:
        return self.manifest.get("mode", "inference")

    @property
    def dtype(self) -> str:
        return self.manifest.get("dtype", "float32")

    @property
    def running_var(self) -> str:
        return self.manifest.get("running_var", "onnx")

    @property
    def target_name(self) -> str:
        return str(self.manifest.get("target", {}).get("name", "?"))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm.runtime

        arrays = validate_inputs(inputs, self.inputs)
        on_cpu = self.device == "cpu"
        dev = _tvm_device(self.device)
        args = [_cpu_view(arrays[s.name]) if on_cpu else tvm.runtime.tensor(arrays[s.name], dev) for s in self.inputs]
        try:
            result = self._vm["main"](*args)
        except Exception as e:  # TVM raises its own error types for shape checks, OOM, launch failures
            raise BndeployError(f"running {self.directory} on {self.device} failed: {_error_summary(e)}") from None
        values = list(result) if _is_sequence(result) else [result]
        if len(values) != len(self.outputs):
            raise ArtifactError(
                f"{self.directory}: the library returned {len(values)} outputs, "
                f"{ARTIFACT_MANIFEST} lists {len(self.outputs)}"
            )
        # On the CPU the outputs are handed over without a copy; each array keeps its TVM buffer alive.
        to_numpy = np.from_dlpack if on_cpu else (lambda value: value.numpy())
        return {spec.name: to_numpy(value) for spec, value in zip(self.outputs, values)}


def load_artifact(directory: str | Path, device: str | None = None) -> Artifact:
    """Verify and load an artifact directory; ``device`` is "cpu", "cuda" or "cuda:N" (default: the
    artifact's own device kind, index 0)."""
    directory = Path(directory).absolute()
    manifest = read_artifact_manifest(directory)
    library = verified_library(directory, manifest)
    device = select_device(manifest, device)
    check_host_architecture(manifest, directory)
    module, vm = _load_vm(library, device)
    return Artifact(directory, manifest, device, vm, module)


def verified_library(directory: Path, manifest: dict) -> Path:
    entry = manifest.get("library") or {}
    name, expected = entry.get("file"), entry.get("sha256")
    if not name or not expected:
        raise ArtifactError(f"{directory / ARTIFACT_MANIFEST}: no library file/sha256 recorded")
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"{path}: library file missing")
    actual = sha256_of(path)
    if actual != expected:
        raise ArtifactError(
            f"{path} changed since it was compiled (sha256 {actual[:12]}..., {ARTIFACT_MANIFEST} records "
            f"{expected[:12]}...); refusing to load it: re-compile the artifact"
        )
    return path


def select_device(manifest: dict, requested: str | None) -> str:
    """Normalise the requested device ("cpu", "cuda", "cuda:N") and check it suits the artifact and exists."""
    built_for = str((manifest.get("target") or {}).get("device", "cpu"))
    requested = requested or built_for
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", requested)
    if not match:
        raise BndeployError(f"unknown device {requested!r}; use cpu, cuda or cuda:N")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind != built_for:
        raise BndeployError(f"this artifact was compiled for {built_for}; it cannot run on {requested}")
    if kind == "cuda" and not _tvm_device(f"cuda:{index}").exist:
        raise BndeployError(
            f"this artifact needs a CUDA GPU (cuda:{index}) and none is available here "
            "(no GPU, no driver libcuda, or a TVM runtime built without CUDA)"
        )
    return f"{kind}:{index}" if kind == "cuda" else "cpu"


def check_host_architecture(manifest: dict, directory: Path) -> None:
    target = manifest.get("target") or {}
    triple = target.get("triple") or (target.get("tvm") or {}).get("mtriple")
    if not triple:
        return
    wanted, here = normalise_arch(str(triple).split("-")[0]), machine_arch()
    if wanted != here:
        raise BndeployError(
            f"{directory} was compiled for {triple} ({wanted}); this machine is {here}: "
            "run it on a matching device or compile for this machine's target"
        )


def machine_arch() -> str:
    return normalise_arch(platform.machine())


def normalise_arch(arch: str) -> str:
    arch = arch.lower()
    if arch.startswith("armv7") or arch == "arm":
        return "arm"
    return _ARCH_ALIASES.get(arch, arch)


def use_all_cpus(threads: int | None = None) -> None:
    """Run TVM's CPU kernels on every core this process may use, as ONNX Runtime and torch do.

    TVM's own default counts physical cores only (1 on a 2-vCPU VM); a user's TVM_NUM_THREADS wins,
    unless `threads` is given. Takes effect when TVM's thread pool starts, at the first parallel kernel
    (so call it before anything runs a TVM kernel, constant folding included).
    """
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def _load_vm(library: Path, device: str):
    use_all_cpus()
    import tvm.runtime
    from tvm.runtime.vm import VirtualMachine  # tvm.relax is absent from runtime-only installs

    try:
        module = tvm.runtime.load_module(str(library))
        return module, VirtualMachine(module, _tvm_device(device))
    except Exception as e:
        raise ArtifactError(f"{library}: TVM could not load it: {_error_summary(e)}") from None


def _tvm_device(device: str):
    import tvm.runtime

    kind, _, index = device.partition(":")
    return tvm.runtime.cuda(int(index or 0)) if kind == "cuda" else tvm.runtime.cpu(0)


# TVM's kernels may assume their buffers are aligned to this many bytes (vector loads).
TVM_ALIGNMENT = 64


def _cpu_view(array: np.ndarray):
    """A TVM tensor sharing ``array``'s memory (no copy) when it is contiguous and aligned, else a copy."""
    import tvm.runtime

    if not (array.flags.c_contiguous and array.ctypes.data % TVM_ALIGNMENT == 0):
        array = _aligned_copy(array)
    return tvm.runtime.from_dlpack(array)


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + TVM_ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % TVM_ALIGNMENT
    aligned = raw[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return aligned


def _is_sequence(value) -> bool:
    return not hasattr(value, "numpy") and hasattr(value, "__len__")


def _error_summary(error: Exception) -> str:
    """TVM errors carry a C++ backtrace before the message: keep the last line, the message."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
