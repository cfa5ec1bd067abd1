"""Winograd F(2x2, 3x3) convolution for 3x3 stride-1 convs (NHWC), as fast as the direct kernel is not.

A 3x3 conv computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per (input, output)
channel pair instead of 36 (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
    Y = A^T [ (G w G^T) . (B^T d B) ] A
The kernel has three stages in one function, each parallel and vectorised over channels:
- input transform: V[a, b, tile, c] = (B^T d B)[a, b] for every 4x4 input tile;
- 16 GEMMs, one per (a, b): M[a, b, tile, k] = sum_c V[a, b, tile, c] * U[a, b, c, k], on the direct
  kernel's register tiles (tiles as its pixels, output channels in vectors); U = G w G^T is packed at
  compile time;
- output transform: per tile, the 2x2 values (A^T M A) in registers, then written through the conv's fused
  epilogue (bias, ReLU, residual add...); the train-mode variant also sums the batch statistics there.
Where the transformed weights U fit a core's L2 (`bands_pay`: up to 128 channels), the three stages run
band by band of tile rows, one parallel task per band, so V and M of a band (`BAND_BYTES`) pass through
that core's L2 instead of the shared L3 (which a noisy neighbour can take: such episodes once slowed the
whole-image kernel 2.4x); with wider channels each band would re-read all of U, so the stages stay whole.

Why F(2x2) and not F(4x4): F(4x4, 3x3) does 4x fewer multiplies but its transforms (entries up to 8)
lose digits: on 64-256 channels its error reached 1.3-2.1x the fp32 inference tolerance (atol 1e-5 + rtol
1e-4), where F(2x2)'s stayed at 0.1-0.15x, below the direct kernel's own 0.13-0.2x (measured against a
float64 reference; tests/test_winograd.py keeps this margin).

NaN and Inf go where the direct conv (and ONNX Runtime) puts them. F(2x2)'s transforms have entries 0 and
+-1, so a NaN input reaches exactly the outputs whose 3x3 window holds it; but an Inf input would meet its
own negation inside a transform (Inf - Inf = NaN where the direct conv gives +-Inf), and inputs near
float32's range could overflow in a transform. So the kernel first scans its input: when any value is
NaN, +-Inf or of magnitude above GUARD_LIMIT, the tile values are taken from a register-tiled direct
conv instead (its loop nests run only on such inputs). Weights are checked at compile time
(`weights_allow_winograd`): the bound makes every transformed value finite for guarded inputs.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from .conv2d import (CONV_BLOCK_ATTR, CONV_FLOPS_ATTR, DIRECT, OUT_EWISE_FUSABLE, ConvSpec, Tiling, _ceil_to, _i64,
                     _padded_input, channel_blocks, direct_tiling, pack_weight, padded_channels, pixels_outer)
from .isa import VectorISA

WINOGRAD = "winograd"
TILE = 2  # output pixels per tile side: F(2x2, 3x3)
ALPHA = TILE + 3 - 1  # input pixels per tile side
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)

# Inputs of a larger magnitude (or NaN, Inf) take the direct loop nest. With |x| <= 2^60 and the weight bound
# below, |V| <= 4 * 2^60, |M| <= C * 4 * 2^60 * max|U| and |y| <= 9 * max|M| stay under FINITE_BOUND.
GUARD_LIMIT = 2.0 ** 60
FINITE_BOUND = 1e37

# Where the GEMMs pay for the transforms (the kernel alone against the direct kernel, AMD EPYC Zen 4, 2 threads,
# AVX-512 / AVX2 code): 64 -> 64 channels on 56x56 0.73x / 0.77x, 128 on 28x28 0.52x / 0.58x (batch 8: 0.74x /
# 0.88x), 256 on 14x14 0.59x / 0.51x, 512 on 7x7 at batch 8 0.65x / 0.79x, 64 on 8x8 0.81x / 0.96x; but 32
# channels: 1.10-1.84x / 0.83-1.14x (each GEMM's reduction is too short to amortise its register tile).
MIN_CHANNELS = 64
MIN_TILES = 16  # 2x2 tiles per image: below this (an output under about 8x8) the transforms' share grows
# Transformed tiles (V and M) of one band: under a core's L2 on every x86 CPU bndeploy targets, so a band's
# three stages pass them through L2 rather than the shared L3.
BAND_BYTES = 512 * 1024
# Banding re-reads U per band. Measured (the kernel alone, banded against whole-image stages, AMD EPYC Zen 4,
# 2 threads, AVX-512 / AVX2 code): 64 channels on 56x56 (U 256 KiB) 0.94x / 0.94x, 128 on 28x28 at batch 8
# (U 1 MiB) 0.80x / 0.77x; 256 on 14x14 (U 4 MiB) 1.04x / 1.33x, at batch 8 1.33x / 1.53x.
MAX_BANDED_WEIGHT_BYTES = 1024 * 1024


def _int64(value: int):
    return tirx.IntImm("int64", value)


def winograd_applies(spec: ConvSpec, isa: VectorISA) -> bool:
    """A dense 3x3 stride-1 conv on NHWC data, wide enough for the GEMMs to pay, output channels in whole vectors."""
    return (spec.kernel == (3, 3) and spec.strides == (1, 1) and spec.dilation == (1, 1) and spec.groups == 1
            and spec.input_layout == "NHWC" and spec.in_channels >= MIN_CHANNELS
            and spec.out_channels >= MIN_CHANNELS and spec.out_channels % isa.lanes == 0
            and tiles_per_image(spec) >= MIN_TILES)


def tile_grid(spec: ConvSpec) -> tuple[int, int]:
    return -(-spec.out_height // TILE), -(-spec.out_width // TILE)


def tiles_per_image(spec: ConvSpec) -> int:
    rows, cols = tile_grid(spec)
    return rows * cols


def gemm_spec(spec: ConvSpec) -> ConvSpec:
    """One of the 16 GEMMs as the 1x1 conv the direct kernel's tile model rates: tiles are its pixels."""
    return ConvSpec(1, 1, spec.batch * tiles_per_image(spec), spec.in_channels, spec.out_channels, (1, 1))


