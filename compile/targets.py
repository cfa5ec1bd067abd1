"""Named compile targets: the one table mapping a user-facing name to TVM target JSON and toolchain facts.

Users write ``--target cortex-a78ae``, not TVM JSON; raw TVM target JSON is still accepted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from bndeploy.errors import BndeployError

# ELF e_machine values (System V ABI) for the post-export check.
EM_ARM, EM_X86_64, EM_AARCH64, EM_RISCV = 40, 62, 183, 243
_MACHINE_BY_TRIPLE_PREFIX = (
    ("x86_64", EM_X86_64, 64),
    ("aarch64", EM_AARCH64, 64),
    ("armv7", EM_ARM, 32),
    ("arm", EM_ARM, 32),
    ("riscv64", EM_RISCV, 64),
)

DEFAULT_CUDA_ARCH = "sm_80"
CUDA_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
REMOVED_CUDA_ARCHS = {"sm_72": "sm_72 (Jetson Xavier) was removed in CUDA 13, which bndeploy builds with; "
                               "use CUDA 12 tooling for Xavier, or target its CPU with --target carmel"}


@dataclass(frozen=True)
class CrossToolchain:
    compiler: str  # the gcc driver passed to tvm.support.cc.cross_compiler
    debian_package: str


@dataclass(frozen=True)
class TargetSpec:
    """Everything bndeploy needs to know about one compile target."""

    name: str
    tvm: dict  # TVM target JSON
    device: str  # "cpu" or "cuda"
    triple: str | None = None  # host-code triple (None: this machine's)
    archs: tuple[str, ...] = ()
    cross: CrossToolchain | None = None  # None: this host's compiler builds the library
    description: str = ""

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm)

    def elf_identity(self) -> tuple[int, int] | None:
        """(e_machine, ELF class bits) the exported library must have; None if unknown."""
        triple = self.triple or ""
        for prefix, machine, bits in _MACHINE_BY_TRIPLE_PREFIX:
            if triple.startswith(prefix):
                return machine, bits
        return None

    def manifest(self) -> dict:
        return {"name": self.name, "tvm": self.tvm, "device": self.device, "triple": self.triple,
                "archs": list(self.archs)}


_AARCH64 = CrossToolchain("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
_ARMHF = CrossToolchain("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf")
_RISCV64 = CrossToolchain("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu")
_AARCH64_TRIPLE = "aarch64-linux-gnu"
_X86_TRIPLE = "x86_64-linux-gnu"


def _llvm(triple: str, **attrs) -> dict:
    return {"kind": "llvm", "mtriple": triple, **attrs}


def _arm64(name: str, mcpu: str | None, description: str) -> TargetSpec:
    attrs = {"mcpu": mcpu} if mcpu else {"mattr": ["+neon"]}
    return TargetSpec(name, _llvm(_AARCH64_TRIPLE, **attrs), "cpu", _AARCH64_TRIPLE, cross=_AARCH64,
                      description=description)


def _cuda(name: str, arch: str, host: dict | None = None, triple: str = _X86_TRIPLE,
          cross: CrossToolchain | None = None, description: str = "") -> TargetSpec:
    tvm_json = {"kind": "cuda", "arch": arch}
    if host:
        tvm_json["host"] = host
    return TargetSpec(name, tvm_json, "cuda", triple, (arch,), cross, description)


_TABLE: tuple[TargetSpec, ...] = (
    TargetSpec("x86-64-avx2", _llvm(_X86_TRIPLE, mcpu="x86-64-v3"), "cpu", _X86_TRIPLE,
               description="x86-64 with AVX2/FMA (psABI level v3: Haswell, Zen and later)"),
    TargetSpec("x86-64-avx512", _llvm(_X86_TRIPLE, mcpu="x86-64-v4"), "cpu", _X86_TRIPLE,
               description="x86-64 with AVX-512 F/BW/DQ/VL (psABI level v4: Skylake-SP and later)"),
    _arm64("aarch64", None, "generic ARMv8-A with NEON"),
    _arm64("cortex-a72", "cortex-a72", "Raspberry Pi 4"),
    _arm64("cortex-a76", "cortex-a76", "Raspberry Pi 5"),
    _arm64("cortex-a78ae", "cortex-a78ae", "Jetson Orin CPU"),
    _arm64("carmel", "carmel", "Jetson Xavier CPU"),
    TargetSpec("armv7", _llvm("armv7a-linux-gnueabihf", mattr=["+neon"], **{"mfloat-abi": "hard"}), "cpu",
               "armv7a-linux-gnueabihf", cross=_ARMHF, description="32-bit ARMv7-A, hard float, NEON"),
    TargetSpec("riscv64", _llvm("riscv64-linux-gnu", mcpu="generic-rv64", mattr=["+m", "+a", "+f", "+d", "+c"],
                                mabi="lp64d"), "cpu", "riscv64-linux-gnu", cross=_RISCV64,
               description="RV64GC, lp64d ABI"),
    _cuda("cuda", DEFAULT_CUDA_ARCH, description=f"CUDA, default architecture {DEFAULT_CUDA_ARCH}"),
    *(_cuda(f"cuda-{arch.replace('_', '')}", arch, description=f"CUDA {arch}")
      for arch in CUDA_ARCHS if arch != "sm_87"),
    # Jetson Orin: the GPU is sm_87 and the host code must run on its Cortex-A78AE cores.
    _cuda("cuda-sm87", "sm_87", host=_llvm(_AARCH64_TRIPLE, mcpu="cortex-a78ae"), triple=_AARCH64_TRIPLE,
          cross=_AARCH64, description="Jetson Orin (sm_87 GPU, aarch64 host)"),
)
TARGETS: dict[str, TargetSpec] = {spec.name: spec for spec in _TABLE}
HOST_TARGET = "cpu"


def known_target_names() -> list[str]:
    return [HOST_TARGET, *sorted(TARGETS)]


def host_cpu_target() -> TargetSpec:
    """This machine's CPU, with the micro-architecture LLVM detects (e.g. mcpu=emeraldrapids)."""
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu()).export()
    tvm_json = {"kind": "llvm", "mtriple": detected["mtriple"], "mcpu": detected["mcpu"]}
    return TargetSpec(HOST_TARGET, tvm_json, "cpu", detected["mtriple"], description="this machine's CPU")


