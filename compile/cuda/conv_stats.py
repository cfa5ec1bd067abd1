"""Training-mode BatchNorm statistics in the epilogue of the CUDA conv before it.

Without this a train-mode conv -> BN on the GPU runs the conv, then reduction kernels that read its
output again for the batch mean and variance, then the normalisation (a third read). Here one thread
block computes a tile of output pixels x output channels (an NCHW direct conv, each thread a small
register tile, input and weights staged through shared memory), keeps the tile in shared memory, writes
it out, and sums the tile's statistics per channel from shared memory with a cross-thread reduction.
A small kernel combines the tiles' sums into the mean and the population variance; the normalisation
(fused by TVM with the ReLU or residual add after it) then reads the conv's output once.

Precision: each tile sums d = y - c and d^2 in float32, c being the tile's first output pixel of the
channel (so d is of the order of the spread, not of the mean; an Inf or NaN c is replaced by 0, as the
CPU kernels' shift: bn_stats.finite_shift). A tile holds at most TILE pixels (64), so its float32 sums
carry a relative error of about 64 ulp at worst. The combine works in float64: each tile's mean
m_t = c + S1/n_t and its sum of squared deviations S2 - S1^2/n_t, then Chan et al.'s pairwise formula
around the first tile's mean K: mean = K + sum n_t (m_t - K) / M and
var = (sum [M2_t + n_t (m_t - K)^2] - (sum n_t (m_t - K))^2 / M) / M. A mean of 1e4 with unit spread
keeps its variance to float32 precision this way; E[y^2] - E[y]^2 in float32 would lose every digit.

The compute (`conv2d_stats_compute`, `stats_combine_compute`) is target-independent: the Relax rewrite
(fuse_statistics.py) emits it unscheduled, and the schedule here (`ConvStatisticsSchedule`, a dlight
rule) lays it out for the GPU. So the same compute can be built for the CPU and checked against ONNX
Runtime on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import s_tir, te, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from ..schedules.bn_stats import clamp_negative, finite_shift, shifted_sums
from ..schedules.conv2d import ConvSpec
from ..schedules.conv_schedule import loops_below
from ..schedules.generic import OPAQUE_PATTERN

TILE_ATTR = "bndeploy.gpu_conv_tile"  # on the conv + statistics PrimFunc: its GpuTile, as a list of ints
COMBINE_ATTR = "bndeploy.gpu_stats_combine"  # on the combine PrimFunc: threads per channel
WEIGHT_STAGE_BYTES = 24 * 1024  # shared memory for one reduction step's weights (a block may use 48 KiB)
COMBINE_THREADS = 256


@dataclass(frozen=True)
class GpuTile:
    """One thread block's share of the conv: `rows` x `cols` output pixels by `channels` output channels;
    each thread accumulates `thread_channels` channels x `thread_cols` adjacent pixels of a row in
    registers. `reduce_step` input channels (with all their taps) are staged in shared memory at a time."""

    rows: int = 8
    cols: int = 8
    channels: int = 32
    thread_channels: int = 4
    thread_cols: int = 2
    reduce_step: int = 8

    @property
    def pixel_threads(self) -> int:  # threadIdx.x: one warp over the tile's pixels
        return self.rows * self.cols // self.thread_cols

    @property
    def channel_threads(self) -> int:  # threadIdx.y
        return self.channels // self.thread_channels

    def as_attr(self) -> list[int]:
        return [self.rows, self.cols, self.channels, self.thread_channels, self.thread_cols, self.reduce_step]

    @staticmethod
    def from_attr(values) -> "GpuTile":
        return GpuTile(*(int(v) for v in values))


def gpu_tile(spec: ConvSpec) -> GpuTile:
    """The tile for a conv: 32 output channels per block (fewer for narrower convs, in whole thread
    registers), and as many input channels per shared-memory step (up to 8, a divisor of the input
    channels) as keep the step's weights within WEIGHT_STAGE_BYTES."""
    base = GpuTile()
    channels = min(base.channels, -(-spec.out_channels // base.thread_channels) * base.thread_channels)
    kh, kw = spec.kernel
    fits = [d for d in range(1, base.reduce_step + 1)
            if spec.in_channels % d == 0 and d * kh * kw * channels * 4 <= WEIGHT_STAGE_BYTES]
    return GpuTile(channels=channels, reduce_step=max(fits, default=1))


def supports(spec: ConvSpec) -> bool:
    """Dense (one group) convs; grouped and depthwise convs keep the separate statistics kernel."""
    return spec.groups == 1


@dataclass(frozen=True)
class TileGrid:
    """The conv's output padded to whole tiles: tiles per image (rows, columns) and channels per block."""

    spec: ConvSpec
    tile: GpuTile

    @property
    def tile_rows(self) -> int:
        return -(-self.spec.out_height // self.tile.rows)

    @property
    def tile_cols(self) -> int:
        return -(-self.spec.out_width // self.tile.cols)

    @property
    def channels(self) -> int:  # output channels padded to whole blocks
        return -(-self.spec.out_channels // self.tile.channels) * self.tile.channels

    def sums_shape(self) -> tuple[int, int, int, int]:  # per image, tile row, tile column, channel
        return (self.spec.batch, self.tile_rows, self.tile_cols, self.channels)

    def output_shape(self) -> tuple[int, int, int, int]:
        s = self.spec
        return (s.batch, s.out_channels, s.out_height, s.out_width)


def pack_gpu_weight(weights: np.ndarray, grid: TileGrid) -> np.ndarray:
    """OIHW weights with the output channels padded with zeros to whole blocks."""
    padded = np.zeros((grid.channels, *weights.shape[1:]), dtype=np.float32)
    padded[: weights.shape[0]] = weights
    return padded


def _tile_center(value):
    """The value a tile's sums are taken around: its first pixel (float32), or 0 when that is not finite."""
    return finite_shift(value, "float32")


def conv2d_stats_compute(spec: ConvSpec, tile: GpuTile) -> tirx.PrimFunc:
    """PrimFunc(data NCHW, weight (C', Cin, KH, KW)) -> (out NCHW, s1 and s2 float32 of sums_shape): the conv
    and, per tile of output pixels and channel, the sums of d and d^2 around the tile's first pixel."""
    grid = TileGrid(spec, tile)
    s = spec
    kh, kw = s.kernel
    (sh, sw), (dh, dw) = s.strides, s.dilation
    top, left = s.padding[0], s.padding[1]
    rows, cols = tile.rows, tile.cols
    pad_h = (grid.tile_rows * rows - 1) * sh + (kh - 1) * dh + 1
    pad_w = (grid.tile_cols * cols - 1) * sw + (kw - 1) * dw + 1
    data = te.placeholder((s.batch, s.in_channels, s.height, s.width), "float32", name="data")
    weight = te.placeholder((grid.channels, s.in_channels, kh, kw), "float32", name="weight")
    pad = te.compute(
        (s.batch, s.in_channels, pad_h, pad_w),
        lambda n, c, y, x: tirx.if_then_else(
            tirx.all(y >= top, y < top + s.height, x >= left, x < left + s.width),
            data[n, c, y - top, x - left], tirx.const(0.0, "float32")),
        name="pad")
    rc, ry, rx = (te.reduce_axis((0, extent), name=name) for extent, name in ((s.in_channels, "rc"), (kh, "ry"), (kw, "rx")))
    # output row h = i * rows + r, column w = j * cols + c: (tile row i, row r in it, tile column j, column c).
    # Kept apart so that every read of `conv` below is a unit-stride index (reverse_compute_at could not
    # place the consumers under a tile when they read h = i * rows + r through one index).
    conv = te.compute(
        (s.batch, grid.channels, grid.tile_rows, rows, grid.tile_cols, cols),
        lambda n, o, i, r, j, c: te.sum(
            pad[n, rc, (i * rows + r) * sh + ry * dh, (j * cols + c) * sw + rx * dw] * weight[o, rc, ry, rx],
            axis=[rc, ry, rx]),
        name="conv")
    out = te.compute(grid.output_shape(), lambda n, o, h, w: conv[n, o, h // rows, h % rows, w // cols, w % cols],
                     name="conv_out")
    # a block of its own: a block reading `conv` at a pixel and at its tile's first pixel defeats
    # reverse_compute_at's region solving
    center = te.compute(grid.sums_shape(), lambda n, i, j, o: _tile_center(conv[n, o, i, 0, j, 0]), name="center")
    rh, rw = te.reduce_axis((0, rows), name="rh"), te.reduce_axis((0, cols), name="rw")

    def tile_sums(n, i, j, o):
        d = conv[n, o, i, rh, j, rw] - center[n, i, j, o]
        inside = tirx.all(i * rows + rh < s.out_height, j * cols + rw < s.out_width)
        d = tirx.Select(inside, d, tirx.const(0.0, "float32"))  # the tile's part past the image's edge
        return shifted_sums()((d, d * d), axis=[rh, rw])

    s1, s2 = te.compute(grid.sums_shape(), tile_sums, name="stats")
    func = te.create_prim_func([data, weight, out, s1, s2])
    return func.with_attrs({TILE_ATTR: tile.as_attr(), "op_pattern": OPAQUE_PATTERN})


def stats_combine_compute(spec: ConvSpec, tile: GpuTile) -> tirx.PrimFunc:
    """PrimFunc(out NCHW, s1, s2, bias (C,)) -> (mean (C,), population variance (C,)) float32: the tiles'
    sums combined in float64 (the module docstring's formula); `bias` moves the mean (statistics of
    conv + bias). The tiles' centers are read back from the conv's output."""
    grid = TileGrid(spec, tile)
    out = te.placeholder(grid.output_shape(), "float32", name="out")
    s1, s2 = (te.placeholder(grid.sums_shape(), "float32", name=name) for name in ("s1", "s2"))
    bias = te.placeholder((spec.out_channels,), "float32", name="bias")

    def tile_count(i, j):
        rows = tirx.min(tile.rows, spec.out_height - i * tile.rows)
        cols = tirx.min(tile.cols, spec.out_width - j * tile.cols)
        return (rows * cols).astype("float64")

    def tile_mean_and_m2(n, i, j, o):
        count = tile_count(i, j)
        sum1, sum2 = s1[n, i, j, o].astype("float64"), s2[n, i, j, o].astype("float64")
        mean = _tile_center(out[n, o, i * tile.rows, j * tile.cols]).astype("float64") + sum1 / count
        return mean, sum2 - sum1 * sum1 / count

    zero = tirx.IntImm("int32", 0)

    def pivot_of(o):  # K: the first tile's mean (0 when not finite)
        return finite_shift(tile_mean_and_m2(zero, zero, zero, o)[0])

    pivot = te.compute((spec.out_channels,), pivot_of, name="pivot")
    rn, ri, rj = (te.reduce_axis((0, extent), name=name)
                  for extent, name in ((spec.batch, "rn"), (grid.tile_rows, "ri"), (grid.tile_cols, "rj")))

    def around_pivot(o):
        mean, m2 = tile_mean_and_m2(rn, ri, rj, o)
        count = tile_count(ri, rj)
        d = mean - pivot[o]
        return shifted_sums()((count * d, m2 + count * d * d), axis=[rn, ri, rj])

    total1, total2 = te.compute((spec.out_channels,), around_pivot, name="total")
    samples = float(spec.batch * spec.pixels)
    # K again from its formula, not from `pivot`: the schedule computes `pivot` inside the reduction's
    # thread block, which it could not if `mean` (placed after the reduction) read it too
    mean = te.compute((spec.out_channels,), lambda o: (
        pivot_of(o) + total1[o] / samples + bias[o].astype("float64")).astype("float32"), name="mean")
    var = te.compute((spec.out_channels,), lambda o: clamp_negative(
        (total2[o] - total1[o] * total1[o] / samples) / samples).astype("float32"), name="var")
    func = te.create_prim_func([out, s1, s2, bias, mean, var])
    return func.with_attrs({COMBINE_ATTR: COMBINE_THREADS, "op_pattern": OPAQUE_PATTERN})


# --------------------------------------------------------------------------------------------------
# GPU schedules


def schedule_conv_stats(func: tirx.PrimFunc) -> s_tir.Schedule:
    """Thread block = (image, tile of pixels) x block of channels. The register tile accumulates in local
    memory over input channels staged `reduce_step` at a time in shared memory; the finished tile goes to
    shared memory, from which the block writes the output and reduces the tile's statistics."""
    tile = GpuTile.from_attr(func.attrs[TILE_ATTR])
    sch = s_tir.Schedule(func)
    conv, out, center, stats = (sch.get_sblock(name) for name in ("conv", "conv_out", "center", "stats"))
    n, o, h_block, h_thread, w_block, w = sch.get_loops(conv)[:6]
    rc, ry, rx = sch.get_loops(conv)[6:]
    o_block, o_thread, o_reg = sch.split(o, [None, tile.channel_threads, tile.thread_channels])
    w_thread, w_reg = sch.split(w, [None, tile.thread_cols])
    rc_step, rc_inner = sch.split(rc, [None, tile.reduce_step])
    sch.reorder(n, h_block, w_block, o_block, o_thread, h_thread, w_thread, rc_step, rc_inner, ry, rx, o_reg, w_reg)
    pixel_thread = sch.fuse(h_thread, w_thread)
    # bound before the cache stages are placed: a shared buffer's region then spans the block's threads
    sch.bind(sch.fuse(n, h_block, w_block), "blockIdx.x")
    sch.bind(o_block, "blockIdx.y")
    sch.bind(o_thread, "threadIdx.y")
    sch.bind(pixel_thread, "threadIdx.x")

    to_shared = sch.cache_write(conv, 0, "local")  # conv now accumulates in registers; to_shared copies out
    sch.set_scope(to_shared, 0, "shared")
    sch.reverse_compute_at(to_shared, pixel_thread)
    for consumer in (out, center, stats):
        sch.reverse_compute_at(consumer, o_block)
    sch.set_scope(center, 0, "shared")
    _stage_in_shared(sch, conv, rc_step, tile)
    _bind_block_threads(sch, out, tile)
    _bind_block_threads(sch, center, tile)
    _reduce_across_threads(sch, stats, tile)
    sch.decompose_reduction(conv, rc_step)
    return sch


def _stage_in_shared(sch: s_tir.Schedule, conv, rc_step, tile: GpuTile) -> None:
    """The padded input window and the weights of one reduction step, loaded by every thread together."""
    pad = sch.get_sblock("pad")
    for buffer_index in (0, 1):  # conv reads pad, then weight
        staged = sch.cache_read(conv, buffer_index, "shared")
        sch.compute_at(staged, rc_step)
        fused = sch.fuse(*loops_below(sch, staged, rc_step))
        _, ty, tx = sch.split(fused, [None, tile.channel_threads, tile.pixel_threads])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    sch.compute_inline(pad)  # the zero border computed as the window is loaded


def _bind_block_threads(sch: s_tir.Schedule, block, tile: GpuTile) -> None:
    fused = sch.fuse(*sch.get_loops(block)[2:])  # below the block loops: channel, row, column of the tile
    _, ty, tx = sch.split(fused, [None, tile.channel_threads, tile.pixel_threads])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _reduce_across_threads(sch: s_tir.Schedule, stats, tile: GpuTile) -> None:
    """Each channel's tile sums: the tile's pixels split over threadIdx.x (a warp-shuffle allreduce), the
    channels over threadIdx.y."""
    channel, rh, rw = sch.get_loops(stats)[-3:]
    serial, ty = sch.split(channel, [None, tile.channel_threads])
    pixels = sch.fuse(rh, rw)
    _, tx = sch.split(pixels, [None, tile.pixel_threads])
    sch.reorder(ty, serial)
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def schedule_stats_combine(func: tirx.PrimFunc) -> s_tir.Schedule:
    """One thread block per channel, its threads splitting the (image, tile) sums (cross-thread reduction)."""
    threads = int(func.attrs[COMBINE_ATTR])
    sch = s_tir.Schedule(func)
    total = sch.get_sblock("total")
    channel, *tiles = sch.get_loops(total)
    for name in ("mean", "var"):
        sch.reverse_compute_at(sch.get_sblock(name), channel)
    pivot = sch.get_sblock("pivot")
    sch.compute_at(pivot, channel)  # every thread computes the channel's K once, in a register
    sch.set_scope(pivot, 0, "local")
    for output in (0, 1):  # the allreduce leaves both sums in every thread's registers
        sch.set_scope(total, output, "local")
    _, tx = sch.split(sch.fuse(*tiles), [None, threads])
    sch.bind(channel, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch


class ConvStatisticsSchedule(GPUScheduleRule):
    """dlight rule: schedules the conv + statistics and the combine kernels fuse_statistics.py emits (and
    nothing else)."""

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or func.attrs is None:
            return None
        if TILE_ATTR in func.attrs:
            return schedule_conv_stats(func)
        if COMBINE_ATTR in func.attrs:
            return schedule_stats_combine(func)
        return None
