"""Direct conv tiles prefetch the next channel block's weights where few pixel tiles share a block.

Tiles go channel block by channel block (channels outer), so only a block's first pixel tile reads its
weights from memory; the others find them in cache. Where a block serves few pixel tiles (a 1x1 conv on a
7x7 map at batch 1: 7 tiles), that first tile waits on memory for a large share of the time: 440 -> 440
channels on 7x7, AVX-512 code, 2 threads of an AMD EPYC Zen 5, 93% of the FMA peak with the weights in
cache and 71% with them in memory (40 weight copies in rotation), as inside RegNetY-400MF at batch 1
(70-72%). Each reduction step of such a tile then prefetches the next block's weights for the same step
into L2 (`prefetcht1`), a block ahead of its first tile: 68% -> 83% (440 channels), 74% -> 82% (320 ->
1280), 75% -> 84% (512 -> 2048), with the weights in cache 91% -> 89%. AVX2 code's 5-pixel tiles (10 a
block) on the same maps: 73% -> 86% (440), 77% -> 90% (512 -> 2048), 71% -> 88% (160 -> 960), all with the
weights in memory and % of each ISA's FMA loop. A block serving many tiles gains nothing and loses the
loads' slots: 1024 -> 256 on 14x14 in 4-pixel tiles (49 per block) 88% -> 79%. Nor does a large block,
whose successor evicts it from L2 before its last tile: 2048 -> 512 (256 KiB a block) 74% -> 72%, a 3x3
512 -> 512 on 7x7 (576 KiB) 72% -> 63%. Small blocks stream fast enough without: 96 -> 80 (12 KiB) and
128 -> 128 (16 KiB) moved within 1%, and a grouped conv's 2.3 KiB blocks (440 channels in groups of 8 on
7x7, AVX2 code) ran at half the speed with a prefetch per step of 7 FMAs, so only dense convs prefetch.

The schedule marks the tile's innermost reduction loop (`PREFETCH_NEXT_WEIGHT_BLOCK`, naming the weight
buffer); `insert_weight_prefetches`, part of bndeploy's x86 TIR lowering (tir_pipeline.py), adds the
prefetches at the top of its body. ARM builds keep TVM's lowering, which ignores the mark (untimed there).
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds
from tvm.tirx.stmt import For, SeqStmt

from ..tir_exprs import bindings_of, const_like, element_bytes, loads_in, substitute

PREFETCH_NEXT_WEIGHT_BLOCK = "bndeploy.prefetch_next_weight_block"  # loop annotation: the weight buffer's name
MAX_TILES_PER_WEIGHT_BLOCK = 16
# Two blocks (the one computed, the one prefetched) stay well inside the L2 of every x86 core bndeploy
# targets (512 KiB on Zen 2/3, 1-2 MiB on newer cores).
MAX_PREFETCHED_BLOCK_BYTES = 128 * 1024
MIN_PREFETCHED_BLOCK_BYTES = 24 * 1024
CACHE_LINE_BYTES = 64
TO_L1, TO_L2 = 3, 2  # llvm.prefetch's locality: prefetcht0, prefetcht1
_READ, _DATA = 0, 1  # llvm.prefetch's rw and cache-type arguments


def prefetches_next_weight_block(tiles_per_block: int, weight: tirx.Buffer, pixels_outer: bool) -> bool:
    """Whether a dense conv's direct tiles prefetch the next channel block of `weight` (the packed weight:
    channel blocks, then one block's weights) (see the module's docstring)."""
    blocks, *block_shape = (int(extent) for extent in weight.shape)
    block_bytes = math.prod(block_shape) * element_bytes(weight)
    return (not pixels_outer and blocks > 1 and tiles_per_block <= MAX_TILES_PER_WEIGHT_BLOCK
            and MIN_PREFETCHED_BLOCK_BYTES <= block_bytes <= MAX_PREFETCHED_BLOCK_BYTES)


def mark_weight_prefetch(sch: s_tir.Schedule, reduction_loop, weight: tirx.Buffer) -> None:
    sch.annotate(reduction_loop, PREFETCH_NEXT_WEIGHT_BLOCK, weight.name)


def insert_weight_prefetches(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Every loop marked PREFETCH_NEXT_WEIGHT_BLOCK starts its body with prefetches of the cache lines of
    the next channel block's weights that the tile below it reads at this step (the last block prefetches
    itself). Runs on the scheduled function, before TVM's lowering."""
    return rewrite_marked_loops(func, PREFETCH_NEXT_WEIGHT_BLOCK, _with_next_block_prefetches)


def rewrite_marked_loops(func: tirx.PrimFunc, mark: str, body_of) -> tirx.PrimFunc:
    """`func` with each loop annotated `mark` given the body `body_of(loop)`, its annotation dropped."""

    def rewrite(loop: For) -> For:
        if mark not in loop.annotations:
            return loop
        annotations = {key: value for key, value in loop.annotations.items() if key != mark}
        return For(loop.loop_var, loop.min, loop.extent, loop.kind, body_of(loop), loop.thread_binding,
                   annotations, loop.step, loop.span)

    body = tvm_ffi.structural_map(func.body, (For, rewrite))
    return func if body.same_as(func.body) else func.with_body(body)


def _with_next_block_prefetches(loop: For):
    step = _weight_load_at_step(loop, str(loop.annotations[PREFETCH_NEXT_WEIGHT_BLOCK]))
    return loop.body if step is None else SeqStmt([*_next_block_prefetches(step), loop.body])


def _weight_load_at_step(loop: For, weight_name: str) -> TensorLoad | None:
    """The weight load of the tile's first accumulator at this step of `loop`: the conv block's weight read,
    its block variables replaced by their bindings and the tile's own loops (all below `loop`) by 0."""
    realizes, tile_loops = [], []
    tvm_ffi.structural_walk(loop.body, [(s_tir.SBlockRealize, realizes.append), (For, tile_loops.append)])
    for realize in realizes:
        loads = [load for load in loads_in(realize.block.body) if load.source.name == weight_name]
        if loads:
            zeros = {inner.loop_var: const_like(inner.loop_var, 0) for inner in tile_loops}
            return substitute(substitute(loads[0], bindings_of(realize)), zeros)
    return None


def _next_block_prefetches(load: TensorLoad) -> list[tirx.Evaluate]:
    """A prefetch per cache line of the weight vector(s) `load` starts, one channel block further on."""
    weight, indices = load.source, list(load.indices)
    blocks, block_width = weight.shape[0], int(weight.shape[-1])
    per_line = CACHE_LINE_BYTES // element_bytes(weight)
    next_block = tirx.min(indices[0] + const_like(indices[0], 1), blocks - 1)
    prefetches = []
    for offset in range(0, block_width, per_line):
        line = tirx.BufferLoad(weight, [next_block, *indices[1:-1], const_like(indices[-1], offset)])
        prefetches.append(prefetch(line, TO_L2))
    return prefetches


def prefetch(element: tirx.BufferLoad, locality: int) -> tirx.Evaluate:
    """A prefetch (for reading) of the cache line holding `element`."""
    flags = (tirx.IntImm("int32", flag) for flag in (_READ, locality, _DATA))
    return tirx.Evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(element), *flags))