def resolve_target(name: str) -> TargetSpec:
    """A target name from the table, ``cpu``, ``cuda-smXY``, or raw TVM target JSON."""
    name = name.strip()
    if name.startswith("{"):
        return _from_json(name)
    if name == HOST_TARGET:
        return host_cpu_target()
    if name in TARGETS:
        return TARGETS[name]
    removed = REMOVED_CUDA_ARCHS.get(_cuda_arch_of(name) or "")
    if removed:
        raise BndeployError(f"target {name!r}: {removed}")
    raise BndeployError(f"unknown target {name!r}; known targets: {', '.join(known_target_names())}, "
                        "or raw TVM target JSON such as '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'")


def _cuda_arch_of(name: str) -> str | None:
    if name.startswith("cuda-sm") and name[len("cuda-sm"):].isdigit():
        return "sm_" + name[len("cuda-sm"):]
    return None


def _from_json(text: str) -> TargetSpec:
    try:
        tvm_json = json.loads(text)
    except json.JSONDecodeError as e:
        raise BndeployError(f"target is neither a known name nor valid JSON: {e}") from None
    kind = tvm_json.get("kind") if isinstance(tvm_json, dict) else None
    if kind not in ("llvm", "cuda"):
        raise BndeployError(f"raw target JSON must be an object with \"kind\" \"llvm\" or \"cuda\", got {text}")
    arch = tvm_json.get("arch")
    if arch in REMOVED_CUDA_ARCHS:
        raise BndeployError(f"target {text}: {REMOVED_CUDA_ARCHS[arch]}")
    try:
        import tvm

        tvm.target.Target(tvm_json)
    except Exception as e:  # TVM raises its own error types for bad attributes
        raise BndeployError(f"TVM rejects target {text}: {str(e).strip().splitlines()[-1]}") from None
    host = tvm_json.get("host", {}) if kind == "cuda" else tvm_json
    triple = host.get("mtriple") if isinstance(host, dict) else None
    cross = _cross_for_triple(triple)
    spec = TargetSpec("custom", tvm_json, "cuda" if kind == "cuda" else "cpu", triple,
                      (arch,) if arch else (), cross, "raw TVM target JSON")
    return replace(spec, name=_custom_name(tvm_json))


def _custom_name(tvm_json: dict) -> str:
    parts = [tvm_json["kind"]] + [str(tvm_json[k]) for k in ("arch", "mcpu") if k in tvm_json]
    return "-".join(parts).replace("_", "")


def _cross_for_triple(triple: str | None) -> CrossToolchain | None:
    """Raw JSON naming a foreign triple reuses the matching table toolchain."""
    if not triple:
        return None
    for spec in _TABLE:
        if spec.cross and spec.triple and triple.split("-")[0] == spec.triple.split("-")[0]:
            return spec.cross
    return None


# --------------------------------------------------------------------------------------------------
# Toolchain and library checks


def library_compiler(spec: TargetSpec):
    """The ``fcompile`` for ``export_library``: None (host compiler) or TVM's cross-compiler wrapper."""
    if spec.cross is None:
        return None
    if shutil.which(spec.cross.compiler) is None:
        raise BndeployError(
            f"target {spec.name!r} needs the cross compiler {spec.cross.compiler}, which is not on PATH; "
            f"install the Debian package {spec.cross.debian_package} (apt-get install {spec.cross.debian_package})"
        )
    from tvm.support import cc

    return cc.cross_compiler(spec.cross.compiler)


def read_elf_identity(path: str | Path) -> tuple[int, int]:
    """(e_machine, class bits) from an ELF header."""
    header = Path(path).read_bytes()[:20]
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise BndeployError(f"{path} is not an ELF shared library")
    bits = {1: 32, 2: 64}.get(header[4])
    byteorder = {1: "little", 2: "big"}.get(header[5])
    if bits is None or byteorder is None:
        raise BndeployError(f"{path}: unrecognised ELF class/data bytes {header[4]}, {header[5]}")
    return int.from_bytes(header[18:20], byteorder), bits


def verify_library_machine(path: str | Path, spec: TargetSpec) -> None:
    """Fail when the exported library is not built for the target's CPU (e.g. a host-compiled .so)."""
    expected = spec.elf_identity()
    if expected is None:
        return
    actual = read_elf_identity(path)
    if actual != expected:
        raise BndeployError(
            f"{path}: library is ELF machine {actual[0]} ({actual[1]}-bit) but target {spec.name!r} "
            f"({spec.triple}) needs machine {expected[0]} ({expected[1]}-bit); check the cross compiler"
        )