def winograd_tiling(spec: ConvSpec, isa: VectorISA) -> Tiling | None:
    if not winograd_applies(spec, isa):
        return None
    gemm = gemm_spec(spec)
    tiling = direct_tiling(gemm, isa)
    if tiling is None or spec.out_channels % tiling.channel_block:
        return None  # whole channel blocks: no padded channels to clamp in the fallback and the statistics
    return Tiling(WINOGRAD, tiling.pixel_block, tiling.channel_block, tiling.lanes,
                  pixels_outer(gemm, tiling.channel_block, tiling.pixel_block))


def transformed_weight(weight: np.ndarray) -> np.ndarray:
    """U = G w G^T per (output, input) channel pair: (ALPHA, ALPHA, I, O), in float64."""
    return np.einsum("ar,oirs,bs->abio", G, weight.astype(np.float64), G)


def weights_allow_winograd(weight: np.ndarray) -> bool:
    """Finite weights small enough that no transformed value of a guarded input can overflow."""
    if not np.all(np.isfinite(weight)):
        return False
    largest = float(np.abs(transformed_weight(weight)).max(initial=0.0))
    return 9 * weight.shape[1] * 4 * GUARD_LIMIT * largest < FINITE_BOUND


def fallback_tiling(spec: ConvSpec, tiling: Tiling) -> Tiling:
    """The direct layout of the fallback's weights: one block of every output channel, (1, KH, KW, I, O), so
    the train-mode shift kernel (conv_stats.shift_primfunc) reads the same constant."""
    return Tiling(DIRECT, 1, spec.out_channels, tiling.vector_lanes)


