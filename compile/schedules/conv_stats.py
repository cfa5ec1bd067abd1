"""Training-mode BatchNorm statistics in the epilogue of the conv before it (CPU).

A train-mode conv -> BN reads the conv's output twice more without this: once for the batch mean and
variance, once to normalise. Here the direct conv kernel (conv2d.py) also sums, while a register tile's
accumulators are still in registers, the shifted values d = y - K and d^2 of every output channel, per
chunk of pixel tiles; a tiny kernel adds the chunks' sums up into the mean and the population variance.
The normalisation then reads y once, fused with what follows the BN (ReLU, a residual add).

Precision, as bn_stats.py: the shift K per channel is the conv's output at the first pixel of the first
image (computed by a block of its own from the same formula), so d is of the order of the spread, not of
the mean; d and d^2 are summed in float64 (d^2 of a float32 difference is exact in float64), and
mean = K + S1/M, var = (S2 - S1^2/M)/M. A mean of 1e4 with unit spread loses no digit this way; the
float32 E[y^2] - E[y]^2 would lose all of them.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .bn_stats import clamp_negative, finite_shift, shifted_sums
from .conv2d import ConvSpec, Tiling, _i64, channel_blocks, direct_accumulation, direct_conv, padded_channels
from .conv_schedule import (conv_block, loops_below, register_tile, schedule_pad_copy, split_direct_tiles,
                            vectorize_channel_block)
from .generic import mark_scheduled

PARALLEL_TASKS = 16  # (image, channel block, pixel chunk) tasks wanted: enough to balance 2-16 threads


def pixel_chunks(spec: ConvSpec, tiling: Tiling) -> int:
    """Chunks of pixel tiles per image, each with its own partial sums (the chunks run in parallel): as
    many as give PARALLEL_TASKS tasks with the images and channel blocks. The last chunk may end in a few
    tiles past the image (clamped copies of its last pixel, left out of the sums)."""
    tiles = -(-spec.pixels // tiling.pixel_block)
    return max(1, min(tiles, -(-PARALLEL_TASKS // (spec.batch * channel_blocks(spec, tiling)))))


def tiles_per_chunk(spec: ConvSpec, tiling: Tiling, chunks: int) -> int:
    return -(-spec.pixels // (tiling.pixel_block * chunks))


def conv2d_stats_compute(spec: ConvSpec, tiling: Tiling, chunks: int) -> tirx.PrimFunc:
    """PrimFunc(data, packed weight, shift (C',) f32) -> (out NHWC, s1 and s2 (N, chunks, C') f64), C' the
    channels padded to whole blocks."""
    conv = direct_conv(spec, tiling, chunks * tiles_per_chunk(spec, tiling, chunks))
    channels = int(conv.accumulators.shape[2])
    shift = te.placeholder(_i64(channels), "float32", name="shift")
    per_chunk = int(conv.accumulators.shape[1]) // chunks
    pixels = tirx.IntImm("int64", spec.pixels)
    r = te.reduce_axis(_i64(0, per_chunk), name="r")

    def chunk_sums(n, k, o):
        p = k * per_chunk + r
        d = conv.accumulators[n, p, o].astype("float64") - shift[o].astype("float64")
        d = tirx.Select(p < pixels, d, tirx.const(0.0, "float64"))  # the padded tail of the last tile
        return shifted_sums()((d, d * d), axis=[r])

    s1, s2 = te.compute(_i64(spec.batch, chunks, channels), chunk_sums, name="stats")
    return te.create_prim_func([conv.data, conv.weight, shift, conv.out, s1, s2])


def shift_primfunc(spec: ConvSpec, tiling: Tiling) -> tirx.PrimFunc:
    """PrimFunc(data, packed weight) -> shift (C',) f32: the conv's output at the first pixel of the first
    image, every channel (the zero border read through a condition: no copy of the input)."""
    conv = direct_conv(spec, tiling)
    at_first_pixel = direct_accumulation(spec, tiling, conv.source, conv.weight)
    zero = tirx.IntImm("int64", 0)
    raw = te.compute(conv.accumulators.shape[2:], lambda o: at_first_pixel(zero, zero, o), name="shift")
    shift = te.compute(raw.shape, lambda o: finite_shift(raw[o].astype("float64")).astype("float32"), name="finite_shift")
    sch = s_tir.Schedule(te.create_prim_func([conv.data, conv.weight, shift]))
    pad = block_or_none(sch, "pad")
    if pad is not None:
        sch.compute_inline(pad)
    _schedule_shift(sch, sch.get_sblock("shift"), tiling)
    return mark_scheduled(sch.mod["main"])


def schedule_conv_stats(func: tirx.PrimFunc, chunks: int) -> tirx.PrimFunc:
    """The conv's register tiles as schedule_conv lays them out (channel blocks outside pixel tiles), the
    pixel tiles split into `chunks` parallel chunks; each tile adds its pixels to its chunk's sums, kept
    in registers across the chunk's tiles."""
    sch = s_tir.Schedule(func)
    conv, tiling = conv_block(sch)
    pad = block_or_none(sch, "pad")
    writer, stats = sch.get_sblock("conv_out"), sch.get_sblock("stats")
    n, p_outer, o_outer, reduction, p_inner, o_inner = split_direct_tiles(sch, conv, writer, tiling)
    chunk, tile = sch.split(p_outer, [chunks, None])
    outer = [n, o_outer, chunk, tile]
    sch.reorder(*outer, *reduction, p_inner, o_inner)
    register_tile(sch, conv, writer, outer, reduction, p_inner, o_inner, tiling, parallel_loops=3)
    accumulate_in_tile(sch, stats, tile, tiling)
    if pad is not None:
        schedule_pad_copy(sch, pad)
    return mark_scheduled(sch.mod["main"])


def block_or_none(sch: s_tir.Schedule, name: str):
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == name]
    return blocks[0] if blocks else None


