"""Schedules a fused PrimFunc holding one of bndeploy's conv kernels (conv2d.py) and its epilogue.

After FuseOps/FuseTIR the function is: [producers] -> [pad] -> conv (annotated with its tiling) ->
conv_out -> [elementwise epilogue blocks] -> [broadcast tail] -> output. The schedule:
- inlines every producer into the padding copy (or into the conv when it has none) and every
  epilogue block of the conv's output shape into the last one, which then writes straight from registers;
- leaves a broadcast tail (FuseOps appends an op that broadcasts the conv's output to a larger shape, as
  a squeeze-excitation's `x * sigmoid(fc(pool(x)))` does with its 1x1 conv) as a loop nest of its own;
- tiles the conv's (pixel, channel) space into register tiles, reduction (kh, kw, ic) outside the tile,
  accumulators in a local buffer (registers), pixels unrolled, channels vectorised;
- parallelises the tile loops; vectorises the padding copy and the accumulator initialisation.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx

from ..tir_pipeline import CPU_TIR_PIPELINE, MAX_STACK_TILE_BYTES, tir_pipeline_for
from .conv2d import CONV_BLOCK_ATTR, DEPTHWISE, Tiling
from .winograd import WINOGRAD, schedule_winograd


class NotAConvKernel(Exception):
    """The function does not hold exactly one annotated conv block in the expected shape."""


def conv_block(sch: s_tir.Schedule):
    """The annotated conv block and its tiling, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        annotations = sch.get(block).annotations
        if CONV_BLOCK_ATTR in annotations:
            return block, Tiling.from_annotation(annotations[CONV_BLOCK_ATTR])
    return None


def has_conv_block(func: tirx.PrimFunc) -> bool:
    return conv_block(s_tir.Schedule(func)) is not None