def pack_winograd_weight(weight: np.ndarray, spec: ConvSpec, tiling: Tiling) -> tuple[np.ndarray, np.ndarray]:
    """(U packed as (ALPHA, ALPHA, channel blocks, I, cb) for the GEMMs' register tiles, padded channels zero;
    w packed for the direct fallback, `fallback_tiling`)."""
    u = transformed_weight(weight)
    cb = tiling.channel_block
    padded = np.zeros(u.shape[:3] + (padded_channels(spec, tiling),))
    padded[..., :spec.out_channels] = u
    blocks = channel_blocks(spec, tiling)
    packed = padded.reshape(ALPHA, ALPHA, spec.in_channels, blocks, cb).transpose(0, 1, 3, 2, 4)
    direct = pack_weight(weight, spec, fallback_tiling(spec, tiling))
    return np.ascontiguousarray(packed, np.float32), direct


# --------------------------------------------------------------------------------------------------
# TE definition


def _combination(matrix: np.ndarray, row, term):
    """sum_k matrix[row][k] * term(k) for a row index that the schedule unrolls: one expression per row
    (zero entries skipped, +-1 without a multiply), chosen by Selects that fold once the row is constant."""
    per_row = []
    for coefficients in matrix:
        expr = None
        for k, coefficient in enumerate(coefficients):
            if coefficient == 0:
                continue
            value = term(k)
            if coefficient == -1:
                value = -value
            elif coefficient != 1:
                value = value * tirx.const(float(coefficient), "float32")
            expr = value if expr is None else expr + value
        per_row.append(expr)
    chosen = per_row[-1]
    for index in range(len(per_row) - 2, -1, -1):
        chosen = tirx.Select(row == index, per_row[index], chosen)
    return chosen


def guard_lanes(channels: int) -> int:
    return next(v for v in (16, 8, 4, 1) if channels % v == 0)


def winograd_compute(spec: ConvSpec, tiling: Tiling) -> tirx.PrimFunc:
    """PrimFunc(data NHWC, U packed, w packed for the fallback) -> out NHWC; unscheduled, for FuseOps to extend.
    Its stages run band by band (`band_rows`) where `bands_pay`."""
    return (te.create_prim_func(list(_winograd_tensors(spec, tiling, banded=bands_pay(spec, tiling))))
            .with_attr("op_pattern", OUT_EWISE_FUSABLE))


def bands_pay(spec: ConvSpec, tiling: Tiling) -> bool:
    """Every band reads all transformed weights U again: banding pays while U stays in a core's L2."""
    return ALPHA * ALPHA * spec.in_channels * padded_channels(spec, tiling) * 4 <= MAX_BANDED_WEIGHT_BYTES


def band_rows(spec: ConvSpec, tiling: Tiling) -> int:
    """Tile rows per band: the most (a divisor of the tile rows) whose transformed tiles fit BAND_BYTES."""
    rows, cols = tile_grid(spec)
    per_row = ALPHA * ALPHA * cols * (spec.in_channels + padded_channels(spec, tiling)) * 4
    return max((d for d in range(1, rows + 1) if rows % d == 0 and d * per_row <= BAND_BYTES), default=1)


