"""Direct NCHW conv2d with weights pre-packed as (O/ob, KH, KW, I, ob), scheduled for AVX-512.

The micro-kernel keeps a tile of `ow_block` output columns x `oc_block` output channels in vector
registers (oc vectorised 16 lanes per zmm, ow unrolled), and runs the whole reduction (ic, kh, kw)
over it: per step one weight vector load per 16 channels and one broadcast input load per column.
Bias and ReLU run on the tile before it leaves registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir, te, tirx

VECTOR_LANES = 16  # fp32 lanes per AVX-512 register
ACCUMULATOR_BUDGET = 28  # of 32 zmm registers; the rest hold weights and broadcasts
SCHEDULED_ATTR = "bndeploy.scheduled"
OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque: FuseOps must not merge a scheduled kernel


def mark_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attrs({SCHEDULED_ATTR: True, "op_pattern": OPAQUE_PATTERN})


@dataclass(frozen=True)
class ConvSpec:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_height(self) -> int:
        span = (self.kernel[0] - 1) * self.dilation[0] + 1
        return (self.height + self.padding[0] + self.padding[2] - span) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        span = (self.kernel[1] - 1) * self.dilation[1] + 1
        return (self.width + self.padding[1] + self.padding[3] - span) // self.strides[1] + 1

    @property
    def flops(self) -> int:
        kh, kw = self.kernel
        return 2 * self.batch * self.out_channels * self.out_height * self.out_width * self.in_channels * kh * kw


@dataclass(frozen=True)
class Tiling:
    oc_block: int
    ow_block: int

    @property
    def accumulators(self) -> int:
        return self.ow_block * self.oc_block // VECTOR_LANES

    @property
    def loads_per_step(self) -> int:
        """Weight vector loads plus input broadcasts per reduction step of the tile."""
        return self.oc_block // VECTOR_LANES + self.ow_block


def choose_tiling(spec: ConvSpec) -> Tiling | None:
    """Largest register tile that fits the accumulator budget, then the fewest loads per FMA, then
    the least wasted (padded) output columns. 64x7 (11 loads per 28 FMAs) against 32x14 (16 loads),
    kernel time / ONNX Runtime per interleaved round, 2 threads: (1,64,56) 0.97-1.02x vs 1.13-1.37x,
    (1,256,14) 1.01-1.04x vs 1.01-1.47x, (8,128,28) 1.00-1.07x vs 1.08-1.14x."""
    best, best_key = None, None
    for oc_block in (64, 32, 16):
        if spec.out_channels % oc_block:
            continue
        max_ow = ACCUMULATOR_BUDGET * VECTOR_LANES // oc_block
        for ow_block in range(1, min(max_ow, spec.out_width) + 1):
            padded = -(-spec.out_width // ow_block) * ow_block
            useful = spec.out_width / padded
            tiling = Tiling(oc_block, ow_block)
            key = (tiling.accumulators * useful, -tiling.loads_per_step / tiling.accumulators, -padded)
            if best_key is None or key > best_key:
                best, best_key = tiling, key
    return best


def pack_weight(weight: np.ndarray, oc_block: int) -> np.ndarray:
    """OIHW -> (O/ob, KH, KW, I, ob): one contiguous oc vector per (kh, kw, ic), read in that order."""
    o, i, kh, kw = weight.shape
    return np.ascontiguousarray(weight.reshape(o // oc_block, oc_block, i, kh, kw).transpose(0, 3, 4, 2, 1))


def conv2d_compute(spec: ConvSpec, tiling: Tiling, has_bias: bool, relu: bool):
    """TE definition; the output width is computed padded up to whole tiles, then cropped."""
    n, c, h, w = spec.batch, spec.in_channels, spec.height, spec.width
    kh, kw = spec.kernel
    (sh, sw), (dh, dw) = spec.strides, spec.dilation
    pt, pl, pb, pr = spec.padding
    oh, ow = spec.out_height, spec.out_width
    ow_padded = -(-ow // tiling.ow_block) * tiling.ow_block
    # Extra right padding so the padded tile columns read defined (zero) input.
    extra_right = max(0, (ow_padded - 1) * sw + (kw - 1) * dw + 1 - (w + pl + pr))
    ob = tiling.oc_block

    data = te.placeholder((n, c, h, w), "float32", name="data")
    weight = te.placeholder((spec.out_channels // ob, kh, kw, c, ob), "float32", name="weight_packed")
    inputs = [data, weight]
    padded_h, padded_w = h + pt + pb, w + pl + pr + extra_right
    # The padding copy also transposes to channels-last, so the innermost reduction loop (ic) reads
    # consecutive floats instead of one float per channel plane.
    data_pad = te.compute(
        (n, padded_h, padded_w, c),
        lambda i, y, x, j: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w), data[i, j, y - pt, x - pl], tirx.const(0.0, "float32")
        ),
        name="pad",
    )
    ric = te.reduce_axis((0, c), name="ric")
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    # Channels-last accumulator so a tile's oc vector is contiguous (it lives in registers).
    conv = te.compute(
        (n, oh, ow_padded, spec.out_channels),
        lambda i, y, x, o: te.sum(
            data_pad[i, y * sh + rkh * dh, x * sw + rkw * dw, ric] * weight[o // ob, rkh, rkw, ric, o % ob],
            axis=[ric, rkh, rkw],
        ),
        name="conv",
    )
    if has_bias:
        bias = te.placeholder((spec.out_channels,), "float32", name="bias")
        inputs.append(bias)

    def epilogue(i, o, y, x):
        value = conv[i, y, x, o]
        if has_bias:
            value = value + bias[o]
        if relu:
            value = tirx.max(value, tirx.const(0.0, "float32"))
        return value

    out = te.compute((n, spec.out_channels, oh, ow), epilogue, name="out")
    return te.create_prim_func(inputs + [out])


def schedule_conv2d(func: tirx.PrimFunc, spec: ConvSpec, tiling: Tiling) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    n, oh, ow, oc, ric, rkh, rkw = sch.get_loops(conv)
    oc_o, oc_i = sch.split(oc, [None, tiling.oc_block])
    ow_o, ow_i = sch.split(ow, [None, tiling.ow_block])
    # ic innermost of the reduction: a long loop LLVM will not unroll into the tile (kw would be, and
    # then it shares broadcasts across kw steps and spills the accumulators).
    sch.reorder(n, oc_o, oh, ow_o, rkh, rkw, ric, ow_i, oc_i)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, ow_o)
    sch.set_scope(conv, 0, "local")
    outer = sch.fuse(n, oc_o, oh)
    sch.parallel(outer)
    sch.unroll(ow_i)
    sch.vectorize(oc_i)
    _schedule_epilogue(sch, out)
    _schedule_pad(sch)
    init = sch.decompose_reduction(conv, rkh)
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.unroll(init_loops[-2])
    return mark_scheduled(sch.mod["main"])


def _schedule_epilogue(sch: s_tir.Schedule, out) -> None:
    loops = sch.get_loops(out)
    sch.unroll(loops[-2])  # oc of the tile
    sch.unroll(loops[-1])


def _schedule_pad(sch: s_tir.Schedule) -> None:
    pad = sch.get_sblock("pad")
    n, y, x, c = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))


def build_conv2d_primfunc(spec: ConvSpec, tiling: Tiling, has_bias: bool, relu: bool) -> tirx.PrimFunc:
    return schedule_conv2d(conv2d_compute(spec, tiling, has_bias, relu), spec, tiling)