SHIFT_CHAINS = 8  # channel vectors the shift accumulates at once: independent FMA chains hide FMA latency


def _schedule_shift(sch: s_tir.Schedule, shift, tiling: Tiling) -> None:
    """One output pixel for every channel: the reduction outside, up to SHIFT_CHAINS channel vectors inside
    it (each its own accumulator chain, in registers), so the FMAs overlap instead of waiting on each other."""
    channel, *reduction = sch.get_loops(shift)
    extent = int(sch.get(channel).extent)
    lanes = tiling.vector_lanes
    vectors_in_all = extent // lanes
    chains = max(c for c in range(1, SHIFT_CHAINS + 1) if vectors_in_all % c == 0)
    groups, vectors, lane = sch.split(channel, [None, chains, lanes])
    sch.reorder(groups, *reduction, vectors, lane)
    write_back = sch.cache_write(shift, 0, "local")
    sch.reverse_compute_at(write_back, groups)
    sch.vectorize(sch.get_loops(write_back)[-1])
    sch.unroll(vectors)
    sch.vectorize(lane)
    init = sch.decompose_reduction(shift, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


def accumulate_in_tile(sch: s_tir.Schedule, stats, tile, tiling: Tiling) -> None:
    """The statistics block under the tile loop (it reads the tile's accumulators), its two sums in
    registers over the chunk's tiles and written once per chunk (the parallel task loop, outside `tile`)."""
    sch.reverse_compute_at(stats, tile)
    task = sch.get_loops(stats)[0]
    write_backs = [sch.cache_write(stats, output, "local") for output in (0, 1)]
    for write_back in write_backs:
        sch.reverse_compute_at(write_back, task)
    # (channels, pixels...): one pixel loop (a direct conv's tile; none for a one-pixel tile) or two (a
    # Winograd tile's rows and columns)
    channels, *pixels = loops_below(sch, stats, tile)
    if pixels:
        sch.reorder(*pixels, channels)
        for loop in pixels:
            sch.unroll(loop)
    vectorize_channel_block(sch, channels, tiling)
    init = sch.decompose_reduction(stats, tile)
    vectorize_channel_block(sch, sch.get_loops(init)[-1], tiling)
    for write_back in write_backs:
        vectorize_channel_block(sch, sch.get_loops(write_back)[-1], tiling)


def build_conv2d_stats_primfunc(spec: ConvSpec, tiling: Tiling, chunks: int) -> tirx.PrimFunc:
    """The scheduled conv + statistics kernel, its pixel tiles in `chunks` chunks (pixel_chunks)."""
    return schedule_conv_stats(conv2d_stats_compute(spec, tiling, chunks), chunks)


def stats_combine_primfunc(spec: ConvSpec, tiling: Tiling, chunks: int) -> tirx.PrimFunc:
    """PrimFunc(shift, s1, s2, bias) -> (mean (C,) f32, population variance (C,) f32): the chunks' sums added
    up; `bias` (C,) is added to the mean (the statistics of conv + bias)."""
    channels = padded_channels(spec, tiling)
    shift = te.placeholder(_i64(channels), "float32", name="shift")
    s1 = te.placeholder(_i64(spec.batch, chunks, channels), "float64", name="s1")
    s2 = te.placeholder(_i64(spec.batch, chunks, channels), "float64", name="s2")
    bias = te.placeholder(_i64(spec.out_channels), "float32", name="bias")
    rn = te.reduce_axis(_i64(0, spec.batch), name="rn")
    rk = te.reduce_axis(_i64(0, chunks), name="rk")
    total1, total2 = te.compute(
        _i64(spec.out_channels), lambda o: shifted_sums()((s1[rn, rk, o], s2[rn, rk, o]), axis=[rn, rk]), name="total")
    count = float(spec.batch * spec.pixels)
    mean = te.compute(_i64(spec.out_channels), lambda o: (
        shift[o].astype("float64") + total1[o] / count + bias[o].astype("float64")).astype("float32"), name="mean")
    var = te.compute(_i64(spec.out_channels),
                     lambda o: clamp_negative((total2[o] - total1[o] * total1[o] / count) / count).astype("float32"),
                     name="var")
    sch = s_tir.Schedule(te.create_prim_func([shift, s1, s2, bias, mean, var]))
    channel = sch.get_loops(sch.get_sblock("total"))[0]
    for name in ("mean", "var"):
        sch.reverse_compute_at(sch.get_sblock(name), channel)
    return mark_scheduled(sch.mod["main"])