def _winograd_tensors(spec: ConvSpec, tiling: Tiling, banded: bool = False):
    """(data, U, fallback weight, out). Banded: the input transform and the GEMMs index their tiles by
    (band task, tile in the band), so one parallel task can run all three stages of its band."""
    n, c, k = spec.batch, spec.in_channels, spec.out_channels
    rows, cols = tile_grid(spec)
    zero = tirx.const(0.0, "float32")
    data = te.placeholder(_i64(n, spec.height, spec.width, c), "float32", name="data")
    pad = _bordered(spec, data, rows * TILE + 2, cols * TILE + 2, "pad")
    cb = tiling.channel_block
    weight = te.placeholder(_i64(ALPHA, ALPHA, channel_blocks(spec, tiling), c, cb), "float32", name="weight_packed")
    stages = _banded_stages if banded else _image_stages
    tile_cols = stages(spec, tiling, pad, weight)

    direct_weight = te.placeholder(_i64(1, 3, 3, c, k), "float32", name="weight_direct")
    # the fallback covers whole tiles (no reads to clamp), its rows in whole register tiles
    fallback_width = _ceil_to(cols * TILE, tiling.pixel_block)
    fallback_pad = _bordered(spec, data, rows * TILE + 2, fallback_width + 2, "winograd_fallback_pad")
    fallback = _fallback(spec, tiling, fallback_pad, direct_weight)
    flag = _guard_flag(spec, data)

    def tile_values(i, ty, tx, py, px, o):
        """Output pixel (py, px) of tile (ty, tx), channel o."""
        winograd = _combination(A_T, py, lambda a: tile_cols(i, ty, tx, a, px, o))
        return tirx.if_then_else(flag[0] > zero, fallback[i, ty * TILE + py, tx * TILE + px, o], winograd)

    values = te.compute(_i64(n, rows, cols, TILE, TILE, k), tile_values, name="winograd_values")
    out = te.compute(_i64(*spec.output_shape),
                     lambda i, y, x, o: values[i, y // TILE, x // TILE, y % TILE, x % TILE, o], name="conv_out")
    return data, weight, direct_weight, out


def _gemm(transformed, weight, shape, spec: ConvSpec, tiling: Tiling):
    """M[..., a, b, t, o] = sum_c V[..., a, b, t, c] U[a, b, c, o]: the annotated conv block."""
    rc = te.reduce_axis(_i64(0, spec.in_channels), name="rc")
    cb = _int64(tiling.channel_block)
    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    return te.compute(
        _i64(*shape),
        lambda *index: te.sum(transformed[(*index[:-1], rc)] * weight[index[-4], index[-3], index[-1] // cb, rc,
                                                                       index[-1] % cb], axis=rc),
        name="conv", attrs=attrs)


def _image_stages(spec: ConvSpec, tiling: Tiling, pad, weight):
    """Stages over the whole batch (where banding does not pay): V[a, b, tile, c], M[a, b, tile, o], the
    tiles padded to whole register tiles (copies of the last tile); returns (i, ty, tx, a, x, o) -> the
    output transform's first pass."""
    rows, cols = tile_grid(spec)
    tiles = spec.batch * rows * cols

    def tile_origin(t):
        image, rest = t // _int64(rows * cols), t % _int64(rows * cols)
        return image, rest // _int64(cols) * TILE, rest % _int64(cols) * TILE

    def input_rows(t, a, x, j):
        image, y0, x0 = tile_origin(tirx.min(t, _int64(tiles - 1)))
        return _combination(B_T, a, lambda r: pad[image, y0 + r, x0 + x, j])

    padded_tiles = _ceil_to(tiles, tiling.pixel_block)
    rows_done = te.compute(_i64(padded_tiles, ALPHA, ALPHA, spec.in_channels), input_rows, name="winograd_input_rows")
    transformed = te.compute(_i64(ALPHA, ALPHA, padded_tiles, spec.in_channels),
                             lambda a, b, t, j: _combination(B_T, b, lambda x: rows_done[t, a, x, j]),
                             name="winograd_input")
    products = _gemm(transformed, weight, (ALPHA, ALPHA, padded_tiles, padded_channels(spec, tiling)), spec, tiling)
    output_cols = te.compute(_i64(tiles, ALPHA, TILE, spec.out_channels),
                             lambda t, a, x, o: _combination(A_T, x, lambda b: products[a, b, t, o]),
                             name="winograd_output_cols")
    return lambda i, ty, tx, a, x, o: output_cols[i * _int64(rows * cols) + ty * _int64(cols) + tx, a, x, o]


def _banded_stages(spec: ConvSpec, tiling: Tiling, pad, weight):
    """Stages per band task (image, band of `band_rows` tile rows): V[task, a, b, tile, c] and
    M[task, a, b, tile, o], a band's tiles padded to whole register tiles (copies of its last tile)."""
    rows, cols = tile_grid(spec)
    per_band = band_rows(spec, tiling)
    bands = rows // per_band
    band_tiles = per_band * cols
    padded = _ceil_to(band_tiles, tiling.pixel_block)
    tasks = spec.batch * bands

    def input_rows(task, tb, a, x, j):
        tb = tirx.min(tb, _int64(band_tiles - 1))
        image, ty = task // _int64(bands), task % _int64(bands) * _int64(per_band) + tb // _int64(cols)
        y0, x0 = ty * TILE, tb % _int64(cols) * TILE
        return _combination(B_T, a, lambda r: pad[image, y0 + r, x0 + x, j])

    c = spec.in_channels
    rows_done = te.compute(_i64(tasks, padded, ALPHA, ALPHA, c), input_rows, name="winograd_input_rows")
    transformed = te.compute(_i64(tasks, ALPHA, ALPHA, padded, c),
                             lambda task, a, b, tb, j: _combination(B_T, b, lambda x: rows_done[task, tb, a, x, j]),
                             name="winograd_input")
    products = _gemm(transformed, weight, (tasks, ALPHA, ALPHA, padded, padded_channels(spec, tiling)), spec, tiling)
    output_cols = te.compute(_i64(tasks, band_tiles, ALPHA, TILE, spec.out_channels),
                             lambda task, tb, a, x, o: _combination(A_T, x, lambda b: products[task, a, b, tb, o]),
                             name="winograd_output_cols")

    def first_pass(i, ty, tx, a, x, o):
        return output_cols[i * _int64(bands) + ty // _int64(per_band), ty % _int64(per_band) * _int64(cols) + tx, a, x, o]
    return first_pass


def _bordered(spec: ConvSpec, data, height: int, width: int, name: str):
    """The input with its zero border grown to `height` x `width` (zeros past the image's far edges too), or
    the input itself when it is exactly that size already."""
    padded_height = spec.height + spec.padding[0] + spec.padding[2]
    padded_width = spec.width + spec.padding[1] + spec.padding[3]
    return _padded_input(data, spec, extra_right=width - padded_width, extra_bottom=height - padded_height, name=name)


def _fallback(spec: ConvSpec, tiling: Tiling, fallback_pad, direct_weight):
    """The direct conv over a row-padded output (whole register tiles of pixels along each row), reading
    a zero-bordered copy of its own, for the writer to take when the guard is raised."""
    rkh, rkw = te.reduce_axis(_i64(0, 3), name="rkh"), te.reduce_axis(_i64(0, 3), name="rkw")
    ric = te.reduce_axis(_i64(0, spec.in_channels), name="ric")
    width = int(fallback_pad.shape[2]) - 2
    return te.compute(
        _i64(spec.batch, spec.out_height, width, spec.out_channels),
        lambda i, y, x, o: te.sum(fallback_pad[i, y + rkh, x + rkw, ric] * direct_weight[0, rkh, rkw, ric, o],
                                  axis=[rkh, rkw, ric]),
        name="winograd_fallback")


def _guard_flag(spec: ConvSpec, data):
    """(1,) > 0 when some input is NaN, +-Inf or beyond GUARD_LIMIT: per (image, row) a vector of lanes
    first (a parallel, vectorised scan), then one value."""
    lanes = guard_lanes(spec.in_channels)
    rx = te.reduce_axis(_i64(0, spec.width), name="rx")
    rv = te.reduce_axis(_i64(0, spec.in_channels // lanes), name="rv")
    limit, one, zero = (tirx.const(v, "float32") for v in (GUARD_LIMIT, 1.0, 0.0))

    def outside(i, y, lane):
        value = data[i, y, rx, rv * lanes + lane]
        return te.max(tirx.Select(tirx.abs(value) <= limit, zero, one), axis=[rx, rv])

    per_row = te.compute(_i64(spec.batch, spec.height, lanes), outside, name="winograd_guard_rows")
    ri, ry, rl = (te.reduce_axis(_i64(0, e), name=f"g{e}") for e in (spec.batch, spec.height, lanes))
    return te.compute(_i64(1), lambda _: te.max(per_row[ri, ry, rl], axis=[ri, ry, rl]), name="winograd_guard")


# --------------------------------------------------------------------------------------------------
# Schedule


def schedule_winograd(sch: s_tir.Schedule, gemm, tiling: Tiling, writer, pad, chunks: int = 0) -> tirx.PrimFunc:
    """Schedules the three stages (the conv's producers already inlined into `pad`, its epilogue into
    `writer`); returns the function with the fallback nest run only when the guard is raised. Banded stages
    run as one parallel loop over band tasks; otherwise each stage is a parallel loop of its own. `chunks`:
    the statistics kernel's parallel chunks of tiles per image, each summing its tiles' outputs."""
    from .conv_stats import accumulate_in_tile

    if pad is not None:
        sch.compute_inline(pad)
    _schedule_guard(sch)
    fallback_loops = _schedule_fallback(sch, tiling)
    banded = len(sch.get_loops(gemm)) == 6  # (task, a, b, tile, o, rc)
    input_task = _schedule_input_transform(sch, tiling.vector_lanes, banded)
    gemm_task, register_tiles = _split_gemm(sch, gemm, tiling, banded)
    output_task, tile = _schedule_output_transform(sch, writer, tiling.vector_lanes, chunks, banded)
    if banded:  # parallel before the GEMM's reduction is decomposed (a dataflow check needs its init)
        sch.parallel(sch.merge(input_task, gemm_task, output_task))
    register_tiles()
    if chunks:
        accumulate_in_tile(sch, sch.get_sblock("stats"), tile, tiling)
    flag = sch.get(sch.get_sblock("winograd_guard")).writes[0].source
    return _only_when_raised(sch.mod["main"], [sch.get(loop) for loop in fallback_loops], flag)


def _split_gemm(sch: s_tir.Schedule, gemm, tiling: Tiling, banded: bool):
    """The 16 GEMMs split into the direct kernel's register tiles; returns (their band-task loop, or None,
    and the step that puts the tiles in registers: parallel over the tile loops unless banded)."""
    from .conv_schedule import register_tile

    write_back = sch.cache_write(gemm, 0, "local")
    *task, a, b, t, o, rc = sch.get_loops(gemm)
    t_outer, t_inner = sch.split(t, [None, tiling.pixel_block])
    o_outer, o_inner = sch.split(o, [None, tiling.channel_block])
    outer = [a, b, t_outer, o_outer] if tiling.pixels_outer else [a, b, o_outer, t_outer]
    sch.reorder(*task, *outer, rc, t_inner, o_inner)
    if banded:  # before the merge: there, the write-back would be placed over every band's tiles
        sch.reverse_compute_at(write_back, outer[-1])

    def register_tiles():
        register_tile(sch, gemm, write_back, outer, [rc], t_inner, o_inner, tiling,
                      parallel_loops=-1 if banded else 0, writer_placed=banded)
    return (task[0] if banded else None), register_tiles


def _schedule_guard(sch: s_tir.Schedule) -> None:
    rows = sch.get_sblock("winograd_guard_rows")
    i, y, lane, rx, rv = sch.get_loops(rows)
    sch.reorder(i, y, rx, rv, lane)
    sch.parallel(sch.fuse(i, y))
    sch.vectorize(lane)
    init = sch.decompose_reduction(rows, rx)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_fallback(sch: s_tir.Schedule, tiling: Tiling):
    """Register tiles as the GEMMs' (pixels along a row by channel vectors), rows in parallel, reading its
    own zero-bordered copy of the input (when the input needs one); returns the outermost loops of the copy
    and the conv. Only run on guarded inputs, but a single accumulator chain per vector would leave it
    latency-bound (4 cycles per FMA), and it is the kernel's largest loop."""
    from .conv_schedule import register_tile, schedule_pad_copy
    from .conv_stats import block_or_none

    fallback = sch.get_sblock("winograd_fallback")
    write_back = sch.cache_write(fallback, 0, "local")
    i, y, x, o, *reduction = sch.get_loops(fallback)
    x_outer, x_inner = sch.split(x, [None, tiling.pixel_block])
    o_outer, o_inner = sch.split(o, [None, tiling.channel_block])
    task = sch.fuse(i, y)
    sch.reorder(task, x_outer, o_outer, *reduction, x_inner, o_inner)
    register_tile(sch, fallback, write_back, [task, x_outer, o_outer], reduction, x_inner, o_inner, tiling,
                  parallel_loops=1)
    copy = block_or_none(sch, "winograd_fallback_pad")
    if copy is None:
        return [task]
    schedule_pad_copy(sch, copy)
    return [sch.get_loops(copy)[0], task]


def _schedule_input_transform(sch: s_tir.Schedule, lanes: int, banded: bool):
    """Per tile and vector of input channels: the 4x4 tile's rows pass in registers, then its 16
    transformed vectors written; tiles in parallel, or band by band (returns the band-task loop)."""
    rows_done, transformed = sch.get_sblock("winograd_input_rows"), sch.get_sblock("winograd_input")
    *task, a, b, t, j = sch.get_loops(transformed)
    j_outer, j_inner = sch.split(j, [None, guard_lanes(int(sch.get(j).extent)) if lanes > 1 else 1])
    sch.reorder(*task, t, j_outer, a, b, j_inner)
    if not banded:
        sch.parallel(t)
    _first_pass_in_registers(sch, rows_done, j_outer)
    _unroll_tile_vectorise_lanes(sch, a, b, j_inner)
    return task[0] if banded else None


def _first_pass_in_registers(sch: s_tir.Schedule, block, loop) -> None:
    """A transform's first pass computed under `loop` into registers: (tile row, tile column, lanes)."""
    sch.compute_at(block, loop)
    sch.set_scope(block, 0, "local")
    _unroll_tile_vectorise_lanes(sch, *sch.get_loops(block)[-3:])


def _unroll_tile_vectorise_lanes(sch: s_tir.Schedule, rows, columns, lanes) -> None:
    sch.unroll(rows)
    sch.unroll(columns)
    sch.vectorize(lanes)


def _schedule_output_transform(sch: s_tir.Schedule, writer, lanes: int, chunks: int = 0, banded: bool = False):
    """Per tile (in parallel; banded: band by band; with `chunks`: in parallel bands of tile rows per image,
    each band's channels in `channel_groups` parallel groups): per vector of output channels the columns
    pass in registers and the tile's 4 values, then the 2x2 outputs written through the epilogue. Returns
    (the band-task loop or None, the loop over tiles, where the statistics kernel adds each tile to its sums)."""
    values = sch.get_sblock("winograd_values")
    i, ty, tx, pixel_y, pixel_x, channel = sch.get_loops(values)
    task = None
    if banded:
        per_band = int(sch.get(sch.get_sblock("winograd_output_cols")).writes[0].source.shape[1]) // int(sch.get(tx).extent)
        band, band_row = sch.split(ty, [None, per_band])
        task, tile = sch.fuse(i, band), sch.fuse(band_row, tx)
    elif chunks:
        chunk, band_row = sch.split(ty, [chunks, None])
        extent = int(sch.get(channel).extent)
        group, channel = sch.split(channel, [channel_groups(int(sch.get(i).extent), chunks, extent // lanes), None])
        sch.reorder(i, chunk, group, band_row, tx, pixel_y, pixel_x, channel)
        sch.parallel(sch.fuse(i, chunk, group))
        tile = sch.fuse(band_row, tx)
    else:
        tile = sch.fuse(i, ty, tx)
        sch.parallel(tile)
    vector, lane = sch.split(channel, [None, lanes])
    sch.reorder(vector, pixel_y, pixel_x, lane)
    _first_pass_in_registers(sch, sch.get_sblock("winograd_output_cols"), vector)
    _unroll_tile_vectorise_lanes(sch, pixel_y, pixel_x, lane)
    sch.set_scope(values, 0, "local")
    sch.reverse_compute_at(writer, tile)
    y, x, o = sch.get_loops(writer)[-3:]
    o_outer, o_inner = sch.split(o, [None, lanes])
    sch.reorder(o_outer, y, x, o_inner)
    _unroll_tile_vectorise_lanes(sch, y, x, o_inner)
    return task, tile


def _only_when_raised(func: tirx.PrimFunc, fallback_loops: list, flag) -> tirx.PrimFunc:
    """Wraps the fallback's loop nests in `if flag[0] > 0`: they cost nothing on ordinary inputs."""
    raised = tirx.BufferLoad(flag, [tirx.IntImm("int64", 0)]) > tirx.const(0.0, "float32")
    root = func.body.block
    body = root.body  # the root block's loop nests, the fallback's among them (it is not computed at another loop)
    nests = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    for loop in fallback_loops:
        position = [nest.same_as(loop) for nest in nests].index(True)
        nests[position] = tirx.IfThenElse(raised, loop, None)
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, tirx.SeqStmt(nests), root.init,
                         root.alloc_buffers, root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(func.body.iter_values, func.body.predicate, block))


# --------------------------------------------------------------------------------------------------
# Train mode: batch statistics summed as the output transform writes each tile (as conv_stats.py does for
# the direct kernel, with the same shift and float64 sums; its shift and combine kernels are used as they are)


def channel_groups(batch: int, chunks: int, vectors: int) -> int:
    """Groups of a band's output channel vectors run as parallel tasks of their own: the fewest that give
    PARALLEL_TASKS tasks with the images and bands (7 bands of a 14x14 output alone would leave one of two
    threads idle an eighth of the time)."""
    from .conv_stats import PARALLEL_TASKS

    divisors = [g for g in range(1, vectors + 1) if vectors % g == 0]
    return next((g for g in divisors if batch * chunks * g >= PARALLEL_TASKS), vectors)


def statistics_chunks(spec: ConvSpec, tiling: Tiling) -> int:
    """Bands of tile rows per image, each with its own partial sums: the kernel's bands where `bands_pay`;
    otherwise as many as give PARALLEL_TASKS tasks with the images, a divisor of the tile rows (so no band
    runs past the image)."""
    from .conv_stats import PARALLEL_TASKS

    rows, _ = tile_grid(spec)
    if bands_pay(spec, tiling):
        return rows // band_rows(spec, tiling)
    wanted = max(1, -(-PARALLEL_TASKS // spec.batch))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= wanted)


def build_winograd_stats_primfunc(spec: ConvSpec, tiling: Tiling) -> tirx.PrimFunc:
    """PrimFunc(data, U, fallback weight, shift (O,) f32) -> (out NHWC, s1 and s2 (N, chunks, O) f64), scheduled,
    with `statistics_chunks` chunks per image."""
    from .bn_stats import shifted_sums
    from .conv_schedule import conv_block
    from .conv_stats import block_or_none
    from .generic import mark_scheduled

    chunks = statistics_chunks(spec, tiling)
    data, weight, direct_weight, out = _winograd_tensors(spec, tiling, bands_pay(spec, tiling))
    values = out.op.input_tensors[0]
    shift = te.placeholder(_i64(spec.out_channels), "float32", name="shift")
    rows, cols = tile_grid(spec)
    band = rows // chunks
    rty, rtx = te.reduce_axis(_i64(0, band), name="rty"), te.reduce_axis(_i64(0, cols), name="rtx")
    rpy, rpx = te.reduce_axis(_i64(0, TILE), name="rpy"), te.reduce_axis(_i64(0, TILE), name="rpx")

    def chunk_sums(n, chunk, o):
        ty = chunk * _int64(band) + rty
        inside = tirx.all(ty * TILE + rpy < _int64(spec.out_height), rtx * TILE + rpx < _int64(spec.out_width))
        d = values[n, ty, rtx, rpy, rpx, o].astype("float64") - shift[o].astype("float64")
        d = tirx.Select(inside, d, tirx.const(0.0, "float64"))  # a tile's pixels past an odd-sized output
        return shifted_sums()((d, d * d), axis=[rty, rtx, rpy, rpx])

    s1, s2 = te.compute(_i64(spec.batch, chunks, spec.out_channels), chunk_sums, name="stats")
    sch = s_tir.Schedule(te.create_prim_func([data, weight, direct_weight, shift, out, s1, s2]))
    gemm, _ = conv_block(sch)
    pad = block_or_none(sch, "pad")
    return mark_scheduled(schedule_winograd(sch, gemm, tiling, sch.get_sblock("conv_out"), pad, chunks))
