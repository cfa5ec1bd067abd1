"""Schedules a fused PrimFunc holding one of bndeploy's conv kernels (conv2d.py) and its epilogue.

After FuseOps/FuseTIR the function is: [producers] -> [pad] -> conv (annotated with its tiling) ->
conv_out -> [elementwise epilogue blocks] -> output. The schedule:
- inlines every producer into the padding copy (or into the conv when it has none) and every
  epilogue block into the last one, which then writes the function output straight from registers;
- tiles the conv's (pixel, channel) space into register tiles, reduction (kh, kw, ic) outside the tile,
  accumulators in a local buffer (registers), pixels unrolled, channels vectorised;
- parallelises the tile loops; vectorises the padding copy and the accumulator initialisation.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .conv2d import CONV_BLOCK_ATTR, DEPTHWISE, Tiling


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
    writer, pad = _inline_around(sch, conv)
    if tiling.kind == DEPTHWISE:
        _tile_depthwise(sch, conv, writer, tiling)
    else:
        _flatten_pixels(sch, writer)
        _tile_direct(sch, conv, writer, tiling)
    if pad is not None:
        _schedule_pad(sch, pad)
    return sch.mod["main"]


def _inline_around(sch: s_tir.Schedule, conv):
    """Inline producers into the padding copy and the epilogue into the output writer; returns both."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    index = [sch.get(b).same_as(sch.get(conv)) for b in blocks].index(True)
    pad = blocks[names.index("pad")] if "pad" in names[:index] else None
    for block in blocks[:index]:
        if pad is None or not sch.get(block).same_as(sch.get(pad)):
            sch.compute_inline(block)
    for block in blocks[index + 1:-1]:
        sch.compute_inline(block)
    return blocks[-1], pad


def _flatten_pixels(sch: s_tir.Schedule, writer) -> None:
    """The writer iterates (n, oh, ow, c); make it (n, oh*ow, c), the conv's pixel axis."""
    iter_vars = sch.get(writer).iter_vars
    if len(iter_vars) != 4:
        raise NotAConvKernel(f"the output writer has {len(iter_vars)} axes, expected 4 (NHWC)")
    width = iter_vars[2].dom.extent
    sch.transform_block_layout(writer, lambda n, y, x, c: (n, y * width + x, c))


def _tile_direct(sch: s_tir.Schedule, conv, writer, tiling: Tiling) -> None:
    n, p, o, *reduction = sch.get_loops(conv)
    p_outer, p_inner = sch.split(p, [None, tiling.pixel_block])
    o_outer, o_inner = sch.split(o, [None, tiling.channel_block])
    sch.reorder(n, o_outer, p_outer, *reduction, p_inner, o_inner)
    _register_tile(sch, conv, writer, [n, o_outer, p_outer], reduction, p_inner, o_inner, tiling)


def _tile_depthwise(sch: s_tir.Schedule, conv, writer, tiling: Tiling) -> None:
    # Pixels outer, channels inner: each tile reads all channels of its pixels, contiguous in NHWC.
    n, y, x, c, *reduction = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, tiling.pixel_block])
    c_outer, c_inner = sch.split(c, [None, tiling.channel_block])
    sch.reorder(n, y, x_outer, c_outer, *reduction, x_inner, c_inner)
    _register_tile(sch, conv, writer, [n, y, x_outer, c_outer], reduction, x_inner, c_inner, tiling)


def _register_tile(sch: s_tir.Schedule, conv, writer, outer, reduction, pixels, channels, tiling: Tiling) -> None:
    """Accumulators of one tile in registers over the whole reduction, written by the epilogue."""
    sch.reverse_compute_at(writer, outer[-1])
    sch.set_scope(conv, 0, "local")
    sch.parallel(sch.fuse(*outer))
    sch.unroll(pixels)
    sch.vectorize(channels)
    _schedule_writer(sch, writer, tiling)
    init = sch.decompose_reduction(conv, reduction[0])
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.unroll(init_loops[-2])


def _schedule_writer(sch: s_tir.Schedule, writer, tiling: Tiling) -> None:
    pixel, channel = sch.get_loops(writer)[-2:]
    sch.unroll(pixel)
    extent = sch.get(channel).extent
    if isinstance(extent, tirx.IntImm) and int(extent) == tiling.channel_block:
        sch.vectorize(channel)


def _schedule_pad(sch: s_tir.Schedule, pad) -> None:
    n, y, x, c = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))
    extent = int(sch.get(c).extent)
    lanes = next((v for v in (16, 8, 4) if extent % v == 0), None)
    if lanes is not None:
        _, inner = sch.split(c, [None, lanes])
        sch.vectorize(inner)