def schedule_conv(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    found = conv_block(sch)
    if found is None:
        raise NotAConvKernel("no annotated conv block")
    conv, tiling = found
    if tiling.kind == WINOGRAD:
        writer, pad, tail = _inline_around(sch, conv, kernel_prefix="winograd_")
        _schedule_tail(sch, tail)
        return schedule_winograd(sch, conv, tiling, writer, pad)
    writer, pad, tail = _inline_around(sch, conv)
    if tiling.kind == DEPTHWISE:
        if pad is not None:
            sch.compute_inline(pad)
            pad = None
        _tile_depthwise(sch, conv, writer, tiling)
    else:
        whole_rows = pad is not None and tiling.pixel_block >= _output_shape(sch, writer)[2]
        tile = _tile_direct(sch, conv, writer, tiling)
        if whole_rows and _pad_per_tile(sch, pad, conv, tile):
            pad = None
    if pad is not None:
        schedule_pad_copy(sch, pad)
    return _schedule_tail(sch, tail)


def _schedule_tail(sch: s_tir.Schedule, tail) -> tirx.PrimFunc:
    if tail is not None:
        from .generic import vectorize_and_parallelize

        vectorize_and_parallelize(sch, sch.get_loops(tail))
    return sch.mod["main"]


def _inline_around(sch: s_tir.Schedule, conv, kernel_prefix: str | None = None):
    """Inline producers into the padding copy, the epilogue into the writer of the conv-shaped result (the
    blocks from `conv_out` on) and a broadcast tail into its last block; returns (writer, pad, tail's last
    block). Blocks before the conv named with `kernel_prefix` are the kernel's own, not producers."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    index = [sch.get(b).same_as(sch.get(conv)) for b in blocks].index(True)
    pad = blocks[names.index("pad")] if "pad" in names[:index] else None
    for block, name in zip(blocks[:index], names):
        if name != "pad" and not (kernel_prefix and name.startswith(kernel_prefix)):
            sch.compute_inline(block)
    epilogue = blocks[names.index("conv_out"):]
    conv_shape = _output_shape(sch, epilogue[0])
    same_shape = [b for b in epilogue if _output_shape(sch, b) == conv_shape]
    if same_shape != epilogue[:len(same_shape)]:
        raise NotAConvKernel("an epilogue block of the conv's shape follows a broadcast one")
    tail = epilogue[len(same_shape):]
    for block in same_shape[:-1] + tail[:-1]:
        sch.compute_inline(block)
    return same_shape[-1], pad, (tail[-1] if tail else None)


def _output_shape(sch: s_tir.Schedule, block) -> tuple:
    return tuple(int(d) for d in sch.get(block).writes[0].source.shape)


def _flatten_pixels(sch: s_tir.Schedule, writer) -> None:
    """The writer iterates (n, oh, ow, c), or (rows, c) for a dense layer; make it (n, oh*ow, c) and
    (0, rows, c), the axes of the conv's accumulators."""
    iter_vars = sch.get(writer).iter_vars
    if len(iter_vars) == 2:
        sch.transform_block_layout(writer, lambda x, c: (x * 0, x, c))
        return
    if len(iter_vars) != 4:
        raise NotAConvKernel(f"the output writer has {len(iter_vars)} axes, expected 4 (NHWC) or 2 (dense)")
    width = iter_vars[2].dom.extent
    sch.transform_block_layout(writer, lambda n, y, x, c: (n, y * width + x, c))


def _tile_direct(sch: s_tir.Schedule, conv, writer, tiling: Tiling):
    """Returns the loop over tiles (each iteration one parallel task computing one tile)."""
    n, p_outer, o_outer, reduction, p_inner, o_inner = split_direct_tiles(sch, conv, writer, tiling)
    outer = [n, p_outer, o_outer] if tiling.pixels_outer else [n, o_outer, p_outer]
    sch.reorder(*outer, *reduction, p_inner, o_inner)
    register_tile(sch, conv, writer, outer, reduction, p_inner, o_inner, tiling)
    return sch.get_loops(conv)[0]


def _pad_per_tile(sch: s_tir.Schedule, pad, conv, tile) -> bool:
    """A grouped conv's tile pads its own input window (its rows, its group's channels) in its task, in a
    buffer on the task's stack.

    The padding copy as a pass of its own costs a grouped conv a second parallel region, and each tile then
    reads rows another core wrote (measured on RegNet's 8-channel groups, 104 channels on 28x28, AVX-512
    code on 2 threads of an AMD EPYC Zen 4: 0.079 ms with the copy, 0.058 ms for the same work without any
    padding, 0.063 ms padding per tile). Only for tiles of one output row or more (`whole_rows` in
    schedule_conv: tiles of half a row of 56 were slower so, 0.135 ms against 0.124 with the copy), where
    bndeploy's TIR pipeline keeps such a window on the stack (x86: tir_pipeline.py) and when it fits there.
    A dense conv's tile would copy every input channel of its rows once per channel block: dense convs keep
    the copy, as does a copy that transposes an NCHW network input."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or tir_pipeline_for(target) != CPU_TIR_PIPELINE:
        return False
    *_, in_channels_read = [int(iv.dom.extent) for iv in sch.get(conv).iter_vars  # (kh, kw,) input channels
                            if iv.iter_type == tirx.IterVar.CommReduce]
    window_channels = int(sch.get(pad).writes[0].source.shape[-1])
    if in_channels_read >= window_channels:
        return False  # a dense conv
    if any(int(read.source.shape[-1]) != window_channels for read in sch.get(pad).reads):
        return False  # the copy also transposes an NCHW input: a window would gather across channel planes
    if 4 * math.prod(_window(sch, pad, tile)) > MAX_STACK_TILE_BYTES:
        return False
    sch.compute_at(pad, tile)
    sch.set_scope(pad, 0, "local")
    *_, channels = loops_below(sch, pad, tile)
    sch.vectorize(channels)
    return True


def _window(sch: s_tir.Schedule, pad, tile) -> list[int]:
    """The extents of the padded window a tile reads, as TVM will allocate it: where the window's height
    depends on the tile (a tile of the flattened pixels crossing a row end), its largest value over all
    tiles, as TVM's buffer compaction bounds it (the whole padded image when TVM cannot tell better)."""
    trial = sch.copy()
    trial.compute_at(pad, tile)
    task = trial.get(tile)
    analyzer = tvm.sym.Analyzer()
    analyzer.bind(task.loop_var, tvm.ir.Range.from_min_extent(task.min, task.extent))
    extents = [trial.get(loop).extent for loop in loops_below(trial, pad, tile)]
    return [analyzer.const_int_bound(extent).max_value for extent in extents]


def split_direct_tiles(sch: s_tir.Schedule, conv, writer, tiling: Tiling):
    """The direct conv's loops split into register tiles: (n, pixel tiles, channel blocks, reduction
    loops, pixels of a tile, channels of a block); the writer iterates the accumulators' axes."""
    _flatten_pixels(sch, writer)
    n, p, o, *reduction = sch.get_loops(conv)
    p_outer, p_inner = sch.split(p, [None, tiling.pixel_block])
    o_outer, o_inner = sch.split(o, [None, tiling.channel_block])
    return n, p_outer, o_outer, reduction, p_inner, o_inner


def _tile_depthwise(sch: s_tir.Schedule, conv, writer, tiling: Tiling) -> None:
    """Rows in parallel; along a row, tiles of pixels by channel blocks (each tile reads all channels of
    its pixels, contiguous in NHWC). The zero border is read through a condition, not from a padded copy:
    a depthwise conv does few FMAs per input, so the copy's extra read and write of the whole input cost
    more than the conditions (measured on MobileNet shapes: 1.4-2.1x faster without the copy). The condition
    is marked likely and the loop over a row's tiles is partitioned (TVM's LoopPartition), so only the
    first and last tiles of a row test columns: inside the row the tile is branch-free (with the test in
    every tile, llvm-mca predicted 51-59% of the FMA peak on Cortex-A76 and AVX2 ran 1.4-2.6x slower)."""
    n, y, x, c, *reduction = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, tiling.pixel_block])
    c_outer, c_inner = sch.split(c, [None, tiling.channel_block])
    sch.reorder(n, y, c_outer, x_outer, *reduction, x_inner, c_inner)
    sch.annotate(x_outer, "pragma_loop_partition_hint", 1)
    register_tile(sch, conv, writer, [n, y, c_outer, x_outer], reduction, x_inner, c_inner, tiling, parallel_loops=2)


