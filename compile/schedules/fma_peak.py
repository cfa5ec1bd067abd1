"""A kernel that measures the FMA peak of the ISA an artifact is compiled for, on the machine it runs on.

Each CPU artifact carries it (`bndeploy_fma_peak`), so `bndeploy profile` can state "% of peak" on any
device, a board without a compiler included, for exactly the vector width and compiler the artifact's
kernels use. The loop keeps one register-resident FMA chain per accumulator (at least as many as hide the FMA
latency on every pipe) and nothing else: no loads, so it runs at the core's FMA throughput.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, te, tirx

from .isa import VectorISA

FMA_PEAK_SYMBOL = "bndeploy_fma_peak"
CHUNKS = 64  # parallel work items, spread over the runtime's threads
ITERATIONS = 20000


def fma_peak_operands(isa: VectorISA) -> int:
    """k: chain (i, j) multiplies addend register i by multiplier register j, so k * k distinct chains
    (identical chains would be merged by the compiler) need only 2k operand registers beside them."""
    k = 1
    while (k + 1) ** 2 + 2 * (k + 1) <= isa.registers:
        k += 1
    return k


def fma_peak_accumulators(isa: VectorISA) -> int:
    return fma_peak_operands(isa) ** 2


def fma_peak_flops(isa: VectorISA) -> int:
    """Floating-point operations of one call."""
    return 2 * CHUNKS * ITERATIONS * fma_peak_accumulators(isa) * isa.lanes


def fma_peak_primfunc(isa: VectorISA) -> tirx.PrimFunc:
    """PrimFunc(x: (lanes,) f32, out: (CHUNKS, accumulators, lanes) f32); time it and divide
    `fma_peak_flops` by the seconds."""
    lanes, accumulators = isa.lanes, fma_peak_accumulators(isa)
    x = te.placeholder((lanes,), "float32", name="x")
    decay = tirx.const(0.999, "float32")
    k = fma_peak_operands(isa)
    # acc += addend * multiplier: the accumulator is the FMA's addend, which NEON's fmla (vd += vn * vm)
    # needs; with acc * decay + addend every FMA needed a register copy first (half the peak on ARM).
    step = te.reduce_axis((0, ITERATIONS), name="step")
    out = te.compute((CHUNKS, accumulators, lanes),
                     lambda c, a, lane: te.sum((x[lane] + (a // k).astype("float32"))
                                               * (decay + (a % k).astype("float32") * tirx.const(1e-4, "float32")),
                                               axis=step), name="acc")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    block = sch.get_sblock("acc")
    chunk, accumulator, lane, step_loop = sch.get_loops(block)
    sch.reorder(chunk, step_loop, accumulator, lane)
    sch.reverse_compute_at(sch.cache_write(block, 0, "local"), chunk)
    sch.parallel(chunk)
    sch.unroll(accumulator)
    sch.vectorize(lane)
    sch.decompose_reduction(block, step_loop)
    return sch.mod["main"].with_attr("global_symbol", FMA_PEAK_SYMBOL)


def add_fma_peak(lowered: tvm.IRModule, isa: VectorISA) -> dict | None:
    """Adds the peak kernel to a lowered module; returns its manifest entry (None for scalar ISAs)."""
    if isa.lanes < 4:
        return None
    lowered[FMA_PEAK_SYMBOL] = fma_peak_primfunc(isa)
    return {"symbol": FMA_PEAK_SYMBOL, "flops": fma_peak_flops(isa), "isa": isa.name,
            "x_shape": [isa.lanes], "out_shape": [CHUNKS, fma_peak_accumulators(isa), isa.lanes]}
