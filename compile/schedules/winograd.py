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
    """PrimFunc(data NHWC, U packed, w packed for the fallback) -> out NHWC; unscheduled, for FuseOps to extend."""
    return (te.create_prim_func(list(_winograd_tensors(spec, tiling)))
            .with_attr("op_pattern", OUT_EWISE_FUSABLE))


def _winograd_tensors(spec: ConvSpec, tiling: Tiling):
    """(data, U, fallback weight, out)."""
    n, c, k = spec.batch, spec.in_channels, spec.out_channels
    rows, cols = tile_grid(spec)
    tiles = n * rows * cols
    zero = tirx.const(0.0, "float32")
    data = te.placeholder(_i64(n, spec.height, spec.width, c), "float32", name="data")
    pad = _bordered(spec, data, rows * TILE + 2, cols * TILE + 2, "pad")

    def tile_origin(t):
        image, rest = t // _int64(rows * cols), t % _int64(rows * cols)
        return image, rest // _int64(cols) * TILE, rest % _int64(cols) * TILE

    def input_rows(t, a, x, j):
        image, y0, x0 = tile_origin(t)
        return _combination(B_T, a, lambda r: pad[image, y0 + r, x0 + x, j])

    rows_done = te.compute(_i64(tiles, ALPHA, ALPHA, c), input_rows, name="winograd_input_rows")
    transformed = te.compute(_i64(ALPHA, ALPHA, tiles, c),
                             lambda a, b, t, j: _combination(B_T, b, lambda x: rows_done[t, a, x, j]),
                             name="winograd_input")

    cb = tiling.channel_block
    weight = te.placeholder(_i64(ALPHA, ALPHA, channel_blocks(spec, tiling), c, cb), "float32", name="weight_packed")
    rc = te.reduce_axis(_i64(0, c), name="rc")
    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    last = _int64(tiles - 1)
    products = te.compute(
        _i64(ALPHA, ALPHA, _ceil_to(tiles, tiling.pixel_block), padded_channels(spec, tiling)),
        lambda a, b, t, o: te.sum(transformed[a, b, tirx.min(t, last), rc] * weight[a, b, o // _int64(cb), rc, o % _int64(cb)],
                                  axis=rc),
        name="conv", attrs=attrs)
    output_cols = te.compute(_i64(tiles, ALPHA, TILE, k),
                             lambda t, a, x, o: _combination(A_T, x, lambda b: products[a, b, t, o]),
                             name="winograd_output_cols")

    direct_weight = te.placeholder(_i64(1, 3, 3, c, k), "float32", name="weight_direct")
    # the fallback covers whole tiles (no reads to clamp), its rows in whole register tiles
    fallback_width = _ceil_to(cols * TILE, tiling.pixel_block)
    fallback_pad = _bordered(spec, data, rows * TILE + 2, fallback_width + 2, "winograd_fallback_pad")
    fallback = _fallback(spec, tiling, fallback_pad, direct_weight)
    flag = _guard_flag(spec, data)

    def tile_values(i, ty, tx, py, px, o):
        """Output pixel (py, px) of tile (ty, tx), channel o."""
        t = i * _int64(rows * cols) + ty * _int64(cols) + tx
        winograd = _combination(A_T, py, lambda a: output_cols[t, a, px, o])
        return tirx.if_then_else(flag[0] > zero, fallback[i, ty * TILE + py, tx * TILE + px, o], winograd)

    values = te.compute(_i64(n, rows, cols, TILE, TILE, k), tile_values, name="winograd_values")
    out = te.compute(_i64(*spec.output_shape),
                     lambda i, y, x, o: values[i, y // TILE, x // TILE, y % TILE, x % TILE, o], name="conv_out")
    return data, weight, direct_weight, out


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
    `writer`); returns the function with the fallback nest run only when the guard is raised. `chunks`: the
    statistics kernel's parallel chunks of tiles per image, each summing its tiles' outputs."""
    from .conv_schedule import register_tile
    from .conv_stats import accumulate_in_tile

    lanes = tiling.vector_lanes
    if pad is not None:
        sch.compute_inline(pad)
    _schedule_guard(sch)
    fallback_loops = _schedule_fallback(sch, tiling)
    _schedule_input_transform(sch, lanes)
    write_back = sch.cache_write(gemm, 0, "local")
    a, b, t, o, rc = sch.get_loops(gemm)
    t_outer, t_inner = sch.split(t, [None, tiling.pixel_block])
    o_outer, o_inner = sch.split(o, [None, tiling.channel_block])
    outer = [a, b, t_outer, o_outer] if tiling.pixels_outer else [a, b, o_outer, t_outer]
    sch.reorder(*outer, rc, t_inner, o_inner)
    register_tile(sch, gemm, write_back, outer, [rc], t_inner, o_inner, tiling)
    tile = _schedule_output_transform(sch, writer, lanes, chunks)
    if chunks:
        accumulate_in_tile(sch, sch.get_sblock("stats"), tile, tiling)
    flag = sch.get(sch.get_sblock("winograd_guard")).writes[0].source
    return _only_when_raised(sch.mod["main"], [sch.get(loop) for loop in fallback_loops], flag)


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


def _schedule_input_transform(sch: s_tir.Schedule, lanes: int) -> None:
    """Per tile (in parallel) and vector of input channels: the 4x4 tile's rows pass in registers, then
    its 16 transformed vectors written."""
    rows_done, transformed = sch.get_sblock("winograd_input_rows"), sch.get_sblock("winograd_input")
    a, b, t, j = sch.get_loops(transformed)
    j_outer, j_inner = sch.split(j, [None, guard_lanes(int(sch.get(j).extent)) if lanes > 1 else 1])
    sch.reorder(t, j_outer, a, b, j_inner)
    sch.parallel(t)
    _first_pass_in_registers(sch, rows_done, j_outer)
    _unroll_tile_vectorise_lanes(sch, a, b, j_inner)


def _first_pass_in_registers(sch: s_tir.Schedule, block, loop) -> None:
    """A transform's first pass computed under `loop` into registers: (tile row, tile column, lanes)."""
    sch.compute_at(block, loop)
    sch.set_scope(block, 0, "local")
    _unroll_tile_vectorise_lanes(sch, *sch.get_loops(block)[-3:])


def _unroll_tile_vectorise_lanes(sch: s_tir.Schedule, rows, columns, lanes) -> None:
    sch.unroll(rows)
    sch.unroll(columns)
    sch.vectorize(lanes)


def _schedule_output_transform(sch: s_tir.Schedule, writer, lanes: int, chunks: int = 0):
    """Per tile (in parallel, or in `chunks` parallel bands of tile rows per image, each band's channels in
    `channel_groups` parallel groups): per vector of output channels the columns pass in registers and the
    tile's 4 values, then the 2x2 outputs written through the epilogue. Returns the loop over tiles (where
    the statistics kernel adds each tile to its sums)."""
    values = sch.get_sblock("winograd_values")
    i, ty, tx, pixel_y, pixel_x, channel = sch.get_loops(values)
    if chunks:
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
    return tile


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


def statistics_chunks(spec: ConvSpec) -> int:
    """Bands of tile rows per image, each with its own partial sums: as many as give PARALLEL_TASKS tasks
    with the images, a divisor of the tile rows (so no band runs past the image)."""
    from .conv_stats import PARALLEL_TASKS

    rows, _ = tile_grid(spec)
    wanted = max(1, -(-PARALLEL_TASKS // spec.batch))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= wanted)


def build_winograd_stats_primfunc(spec: ConvSpec, tiling: Tiling, chunks: int) -> tirx.PrimFunc:
    """PrimFunc(data, U, fallback weight, shift (O,) f32) -> (out NHWC, s1 and s2 (N, chunks, O) f64), scheduled."""
    from .bn_stats import shifted_sums
    from .conv_schedule import conv_block
    from .conv_stats import block_or_none
    from .generic import mark_scheduled

    data, weight, direct_weight, out = _winograd_tensors(spec, tiling)
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
