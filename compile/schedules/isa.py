"""The vector ISA a CPU target compiles for: what register tiles and vector widths are sized from.

Each class is described by the facts a register-tiled kernel depends on (fp32 lanes per vector register,
architectural vector registers, how the FMA gets a broadcast operand, FMA pipes and latency), taken from
the vendors' optimisation manuals. The kernels never name a CPU: they ask for the target's `VectorISA`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm


@dataclass(frozen=True)
class VectorISA:
    name: str
    lanes: int  # fp32 lanes per vector register
    registers: int  # architectural vector registers
    broadcast_registers: int  # registers a tile row's broadcast input needs (0: the FMA takes it from memory)
    fma_pipes: int = 2  # vector FMAs issued per cycle
    fma_latency: int = 4  # cycles before an FMA's result feeds the next FMA of the same accumulator
    load_ports: int = 2  # vector (or broadcast) loads per cycle
    # Registers a register tile may use: all of them, unless the compiler's tuning for the CPU unrolls
    # and software-pipelines the reduction loop, keeping later iterations' loads in flight too.
    tile_registers: int | None = None
    # Registers a depthwise row of tiles leaves free. x86 kernels are lowered with a row's inner tiles
    # branch-free (tir_pipeline.py), and LLVM then overlaps one kernel row's loads with the previous
    # row's FMAs: AVX2's 6-pixel 3x3 row (15 of 16 registers) spilled two vectors per tile, the 5-pixel
    # one does not, at the same speed (0.063 ms on 144 channels at 56x56). 32-register files had room.
    depthwise_spare_registers: int = 0
    # Vectors of half the lanes (or fewer) FMA'd in the time of one full-width FMA: 1 where every pipe is
    # full width (a ymm FMA takes a zmm's slot: AVX-512 Intel cores), 2 where the full width is two halves
    # on 256-bit pipes (AMD Zen 4 runs a zmm FMA as two ymm FMAs, AMD's Software Optimization Guide for
    # family 19h): there a tile of ymm vectors loses no lanes.
    half_width_fmas: int = 1

    @property
    def tile_budget(self) -> int:
        return self.tile_registers or self.registers

    @property
    def vector_bits(self) -> int:
        return 32 * self.lanes

    @property
    def min_accumulators(self) -> int:
        """Independent accumulators that keep every FMA pipe busy despite the latency."""
        return self.fma_pipes * self.fma_latency


# AVX-512: 32 zmm. An embedded broadcast ({1to16}) could feed an FMA from memory, but LLVM broadcasts a
# value used by several FMAs into a register (seen in the generated code), so the tile must leave one.
AVX512 = VectorISA("avx512", lanes=16, registers=32, broadcast_registers=1)
# The same ISA where the target names a Zen 4 CPU (`--target cpu` on one, or mcpu znver4): its 24- and
# 40-channel convs take tiles of three or five ymm vectors instead of zmm blocks padded to 32 or 48 (kernels
# alone, 2 threads of an AMD EPYC Zen 4: MobileNetV2's 144 -> 24 at 56x56, batch 8, 0.83 ms against 1.09;
# EfficientNet's 240 -> 40 at 28x28 0.066 against 0.080). Channels that fill zmm vectors keep zmm tiles.
AVX512_HALF_WIDTH_PIPES = replace(AVX512, half_width_fmas=2)
HALF_WIDTH_PIPE_CPUS = ("znver4",)
# AVX2 + FMA: 16 ymm; the broadcast (vbroadcastss) needs a register.
AVX2 = VectorISA("avx2", lanes=8, registers=16, broadcast_registers=1, depthwise_spare_registers=2)
SSE = VectorISA("sse", lanes=4, registers=16, broadcast_registers=1, fma_pipes=2, depthwise_spare_registers=2)
# AArch64 Advanced SIMD: 32 q registers; fmla by element reads a lane of a loaded input register.
NEON64 = VectorISA("neon", lanes=4, registers=32, broadcast_registers=1)
# NVIDIA Carmel (Jetson Xavier): LLVM's tuning for it unrolls the reduction loop 4-8 times and hoists the
# loads; the tiles spilled accumulators to the stack until they used at most 18 of the 32 registers
# (measured in the generated code for every conv class, tests/test_kernel_asm.py).
NEON64_CARMEL = VectorISA("neon", lanes=4, registers=32, broadcast_registers=1, tile_registers=18)
# ARMv7 NEON: 16 q registers (d0-d31), a single 128-bit FMA pipe on Cortex-A7x cores in AArch32.
NEON32 = VectorISA("neon-armv7", lanes=4, registers=16, broadcast_registers=1, fma_pipes=1)
SCALAR = VectorISA("scalar", lanes=1, registers=16, broadcast_registers=1, fma_pipes=1)


def isa_for_target(target: tvm.target.Target) -> VectorISA:
    """The widest vector ISA the target's code may use."""
    triple = str(target.attrs.get("mtriple", "") or "")
    arch = triple.split("-")[0] if triple else _host_arch()
    if arch.startswith("x86_64") or arch in ("i686", "x86"):
        return _x86_isa(target)
    if arch.startswith("aarch64") or arch.startswith("arm64"):
        return NEON64_CARMEL if str(target.attrs.get("mcpu", "")) == "carmel" else NEON64
    if arch.startswith("arm") and _mentions_neon(target):
        return NEON32
    return SCALAR


def _x86_isa(target: tvm.target.Target) -> VectorISA:
    from tvm.target.codegen import target_has_features

    with target:
        if target_has_features("avx512f"):
            cpu = str(target.attrs.get("mcpu", "") or "")
            return AVX512_HALF_WIDTH_PIPES if cpu in HALF_WIDTH_PIPE_CPUS else AVX512
        if target_has_features("avx2") and target_has_features("fma"):
            return AVX2
    return SSE


def _mentions_neon(target: tvm.target.Target) -> bool:
    return any("neon" in str(attr) for attr in (target.attrs.get("mattr") or []))


def _host_arch() -> str:
    import platform

    return platform.machine().lower()
