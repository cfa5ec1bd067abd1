"""Direct conv tiles whose epilogue reads a residual from memory prefetch the next tile's while they reduce.

A residual add (ResNet's `conv -> BN -> + identity -> ReLU`) reads, for each output pixel of a tile, a
tensor written layers before. The tile reads it only in its epilogue, after its reduction: each of its
pixels' lines (NHWC: one pixel's channels of a block, 4 KiB apart where a pixel has 1024 channels, each
on a page of its own, where the hardware prefetchers do not follow) then waits on memory with the FMAs
stopped. Inside ResNet-50 at batch 8 (AVX-512 code on 2 threads of an AMD EPYC Zen 5), its four 1x1
expansions with the residual ran at 40-68% of the FMA peak, the same FLOPs without one at 78-85%.

So a tile's first reduction steps each prefetch into L1 (`prefetcht0`) one line of the residual the next
tile (the next parallel task, which the same thread runs next) reads: step i line i, pixel i // lines a
pixel and that pixel's i-th line, addressed from the tile's first element (a tile's pixels follow each
other in NHWC), and the loop is split there so the other steps carry no prefetch. Where the residual is at
most REUSE_CACHE_BYTES it is taken to be still in cache and nothing is prefetched. ResNet-50, the same
commit with and without, interleaved in one process, outputs bit-identical: at batch 8 132.4 -> 123.3 ms,
at batch 1 15.74 -> 15.54 ms; RegNetY-400MF, MobileNetV3-Large and ResNet-50 with AVX2 code moved within
1.4% either way. Measured on the way: a prefetch at every step, its line the step modulo the tile's lines,
gained as much with AVX-512 code but cost AVX2's short steps 10-23% (its address took 38 integer
instructions a step beside 10 FMAs); all the lines at once before the reduction gained 0.4-2%; into L2
(`prefetcht1`) 5.5% against 7.3% into L1; prefetching the output's lines for writing, nothing.

The schedule marks the task loop (`PREFETCH_NEXT_TILE_RESIDUAL`); `insert_residual_prefetches`, part of
bndeploy's x86 TIR lowering (tir_pipeline.py), adds the prefetches. ARM builds keep TVM's lowering, which
ignores the mark (untimed there).
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds
from tvm.tirx.stmt import DeclBuffer, For, SeqStmt

from ..tir_exprs import bindings_of, block_nests, const_like, loops_driving, reduction_bindings, substitute
from .conv2d import REUSE_CACHE_BYTES
from .weight_prefetch import CACHE_LINE_BYTES, TO_L1, prefetch, rewrite_marked_loops

PREFETCH_NEXT_TILE_RESIDUAL = "bndeploy.prefetch_next_tile_residual"  # loop annotation on a task of one tile


def reads_residual_outside_cache(sch: s_tir.Schedule, writer) -> bool:
    """Whether the conv's epilogue (`writer`, the block writing its output) reads a tensor of the output's
    shape (a residual) too large to still be in the cache its producer wrote it to (REUSE_CACHE_BYTES)."""
    (written,) = sch.get(writer).writes
    shape = [int(extent) for extent in written.source.shape]
    return any([int(extent) for extent in region.source.shape] == shape and not region.source.same_as(written.source)
               and _bytes(region.source) > REUSE_CACHE_BYTES for region in sch.get(writer).reads)


def _bytes(tensor: tirx.Buffer) -> int:
    return math.prod(int(extent) for extent in tensor.shape) * tvm.runtime.DataType(tensor.dtype).bits // 8


def mark_residual_prefetch(sch: s_tir.Schedule, task) -> None:
    """`task`: the parallel loop whose every iteration computes one register tile and writes it."""
    sch.annotate(task, PREFETCH_NEXT_TILE_RESIDUAL, 1)


def insert_residual_prefetches(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Every loop marked PREFETCH_NEXT_TILE_RESIDUAL gets prefetches of the residual its next iteration's
    epilogue reads, a line per step of its tile's first reduction steps (`_with_residual_prefetches`). Runs
    on the scheduled function, before TVM's lowering."""
    return rewrite_marked_loops(func, PREFETCH_NEXT_TILE_RESIDUAL, _with_residual_prefetches)


def _with_residual_prefetches(task: For):
    """The task's body, its tile's innermost reduction loop split in two: the first steps each prefetch one
    line of the next tile's residual (step i line i, with no division on the way), the rest do not. Unchanged
    where the task is not one tile reduced, then written pixel by pixel."""
    nests = block_nests(task.body)
    updates = [(loops, realize) for loops, realize in nests if reduction_bindings(realize)]
    writer_loops, writer = nests[-1] if nests else ([], None)
    if len(updates) != 1 or writer is None or reduction_bindings(writer):
        return task.body
    update_loops, update = updates[0]
    reduction = loops_driving(update_loops, reduction_bindings(update))
    lines = _NextTileLines.of(task, writer_loops, writer) if reduction else None
    if lines is None:
        return task.body
    body = tvm_ffi.structural_map(task.body, (For, lambda loop: lines.split_with_prefetches(loop)
                                              if loop.same_as(reduction[-1]) else loop))
    return SeqStmt([*lines.declarations(), body])


