"""Direct conv tiles prefetch what the next tile reads from memory while they reduce: its residual, its input.

The next tile is a later parallel task, which the same thread runs next or soon after (TVM splits a
parallel loop into contiguous chunks). Two streams, each a list of cache lines of a tensor:

- **Residual.** A residual add (ResNet's `conv -> BN -> + identity -> ReLU`) reads, for each output pixel
  of a tile, a tensor written layers before. The tile reads it only in its epilogue, after its reduction:
  each of its pixels' lines (NHWC: one pixel's channels of a block, 4 KiB apart where a pixel has 1024
  channels, each on a page of its own, where the hardware prefetchers do not follow) then waits on memory
  with the FMAs stopped. Inside ResNet-50 at batch 8 (AVX-512 code on 2 threads of an AMD EPYC Zen 5), its
  four 1x1 expansions with the residual ran at 40-68% of the FMA peak, the same FLOPs without one at 78-85%;
  prefetched, ResNet-50 at batch 8 132.4 -> 123.3 ms, at batch 1 15.74 -> 15.54 ms (outputs bit-identical).
  Measured on the way: a prefetch at every step, its line the step modulo the tile's lines, gained as much
  with AVX-512 code but cost AVX2's short steps 10-23% (38 integer instructions a step beside 10 FMAs); all
  the lines at once before the reduction 0.4-2%; into L2 (`prefetcht1`) 5.5% against 7.3% into L1.
- **Input**, of a pointwise conv (1x1, unit stride, no padding) whose pixels' channels span more than a
  line. A tile's input is its pixels' channels, one run of memory, read one channel a step across its
  pixels: as many streams as pixels, a pixel's channels apart, where the hardware prefetchers fall behind
  (with one line a pixel, a tile reads consecutive lines, which they follow: AVX2's 16 -> 64 at 112x112 ran
  1.33x slower prefetched). The lines are those of the next task that computes other pixels: the next task,
  or where a pixel tile's channel blocks run in consecutive tasks, the one after them (each of those tasks
  prefetches it; the second time the lines are in L1). A projection to few channels (MobileNetV2's 144 ->
  24) does few FMAs per line and waits on each. Timed alone with inputs rotated past the L3 (AMD EPYC Zen
  5, 2 threads, with and without in one process), AVX-512 / AVX2 code: 144 -> 24 at 56x56 batch 8 0.50-0.70x
  / 0.64-0.69x the time (0.42-0.44 ms with AVX-512, 0.43 with its input in cache), 288 -> 48 at 28x28 0.62x / 0.72x, 256
  -> 64 at 56x56 0.75x / 0.80x, RegNetY-400MF's 1x1 convs at batch 8 0.69-0.99x / 0.82-1.04x, ResNet-50's
  and the expansions to many channels 0.87-1.04x.

A stream of `count` lines over a reduction of `steps` steps prefetches k = ceil(count / steps) lines a step
(step i lines i * k .. i * k + k - 1, into L1: `prefetcht0`), over its first ceil(count / k) steps; the
innermost reduction loop is cut where each stream runs out, so the other steps carry no prefetch. A
tensor of at most REUSE_CACHE_BYTES is taken to be still in the cache its producer wrote it to, and is not
prefetched. The last tasks prefetch the last task's lines; a partial tile's padded pixels, the tensor's last
line.

The schedule marks the task loop (`PREFETCH_NEXT_TILE`, with the streams); `insert_next_tile_prefetches`,
part of bndeploy's x86 TIR lowering (tir_pipeline.py), adds the prefetches. ARM builds keep TVM's lowering,
which ignores the mark (untimed there).
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds
from tvm.tirx.stmt import DeclBuffer, For, SeqStmt

from ..tir_exprs import (bindings_of, block_nests, const_like, element_bytes, loads_in, loops_driving, reduction_bindings,
                         substitute)
from .conv2d import REUSE_CACHE_BYTES
from .weight_prefetch import CACHE_LINE_BYTES, TO_L1, prefetch, rewrite_marked_loops

PREFETCH_NEXT_TILE = "bndeploy.prefetch_next_tile"  # on a task of one tile: the streams, comma-separated
RESIDUAL, INPUT = "residual", "input"


def reads_residual_outside_cache(sch: s_tir.Schedule, writer) -> bool:
    """Whether the conv's epilogue (`writer`, the block writing its output) reads a tensor of the output's
    shape (a residual) too large to still be in the cache its producer wrote it to (REUSE_CACHE_BYTES)."""
    (written,) = sch.get(writer).writes
    shape = _shape(written.source)
    return any(_shape(region.source) == shape and not region.source.same_as(written.source)
               and _bytes(region.source) > REUSE_CACHE_BYTES for region in sch.get(writer).reads)


def streams_input_outside_cache(sch: s_tir.Schedule, conv, writer) -> bool:
    """Whether a pointwise conv (1x1, unit stride, no padding: its input's pixels are its output's, so a
    tile's input is one run of memory) reads an input too large to still be in cache, a pixel's channels
    on more than one line (on one, a tile reads consecutive lines, which the hardware prefetchers follow)."""
    (output,) = sch.get(writer).writes
    inputs = [region.source for region in sch.get(conv).reads if len(region.source.shape) == 4]
    if len(inputs) != 1:
        return False
    (*pixels, channels), steps = _shape(inputs[0]), math.prod(
        int(iv.dom.extent) for iv in sch.get(conv).iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    return (pixels == _shape(output.source)[:3] and steps == channels and _bytes(inputs[0]) > REUSE_CACHE_BYTES
            and channels * element_bytes(inputs[0]) > CACHE_LINE_BYTES)


def _shape(tensor: tirx.Buffer) -> list[int]:
    return [int(extent) for extent in tensor.shape]


def _bytes(tensor: tirx.Buffer) -> int:
    return math.prod(_shape(tensor)) * element_bytes(tensor)


def input_stream(tasks_per_pixel_tile: int) -> str:
    """The INPUT stream of tiles whose next `tasks_per_pixel_tile` - 1 tasks compute the same pixels (the
    other channel blocks): each prefetches the input of the task that moves to the next pixels."""
    return f"{INPUT}:{tasks_per_pixel_tile}"


def mark_next_tile_prefetch(sch: s_tir.Schedule, task, streams: list[str]) -> None:
    """`task`: the parallel loop whose every iteration computes one register tile and writes it; `streams`:
    what of the next tile to prefetch (RESIDUAL, INPUT)."""
    sch.annotate(task, PREFETCH_NEXT_TILE, ",".join(streams))


def insert_next_tile_prefetches(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Every loop marked PREFETCH_NEXT_TILE gets prefetches of what its next iteration reads, lines spread
    over its tile's first reduction steps (`_with_next_tile_prefetches`). Runs on the scheduled function,
    before TVM's lowering."""
    return rewrite_marked_loops(func, PREFETCH_NEXT_TILE, _with_next_tile_prefetches)


def _with_next_tile_prefetches(task: For):
    """The task's body, its tile's innermost reduction loop split where streams run out of lines: each step
    before that prefetches its lines of the next tile's residual and input (step i lines i * k .. i * k + k
    - 1, k the fewest per step that cover a stream in the steps there are, with no division on the way),
    later steps do not. Unchanged where the task is not one tile reduced, then written pixel by pixel."""
    nests = block_nests(task.body)
    updates = [(loops, realize) for loops, realize in nests if reduction_bindings(realize)]
    writer_loops, writer = nests[-1] if nests else ([], None)
    if len(updates) != 1 or writer is None or reduction_bindings(writer):
        return task.body
    update_loops, update = updates[0]
    reduction = loops_driving(update_loops, reduction_bindings(update))
    if not reduction:
        return task.body
    wanted = dict((name, int(stride or 1)) for name, _, stride in
                  (token.partition(":") for token in str(task.annotations[PREFETCH_NEXT_TILE]).split(",")))
    streams = [*(_residual_streams(task, writer_loops, writer) if RESIDUAL in wanted else []),
               *(_input_streams(task, update_loops, update, writer_loops, writer, wanted[INPUT]) if INPUT in wanted else [])]
    if not streams:
        return task.body
    body = tvm_ffi.structural_map(task.body, (For, lambda loop: _split_with_prefetches(loop, streams)
                                              if loop.same_as(reduction[-1]) else loop))
    return SeqStmt([*(DeclBuffer(stream.flat, data=stream.tensor.data) for stream in streams), body])


class _LineStream:
    """`count` cache lines of `tensor` the next tile reads: line j is element `start + offset_of(j)` of the
    tensor seen flat (`flat`, declared before its use)."""

    def __init__(self, tensor: tirx.Buffer, start: tirx.PrimExpr, count: int, offset_of):
        self.tensor, self.start, self.count, self.offset_of = tensor, start, count, offset_of
        self.flat = tirx.decl_buffer([math.prod(_shape(tensor))], tensor.dtype, tensor.name + "_flat")

    def per_step(self, steps: int) -> int:
        return -(-self.count // steps)

    def steps_used(self, steps: int) -> int:
        return -(-self.count // self.per_step(steps))

    def prefetches(self, step: tirx.Var, steps: int) -> list:
        per_step, last = self.per_step(steps), int(self.flat.shape[0]) - 1
        prefetches = []
        for extra in range(per_step):
            line = step * const_like(step, per_step) + const_like(step, extra) if per_step > 1 else step
            if self.count % per_step:  # the last step's lines past the stream's end: its last line again
                line = tirx.min(line, const_like(line, self.count - 1))
            element = self.start + tirx.Cast(str(self.start.ty.dtype), self.offset_of(line))
            # a partial last tile's padded pixels: the tensor's last line instead of past its end
            prefetches.append(prefetch(tirx.BufferLoad(self.flat, [tirx.min(element, const_like(element, last))]), TO_L1))
        return prefetches


def _next_task(task: For, loops: list, stride: int = 1) -> dict:
    """The values that put a tile's loops at the first element of the task `stride` on (the last tasks: the
    last)."""
    first = {task.loop_var: tirx.min(task.loop_var + const_like(task.loop_var, stride), task.extent - const_like(task.loop_var, 1))}
    first.update({loop.loop_var: const_like(loop.loop_var, 0) for loop in loops})
    return first


def _residual_streams(task: For, writer_loops: list, writer) -> list[_LineStream]:
    """The residual lines the next task's epilogue reads: line j is pixel j // per_pixel's channel offset
    offsets[j % per_pixel] past the next tile's first element (pixels of a tile are consecutive in NHWC)."""
    store = writer.block.body
    bindings = bindings_of(writer)
    pixel_loops, channel_loops = _pixel_and_channel_loops(writer_loops, writer)
    if len(pixel_loops) > 1:
        return []
    channels = int(store.buffer.shape[-1])
    block = math.prod(int(loop.extent) for loop in channel_loops)
    offsets = _line_offsets(channels, block, element_bytes(store.buffer))
    first = _next_task(task, [*pixel_loops, *channel_loops])
    pixels = int(pixel_loops[0].extent) if pixel_loops else 1

    def offset_of(line):
        per_pixel = const_like(line, len(offsets))
        return tirx.floordiv(line, per_pixel) * const_like(line, channels) + _select(tirx.floormod(line, per_pixel), offsets)

    return [_LineStream(load.source, _flat([substitute(substitute(i, bindings), first) for i in load.indices], load.source.shape),
                        pixels * len(offsets), offset_of) for load in _residual_loads(store)]


def _input_streams(task: For, update_loops: list, update, writer_loops: list, writer, stride: int) -> list[_LineStream]:
    """The input lines the tile of the task `stride` on reads (a pointwise conv's: its pixels' channels, one
    run)."""
    bindings = bindings_of(update)
    loads = [load for load in loads_in(update.block.body) if len(load.source.shape) == 4 and load.source.scope() == "global"]
    pixel_loops, _ = _pixel_and_channel_loops(writer_loops, writer)
    if len(loads) != 1 or len(pixel_loops) != 1:
        return []
    (load,) = loads
    per_line = CACHE_LINE_BYTES // element_bytes(load.source)
    channels = int(load.source.shape[-1])
    run = int(pixel_loops[0].extent) * channels
    # a run starting mid-line (channels not a whole number of lines) may end on one line more
    count = -(-run // per_line) + (1 if channels % per_line else 0)
    start = _flat([substitute(substitute(i, bindings), _next_task(task, update_loops, stride)) for i in load.indices], load.source.shape)
    return [_LineStream(load.source, start, count, lambda line: line * const_like(line, per_line))]


def _split_with_prefetches(loop: For, streams: list[_LineStream]):
    """`loop` cut where a stream runs out of lines; each piece prefetches the lines of the streams still
    running there."""
    if not isinstance(loop.min, tirx.IntImm) or int(loop.min) != 0:
        return loop
    steps = int(loop.extent)
    cuts = sorted({0, steps, *(stream.steps_used(steps) for stream in streams)})
    pieces = []
    for begin, end in zip(cuts, cuts[1:]):
        var = loop.loop_var if begin == 0 else tirx.Var(f"{loop.loop_var.name}_from{begin}", loop.loop_var.ty)
        running = [stream for stream in streams if stream.steps_used(steps) > begin]
        body = substitute(loop.body, {loop.loop_var: var}) if begin else loop.body
        body = SeqStmt([*(p for stream in running for p in stream.prefetches(var, steps)), body]) if running else body
        pieces.append(For(var, const_like(loop.min, begin), const_like(loop.extent, end - begin), loop.kind, body,
                          loop.thread_binding, loop.annotations))
    return pieces[0] if len(pieces) == 1 else SeqStmt(pieces)


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


def _pixel_and_channel_loops(writer_loops: list, writer) -> tuple[list, list]:
    """The writer's loops over the tile's pixels (in the output's leading indices) and over its channels
    (only in the last)."""
    written_indices = [substitute(index, bindings_of(writer)) for index in writer.block.body.indices]
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
    shape = _shape(store.buffer)
    loads: dict[str, TensorLoad] = {}
    for load in loads_in(store.value):
        if load.source.scope() == "global" and _shape(load.source) == shape:
            loads.setdefault(load.source.name, load)
    return list(loads.values())