def register_tile(sch: s_tir.Schedule, conv, writer, outer, reduction, pixels, channels, tiling: Tiling,
                   parallel_loops: int = 0, writer_placed: bool = False) -> None:
    """Accumulators of one tile in registers over the whole reduction, written by the epilogue (already
    moved under outer[-1] when `writer_placed`). The outer loops run in parallel (the first
    `parallel_loops` of them, when given; none when it is negative: a loop around them, merged with other
    stages', is the parallel one)."""
    if not writer_placed:
        sch.reverse_compute_at(writer, outer[-1])
    sch.set_scope(conv, 0, "local")
    if parallel_loops < 0:
        tile = outer[-1]
    else:
        count = parallel_loops or len(outer)
        task = sch.fuse(*outer[:count]) if count > 1 else outer[0]
        sch.parallel(task)
        tile = task if count == len(outer) else outer[-1]  # the loop over tiles the writer sits in
    _unroll_tile(sch, pixels, channels, tiling)
    # The writer's and the initialisation's (pixel, channel) loops; a loop of extent 1 is not generated
    # (a one-pixel tile, one real channel), and such a degenerate tile is left as it is.
    written = loops_below(sch, writer, tile)
    if len(written) >= 2:
        writer_pixels, writer_channels = written[-2:]
        extent = sch.get(writer_channels).extent
        if isinstance(extent, tirx.IntImm) and int(extent) == tiling.channel_block:  # not a padded channel block
            _unroll_tile(sch, writer_pixels, writer_channels, tiling)
        else:
            sch.unroll(writer_pixels)
    init = sch.decompose_reduction(conv, reduction[0])
    initialised = loops_below(sch, init, tile)
    if len(initialised) >= 2:
        _unroll_tile(sch, *initialised[-2:], tiling)


def loops_below(sch: s_tir.Schedule, block, loop) -> list:
    """The loops of `block` nested inside `loop`, outermost first."""
    loops = sch.get_loops(block)
    position = [sch.get(candidate).same_as(sch.get(loop)) for candidate in loops].index(True)
    return loops[position + 1:]


def _unroll_tile(sch: s_tir.Schedule, pixels, channels, tiling: Tiling) -> None:
    """Pixels unrolled; channels as register-wide vectors, the vectors of a block unrolled."""
    sch.unroll(pixels)
    vectorize_channel_block(sch, channels, tiling)


def vectorize_channel_block(sch: s_tir.Schedule, channels, tiling: Tiling) -> None:
    """A loop over a block's channels as register-wide vectors (one vector per `vector_lanes`), unrolled."""
    if tiling.channel_block > tiling.vector_lanes:
        vectors, lanes = sch.split(channels, [None, tiling.vector_lanes])
        sch.unroll(vectors)
        sch.vectorize(lanes)
    else:
        sch.vectorize(channels)


def schedule_pad_copy(sch: s_tir.Schedule, pad) -> None:
    n, y, x, c = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))
    extent = int(sch.get(c).extent)
    lanes = next((v for v in (16, 8, 4) if extent % v == 0), None)
    if lanes is not None:
        _, inner = sch.split(c, [None, lanes])
        sch.vectorize(inner)
