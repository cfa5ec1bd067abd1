"""Schedules a fused PrimFunc holding one of bndeploy's conv kernels (conv2d.py) and its epilogue.

After FuseOps/FuseTIR the function is: [producers] -> [pad] -> conv (annotated with its tiling) ->
conv_out -> [elementwise epilogue blocks] -> [broadcast tail] -> output. The schedule:
- inlines every producer into the padding copy (or into the conv when it has none) and every
  epilogue block of the conv's output shape into the last one, which then writes straight from registers;
- leaves a broadcast tail (FuseOps appends an op that broadcasts the conv's output to a larger shape, as
  a squeeze-excitation's `x * sigmoid(fc(pool(x)))` does with its 1x1 conv) as a loop nest of its own;
- tiles the conv's (pixel, channel) space into register tiles, reduction (kh, kw, ic) outside the tile,
  accumulators in a local buffer (registers), pixels unrolled, channels vectorised;
- reads the zero border through conditions in the input loads where a tile's rows are known (depthwise
  convs; grouped convs whose tiles are row-aligned), otherwise from a padding copy;
- parallelises the tile loops; vectorises the padding copy and the accumulator initialisation.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from ..tir_exprs import block_nests, loops_driving
from ..tir_pipeline import PARTITION_HINT
from .conv2d import CONV_BLOCK_ATTR, DEPTHWISE, INTERLEAVED, PAIRED, Tiling, row_aligned, tile_rows_and_columns
from .next_tile_prefetch import (RESIDUAL, input_stream, mark_next_tile_prefetch, reads_residual_outside_cache,
                                 streams_input_outside_cache)
from .weight_prefetch import mark_weight_prefetch, prefetches_next_weight_block
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
    elif tiling.kind == INTERLEAVED:
        _tile_interleaved(sch, conv, writer, pad, tiling)
        pad = None
    elif tiling.kind == PAIRED:
        _tile_paired(sch, conv, writer, tiling)
    elif pad is not None and _grouped(sch, conv):
        _tile_grouped(sch, conv, writer, pad, tiling)
        pad = None
    else:
        _tile_direct(sch, conv, writer, tiling)
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


def _tile_direct(sch: s_tir.Schedule, conv, writer, tiling: Tiling, tiles_per_task: int = 1) -> None:
    """Register tiles in parallel tasks. A task computes `tiles_per_task` pixel tiles of one channel block
    (the tiles of one output row, whose input rows are then the task's row plus a constant), one tile
    otherwise."""
    n, p_outer, o_outer, reduction, p_inner, o_inner = split_direct_tiles(sch, conv, writer, tiling)
    if tiles_per_task > 1:
        rows, tiles = sch.split(p_outer, [None, tiles_per_task])
        outer = [n, rows, o_outer, tiles] if tiling.pixels_outer else [n, o_outer, rows, tiles]
        sch.reorder(*outer, *reduction, p_inner, o_inner)
        sch.annotate(tiles, PARTITION_HINT, 1)  # only a row's first and last tiles test columns
        register_tile(sch, conv, writer, outer, reduction, p_inner, o_inner, tiling, parallel_loops=3)
    else:
        outer = [n, p_outer, o_outer] if tiling.pixels_outer else [n, o_outer, p_outer]
        sch.reorder(*outer, *reduction, p_inner, o_inner)
        tiles_per_block = int(sch.get(n).extent) * int(sch.get(p_outer).extent)
        weight = _packed_weight(sch, conv)
        if not _grouped(sch, conv) and prefetches_next_weight_block(tiles_per_block, weight, tiling.pixels_outer):
            mark_weight_prefetch(sch, reduction[-1], weight)
        tasks_per_pixel_tile = int(sch.get(o_outer).extent) if tiling.pixels_outer else 1
        register_tile(sch, conv, writer, outer, reduction, p_inner, o_inner, tiling)
        streams = [*([RESIDUAL] if reads_residual_outside_cache(sch, writer) else []),
                   *([input_stream(tasks_per_pixel_tile)] if streams_input_outside_cache(sch, conv, writer) else [])]
        if streams:
            mark_next_tile_prefetch(sch, sch.get_loops(conv)[0], streams)


def _packed_weight(sch: s_tir.Schedule, conv):
    """The packed weight a direct conv reads: (channel blocks, kh, kw, inputs of a group, channel block)."""
    (weight,) = [region.source for region in sch.get(conv).reads if len(region.source.shape) == 5]
    return weight


def _channels_read(sch: s_tir.Schedule, conv) -> int:
    """Input channels one output channel reads (the conv's innermost reduction: kh, kw, channels)."""
    *_, channels = [int(iv.dom.extent) for iv in sch.get(conv).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return channels


def _grouped(sch: s_tir.Schedule, conv) -> bool:
    """A grouped conv, whose tiles read only their group's channels of the (padded) input.

    Its padding copy as a pass of its own cost up to a third of the kernel's time: a second parallel
    region, and tiles reading rows that another core wrote (RegNet's 8-channel groups, 104 channels on
    28x28, AVX-512 code on 2 threads of an AMD EPYC Zen 4: 0.081 ms with the copy, 0.058 ms for the same
    work with no padding at all). A row-aligned tile reads the zero border through a condition in its
    loads instead, as a depthwise conv does (the same conv: 0.061 ms; where every tile was a whole row,
    0.064 ms with each task padding its own window on the stack). TVM's simplifier proves the condition
    true for the tile's inner pixels and taps, and LLVM keeps the rest out of the FMA chain. A dense conv
    reads every input channel in each of its tiles and keeps the copy, as does a grouped conv whose tiles
    cross row ends; each of its tasks then pads just what its tiles read (`_tile_by_group`)."""
    return _channels_read(sch, conv) < _input_channels(sch, conv)


def _input_channels(sch: s_tir.Schedule, conv) -> int:
    """The channels of the input (or of its padding copy) a direct conv reads: its last axis."""
    weight = _packed_weight(sch, conv)
    (source,) = [region.source for region in sch.get(conv).reads
                 if region.source.scope() != "local" and not region.source.same_as(weight)]
    return int(source.shape[-1])


def _tile_grouped(sch: s_tir.Schedule, conv, writer, pad, tiling: Tiling) -> None:
    """Row-aligned tiles read the border through conditions, a task computing one row's tiles. Other
    tiles read a padding copy: made inside each task when the tasks go by group (channel blocks outer),
    else a pass of its own."""
    height, width = _output_shape(sch, writer)[1:3]
    if row_aligned(tiling.pixel_block, height, width):
        sch.compute_inline(pad)
        _tile_direct(sch, conv, writer, tiling, tiles_per_task=max(width // tiling.pixel_block, 1))
    elif tiling.pixels_outer:
        _tile_direct(sch, conv, writer, tiling)
        schedule_pad_copy(sch, pad)
    else:
        _tile_by_group(sch, conv, writer, pad, tiling)


def _tile_interleaved(sch: s_tir.Schedule, conv, writer, pad, tiling: Tiling) -> None:
    """Tasks of (image, vector of groups, chunk of output rows), each first writing the interleaved input
    rows its tiles read into a buffer of its own (in its core's cache), then its rows' tiles. A tile's
    reduction steps are (kernel row, input channel); the row's taps are unrolled inside the tile's pixels,
    so each input pixel is broadcast once per step (conv2d.interleaved_tiling). A task per
    row copied each input row three times over (a 3x3 kernel's rows) and the copy cost a quarter of the
    FMAs' time on 14x14 maps; a copy as a pass of its own took a second parallel region. An input stored
    interleaved (no "pad" block) is read in place, a task per row of tiles, the border tested in the loads
    and only a row's first and last tiles testing columns."""
    n, y, x, block, channel, group, kernel_row, channel_in, tap = sch.get_loops(conv)
    per_vector = int(sch.get(group).extent)
    lanes = sch.fuse(channel, group)
    tile_rows, tile_columns = tile_rows_and_columns(tiling.pixel_block, _output_shape(sch, writer)[2])
    tiles, columns = sch.split(x, [None, tile_columns])
    row_tiles, rows = sch.split(y, [None, tile_rows])
    if pad is None:
        outer = [n, block, row_tiles, tiles]
        sch.annotate(tiles, PARTITION_HINT, 1)
    else:
        chunk, row_tiles = _split_into_chunks(sch, row_tiles, int(sch.get(n).extent) * int(sch.get(block).extent))
        outer = [n, block, chunk, row_tiles, tiles]
    reduction = [kernel_row, channel_in]
    sch.reorder(*outer, *reduction, rows, columns, tap, lanes)
    pixels = sch.fuse(rows, columns)
    sch.unroll(tap)  # an input pixel's broadcast is the same load for every tap that reads it: LLVM loads it once
    if _output_shape(sch, writer)[-1] % tiling.channel_block:
        _write_by_group(sch, writer, outer[-1], per_vector)
        register_tile(sch, conv, writer, outer, reduction, pixels, lanes, tiling, parallel_loops=3, writer_placed=True)
        for loop in loops_below(sch, writer, outer[-1])[:-3]:  # the tile's pixels: registers, not the stack
            sch.unroll(loop)
    else:
        register_tile(sch, conv, writer, outer, reduction, pixels, lanes, tiling, parallel_loops=3)
    if pad is not None:
        sch.compute_at(pad, sch.get_loops(conv)[0])
        *_, channel, group = sch.get_loops(pad)
        _vectorize_channels(sch, sch.fuse(channel, group))


def _tile_paired(sch: s_tir.Schedule, conv, writer, tiling: Tiling) -> None:
    """Tasks of (image, group, row of tiles); a tile's reduction steps are (kernel row, pair of input
    channels), the row's taps unrolled inside its pixels as in `_tile_interleaved`, and its input read in
    place, only a row's first and last tiles testing columns. The writer adds each accumulator's lane pairs,
    which TVM cannot place under the tile by its reads (a constant index), so the conv is placed under the
    writer's tile loop instead."""
    per_group = int(sch.get(conv).iter_vars[4].dom.extent)
    tile_rows, tile_columns = tile_rows_and_columns(tiling.pixel_block, _output_shape(sch, writer)[2])
    n, y, x, channels = sch.get_loops(writer)
    group, channel = sch.split(channels, [None, per_group])
    row_tiles, rows = sch.split(y, [None, tile_rows])
    tiles, columns = sch.split(x, [None, tile_columns])
    sch.reorder(n, group, row_tiles, tiles, rows, columns, channel)
    sch.annotate(tiles, PARTITION_HINT, 1)
    sch.compute_at(conv, tiles)
    sch.parallel(sch.fuse(n, group, row_tiles))
    sch.set_scope(conv, 0, "local")
    axes = _loops_by_axis(sch, conv, loops_below(sch, conv, tiles))  # n, y, x, group, j, p, rkh, ric, rkw
    pixels = [axes[axis] for axis in (1, 2) if axis in axes]
    reduction = [axes[axis] for axis in (6, 7) if axis in axes]
    taps = [axes[8]] if 8 in axes else []
    lanes = sch.fuse(axes[4], axes[5])
    sch.reorder(*reduction, *pixels, *taps, lanes)
    for tap in taps:
        sch.unroll(tap)
    if pixels:
        _unroll_tile(sch, sch.fuse(*pixels) if len(pixels) > 1 else pixels[0], lanes, tiling)
    else:  # a one-pixel tile
        vectorize_channel_block(sch, lanes, tiling)
    init = sch.decompose_reduction(conv, (reduction + taps)[0])
    _unroll_tile(sch, *loops_below(sch, init, tiles)[-2:], tiling)
    written = loops_below(sch, writer, tiles)
    sch.unroll(sch.fuse(*written[:-1]) if len(written) > 2 else written[0])
    sch.vectorize(written[-1])


def _loops_by_axis(sch: s_tir.Schedule, block, loops) -> dict:
    """Each of `loops` (around `block`) by the index of the block axis whose binding it drives: loops of
    extent 1 are often not generated, so their positions do not tell."""
    (realize,) = [realize for _, realize in block_nests(sch.get(loops[0])) if realize.block.same_as(sch.get(block))]
    return {next(axis for axis, value in enumerate(realize.iter_values) if loops_driving([sch.get(loop)], [value])): loop
            for loop in loops}


def _write_by_group(sch: s_tir.Schedule, writer, tile, per_vector: int) -> None:
    """The writer under `tile`, a vector's output channels as (group, channel of the group): the last vector,
    short of groups, skips the missing ones a group at a time, the group's channels still written as one
    vector. (Tested per channel, the writer was left scalar: 13 groups of 8 at stride 2 to 14x14, AVX-512
    code, ran at half the speed of 14 groups.)"""
    sch.reverse_compute_at(writer, tile)
    *_, channels = sch.get_loops(writer)
    sch.split(channels, [per_vector, None])


# Parallel tasks a grouped conv's copy-reading tiles are cut into at least (a group's tiles in chunks):
# TVM hands each core an equal range of tasks, and 16 spread over 2-8 cores within one task of even.
MIN_GROUP_TASKS = 16


def _split_into_chunks(sch: s_tir.Schedule, loop, outer_tasks: int):
    """`loop` split in (chunks, rest), as many chunks as make `outer_tasks` x chunks at least MIN_GROUP_TASKS
    parallel tasks (at most one per iteration)."""
    chunks = min(-(-MIN_GROUP_TASKS // outer_tasks), int(sch.get(loop).extent))
    return sch.split(loop, [chunks, None])


def _tile_by_group(sch: s_tir.Schedule, conv, writer, pad, tiling: Tiling) -> None:
    """Tasks of (image, group, chunk of the group's pixel tiles), each padding the input rows and group
    channels its tiles read into a buffer of its own, then computing the tiles (every channel block of
    the group) from it while it is in the core's cache. As a pass of its own the copy took a second
    parallel region and cores read rows another core wrote: 128 channels in groups of 16, stride 2 to
    14x14, AVX2 code on 2 threads of an AMD EPYC Zen 4, both timed interleaved: 0.047 -> 0.043 ms, and
    0.051 -> 0.045 ms where the copy transposes an NCHW input (in another run: separate pass 0.042 ms,
    per task 0.039, the same conv unpadded 0.035). Chunks of a group both pad the rows their tiles share
    (10% more copying on 14x14)."""
    n, p_outer, o_outer, reduction, p_inner, o_inner = split_direct_tiles(sch, conv, writer, tiling)
    per_group = _output_shape(sch, writer)[-1] * _channels_read(sch, conv) // _input_channels(sch, conv)
    group, block = sch.split(o_outer, [None, per_group // tiling.channel_block])
    chunk, tile = _split_into_chunks(sch, p_outer, int(sch.get(n).extent) * int(sch.get(group).extent))
    outer = [n, group, chunk, block, tile]
    sch.reorder(*outer, *reduction, p_inner, o_inner)
    register_tile(sch, conv, writer, outer, reduction, p_inner, o_inner, tiling, parallel_loops=3)
    task = sch.get_loops(conv)[0]
    sch.compute_at(pad, task)
    _vectorize_channels(sch, loops_below(sch, pad, task)[-1])


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
    first and last tiles of a row test columns: inside the row the tile is branch-free. That needs the
    x86 lowering (tir_pipeline.keep_loop_partition_hints: TVM's own drops the hint; there AVX2's 3x3 on
    144 channels at 56x56 took 0.086 ms instead of 0.060); ARM builds keep TVM's lowering, untimed."""
    n, y, x, c, *reduction = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, tiling.pixel_block])
    c_outer, c_inner = sch.split(c, [None, tiling.channel_block])
    sch.reorder(n, y, c_outer, x_outer, *reduction, x_inner, c_inner)
    sch.annotate(x_outer, PARTITION_HINT, 1)
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
            if isinstance(extent, tirx.IntImm):  # one block wider than the channels: write the real ones
                _vectorize_real_channels(sch, writer_channels, int(extent), tiling)
    init = sch.decompose_reduction(conv, reduction[0])
    initialised = loops_below(sch, init, tile)
    if len(initialised) >= 2:
        _unroll_tile(sch, *initialised[-2:], tiling)


def _vectorize_real_channels(sch: s_tir.Schedule, channels, extent: int, tiling: Tiling) -> None:
    """The epilogue of a conv with fewer channels than its one channel block (24 in AVX-512's 32) in the
    widest vectors that divide them, unrolled. Left to LLVM, its bias and residual adds ran one lane at a
    time: MobileNetV2's 144 -> 24 projection with its residual at 56x56, AVX-512 code, batch 8, did 624
    scalar adds per 14-pixel tile; vectorized, the kernel took 1.76 ms instead of 2.01 (medians of four
    interleaved profiles, AMD EPYC Zen 4)."""
    lanes = next((v for v in (tiling.vector_lanes, 8, 4) if v <= extent and extent % v == 0), None)
    if lanes is None:
        return
    vectors, inner = sch.split(channels, [None, lanes])
    sch.unroll(vectors)
    sch.vectorize(inner)


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
    """The padding copy in parallel rows, channels in vectors."""
    n, y, x, c = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))
    _vectorize_channels(sch, c)


def _vectorize_channels(sch: s_tir.Schedule, channels) -> None:
    extent = int(sch.get(channels).extent)
    lanes = next((v for v in (16, 8, 4) if extent % v == 0), None)
    if lanes is not None:
        _, inner = sch.split(channels, [None, lanes])
        sch.vectorize(inner)
