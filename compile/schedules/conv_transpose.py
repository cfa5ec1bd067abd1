"""A transposed convolution as a GEMM and a col2im gather, in channels-last.

conv_transpose(x, W) with x (N, H, W, C) and W (C, O, KH, KW) (ONNX's IOHW, one group): every input pixel
spreads C -> KH*KW*O values, so

    cols = x.reshape(N*H*W, C) @ W.transpose(0, 2, 3, 1).reshape(C, KH*KW*O)     (bndeploy's dense kernel)
    y[n, oy, ox, o] = sum of cols[pixel (iy, ix), tap (ky, kx), o]
                      over the taps with oy = iy*sh + ky*dh - pad_top and ox = ix*sw + kx*dw - pad_left.

The GEMM does exactly the useful multiply-adds (no zeros inserted between input pixels, as a direct conv on
the upsampled input would compute), at the dense kernel's register-tile rate; the gather reads each column
value once and writes each output once, channels contiguous. Its sum is written out tap by tap (no
reduction axis), so TVM fuses the following bias, activation and folded BatchNorm into its kernel; the
gather is computed once into its own buffer (MATERIALIZE_ATTR) and the epilogue reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from .conv2d import ConvGeometry, _i64
from .generic import MATERIALIZE_ATTR


@dataclass(frozen=True)
class ConvTransposeSpec(ConvGeometry):
    """A one-group 2-D transposed convolution on NHWC data with IOHW weights (ONNX's ConvTranspose layout)."""

    output_padding: tuple[int, int] = (0, 0)  # extra rows and columns at the output's end

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilation
        pt, pl, pb, pr = self.padding
        oh = (self.height - 1) * sh - pt - pb + dh * (kh - 1) + 1 + self.output_padding[0]
        ow = (self.width - 1) * sw - pl - pr + dw * (kw - 1) + 1 + self.output_padding[1]
        return self.batch, oh, ow, self.out_channels

    @property
    def rows(self) -> int:
        return self.batch * self.height * self.width

    @property
    def columns(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.out_channels


def gemm_weight(weight: np.ndarray) -> np.ndarray:
    """IOHW (C, O, KH, KW) -> (C, KH*KW*O): column (ky, kx, o) is what input channel c adds at tap (ky, kx)."""
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1))


def col2im_primfunc(spec: ConvTransposeSpec) -> tirx.PrimFunc:
    """PrimFunc(cols (rows, KH*KW*O), out (N, OH, OW, O))."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilation
    pt, pl = spec.padding[0], spec.padding[1]
    cols = te.placeholder(_i64(spec.rows, spec.columns), "float32", name="cols")
    channels = spec.out_channels

    def taps(position, kernel, stride, dilation, pad, extent):
        """[(tap, input index, whether output `position` receives that tap)] along one axis. Undilated,
        only the taps congruent to position + pad modulo the stride can land on it: ceil(kernel / stride)
        candidates (a 4x4 stride-2 kernel: 4 of 16), found by arithmetic instead of tested one by one."""
        offset = position + pad
        if dilation == 1:
            first = tirx.floormod(offset, stride)
            found = []
            for j in range(-(-kernel // stride)):
                tap = first + j * stride
                index = tirx.floordiv(offset - tap, stride)
                found.append((tap, index, tirx.all(tap < kernel, offset >= tap, index < extent)))
            return found
        found = []
        for tap in range(kernel):
            shifted = offset - tap * dilation
            index = tirx.floordiv(shifted, stride)
            found.append((tap, index, tirx.all(shifted >= 0, tirx.floormod(shifted, stride) == 0, index < extent)))
        return found

    def gather(n, oy, ox, o):
        total = tirx.const(0.0, "float32")
        for ky, iy, valid_y in taps(oy, kh, sh, dh, pt, spec.height):
            for kx, ix, valid_x in taps(ox, kw, sw, dw, pl, spec.width):
                row = (n * spec.height + iy) * spec.width + ix
                value = cols[row, (ky * kw + kx) * channels + o]
                total = total + tirx.if_then_else(tirx.all(valid_y, valid_x), value, tirx.const(0.0, "float32"))
        return total

    out = te.compute(_i64(*spec.output_shape), gather, name="col2im", attrs={MATERIALIZE_ATTR: 1})
    return te.create_prim_func([cols, out])