class _NextTileLines:
    """The residual lines the next task's tile reads: line i is pixel i // per_pixel's channel offset
    offsets[i % per_pixel] past the next tile's first element (pixels of a tile are consecutive in NHWC)."""

    def __init__(self, starts: list, pixels: int, offsets: list[int], channels: int):
        self.starts, self.pixels, self.offsets, self.channels = starts, pixels, offsets, channels

    @staticmethod
    def of(task: For, writer_loops: list, writer):
        store = writer.block.body
        bindings = bindings_of(writer)
        pixel_loops, channel_loops = _pixel_and_channel_loops(writer_loops, [substitute(i, bindings) for i in store.indices])
        if len(pixel_loops) > 1:
            return None
        channels = int(store.buffer.shape[-1])
        block = math.prod(int(loop.extent) for loop in channel_loops)
        offsets = _line_offsets(channels, block, tvm.runtime.DataType(store.buffer.dtype).bits // 8)
        first = {task.loop_var: tirx.min(task.loop_var + const_like(task.loop_var, 1), task.extent - const_like(task.loop_var, 1))}
        first.update({loop.loop_var: const_like(loop.loop_var, 0) for loop in [*pixel_loops, *channel_loops]})
        starts = [(load.source, _flat_view(load.source), _flat([substitute(substitute(i, bindings), first) for i in load.indices], load.source.shape))
                  for load in _residual_loads(store)]
        pixels = int(pixel_loops[0].extent) if pixel_loops else 1
        return _NextTileLines(starts, pixels, offsets, channels) if starts else None

    def declarations(self) -> list:
        """The statements declaring the flat views the prefetches read through."""
        return [DeclBuffer(flat, data=tensor.data) for tensor, flat, _ in self.starts]

    def split_with_prefetches(self, loop: For):
        if not isinstance(loop.min, tirx.IntImm) or int(loop.min) != 0:
            return loop
        count = self.pixels * len(self.offsets)
        first_steps = min(count, int(loop.extent))
        head = _with_first(loop, first_steps, self._prefetches(loop.loop_var))
        if first_steps == int(loop.extent):
            return head
        rest = tirx.Var(loop.loop_var.name + "_rest", loop.loop_var.ty)
        tail = For(rest, loop.min + const_like(loop.min, first_steps), loop.extent - const_like(loop.extent, first_steps),
                   loop.kind, substitute(loop.body, {loop.loop_var: rest}), loop.thread_binding, loop.annotations)
        return SeqStmt([head, tail])

    def _prefetches(self, line: tirx.Var) -> list:
        per_pixel = const_like(line, len(self.offsets))
        pixel, offset = tirx.floordiv(line, per_pixel), _select(tirx.floormod(line, per_pixel), self.offsets)
        prefetches = []
        for _, flat, start in self.starts:
            element = start + tirx.Cast(str(start.ty.dtype), pixel * const_like(line, self.channels) + offset)
            # a partial last tile's padded pixels: the tensor's last line instead of past its end
            prefetches.append(prefetch(tirx.BufferLoad(flat, [tirx.min(element, const_like(element, int(flat.shape[0]) - 1))]), TO_L1))
        return prefetches


def _with_first(loop: For, extent: int, statements: list) -> For:
    return For(loop.loop_var, loop.min, const_like(loop.extent, extent), loop.kind, SeqStmt([*statements, loop.body]),
               loop.thread_binding, loop.annotations)


def _flat_view(tensor: tirx.Buffer) -> tirx.Buffer:
    """`tensor` as one row of elements (declared by a DeclBuffer before its use)."""
    return tirx.decl_buffer([math.prod(int(d) for d in tensor.shape)], tensor.dtype, tensor.name + "_flat")


def _flat(indices: list, shape) -> tirx.PrimExpr:
    flat = indices[0]
    for index, extent in zip(indices[1:], shape[1:]):
        flat = flat * extent + index
    return flat


def _select(index: tirx.PrimExpr, values: list[int]) -> tirx.PrimExpr:
    """values[index], as arithmetic where the values are evenly spaced, else as selects."""
    spacing = values[1] - values[0] if len(values) > 1 else 0
    if all(value == values[0] + spacing * position for position, value in enumerate(values)):
        return const_like(index, values[0]) + index * const_like(index, spacing)
    chosen = const_like(index, values[-1])
    for position in reversed(range(len(values) - 1)):
        chosen = tirx.Select(index == const_like(index, position), const_like(index, values[position]), chosen)
    return chosen


def _pixel_and_channel_loops(writer_loops: list, written_indices: list) -> tuple[list, list]:
    """The writer's loops over the tile's pixels (in the output's leading indices) and over its channels
    (only in the last)."""
    pixel_loops = loops_driving(writer_loops, written_indices[:-1])
    channel_loops = loops_driving(writer_loops, written_indices[-1:])
    return pixel_loops, [loop for loop in channel_loops if not any(loop.same_as(pixel) for pixel in pixel_loops)]


def _line_offsets(channels: int, block: int, element_bytes: int) -> list[int]:
    """Channel offsets in a block of `block` channels whose elements lie on each cache line the block spans:
    one every line's worth from the first; where blocks or pixels do not start lines, also the last."""
    per_line = CACHE_LINE_BYTES // element_bytes
    offsets = list(range(0, block, per_line))
    if channels % per_line or block % per_line:
        offsets.append(block - 1)
    return offsets


def _residual_loads(store) -> list[TensorLoad]:
    """The writer's loads of tensors of its output's shape (one per tensor)."""
    shape = [int(extent) for extent in store.buffer.shape]
    loads: dict[str, TensorLoad] = {}

    def visit(load):
        if load.source.scope() == "global" and [int(extent) for extent in load.source.shape] == shape:
            loads.setdefault(load.source.name, load)

    tvm_ffi.structural_walk(store.value, (TensorLoad, visit))
    return list(loads.values())
