"""Load a compiled artifact (artifact.json + model.so) and run it through TVM's Relax VM.

Imports only TVM's runtime and numpy: an edge device has neither torch nor onnx. The library's
sha256 is checked before it is loaded, because loading a shared library runs its code.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.files import sha256_of
from bndeploy.layout import ARTIFACT_MANIFEST, read_artifact_manifest
from bndeploy.runtime.caller_cpu import caller_cpu, hold, release
from bndeploy.runtime.inputs import validate_inputs
from bndeploy.runtime.runners import Runner
from bndeploy.runtime.specs import TensorSpec, specs_from_manifest

# platform.machine() spellings -> the architecture field of an LLVM target triple.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


class Artifact(Runner):
    """A loaded artifact. ``run`` takes and returns arrays keyed by ONNX tensor names (a ``Runner``)."""

    name = "artifact"

    def __init__(self, directory: Path, manifest: dict, device: str, vm, module=None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.device = device
        self.inputs: list[TensorSpec] = specs_from_manifest(manifest, "inputs", str(directory / ARTIFACT_MANIFEST))
        self.outputs: list[TensorSpec] = specs_from_manifest(manifest, "outputs", str(directory / ARTIFACT_MANIFEST))
        self._vm = vm
        self._module = module
        self._main = vm["main"] if vm is not None else None
        self._signature = _static_signature(self.inputs)
        self._staging = threading.local()  # per thread: 64-byte aligned copies of misaligned inputs
        self._caller_cpu = caller_cpu() if device == "cpu" else None

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

    def provenance(self) -> dict[str, str]:
        tvm = (self.manifest.get("versions") or {}).get("tvm") or "unknown"
        return {"version": f"tvm {tvm}", "how": f"compiled for {self.target_name}, run on {self.device}"}

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
        arrays = self._checked_inputs(inputs)
        args = self._cpu_args(arrays) if self.device == "cpu" else self._device_args(arrays)
        saved = None if self._caller_cpu is None else hold(self._caller_cpu)
        try:
            result = self._main(*args)
        except Exception as e:  # TVM raises its own error types for shape checks, OOM, launch failures
            raise BndeployError(f"running {self.directory} on {self.device} failed: {_error_summary(e)}") from None
        finally:
            release(saved)
        values = list(result) if _is_sequence(result) else [result]
        if len(values) != len(self.outputs):
            raise ArtifactError(
                f"{self.directory}: the library returned {len(values)} outputs, "
                f"{ARTIFACT_MANIFEST} lists {len(self.outputs)}"
            )
        # On the CPU the outputs are handed over without a copy; each array keeps its TVM buffer alive.
        to_numpy = np.from_dlpack if self.device == "cpu" else (lambda value: value.numpy())
        return {spec.name: to_numpy(value) for spec, value in zip(self.outputs, values)}

    def _checked_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The inputs in the artifact's order; the full validation (and its error) only when the quick
        check of names, dtypes, static shapes and layout fails."""
        if self._signature is not None and len(inputs) == len(self._signature):
            arrays = [inputs.get(name) for name, _, _ in self._signature]
            if all(type(a) is np.ndarray and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous
                   for a, (_, dtype, shape) in zip(arrays, self._signature)):
                return arrays
        checked = validate_inputs(inputs, self.inputs)
        return [checked[spec.name] for spec in self.inputs]

    def _cpu_args(self, arrays: list[np.ndarray]) -> list:
        import tvm.runtime

        return [tvm.runtime.from_dlpack(self._aligned(index, array)) for index, array in enumerate(arrays)]

    def _aligned(self, index: int, array: np.ndarray) -> np.ndarray:
        """The array itself when it is large and 64-byte aligned (TVM refuses other data: "FromDLPack: Data
        is not aligned to 64 bytes"), else a copy in an aligned buffer kept per thread and input. A small
        input is always copied: the copy costs less than asking numpy for its address (about 1 us), and
        allocating an aligned buffer per call cost more than running a whole small model."""
        if array.nbytes > SMALL_INPUT_BYTES and array.ctypes.data % TVM_ALIGNMENT == 0:
            return array
        buffers = self._staging.__dict__.setdefault("buffers", {})
        staged = buffers.get(index)
        if staged is None or staged.shape != array.shape or staged.dtype != array.dtype:
            staged = buffers[index] = _aligned_empty(array.shape, array.dtype)
        np.copyto(staged, array)
        return staged

    def _device_args(self, arrays: list[np.ndarray]) -> list:
        import tvm.runtime

        dev = _tvm_device(self.device)
        return [tvm.runtime.tensor(array, dev) for array in arrays]


def _static_signature(specs: list[TensorSpec]) -> list[tuple] | None:
    """(name, dtype, shape) per input when every dimension is static, for the quick input check."""
    if any(not isinstance(d, int) for spec in specs for d in spec.shape):
        return None
    return [(spec.name, np.dtype(spec.dtype), tuple(spec.shape)) for spec in specs]


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
SMALL_INPUT_BYTES = 1 << 16


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + TVM_ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % TVM_ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _is_sequence(value) -> bool:
    return not hasattr(value, "numpy") and hasattr(value, "__len__")


def _error_summary(error: Exception) -> str:
    """TVM errors carry a C++ backtrace before the message: keep the last line, the message."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
