"""Relax rewrite for CUDA: a train-mode BatchNorm's batch statistics summed in the conv before it.

Pattern: mean(x) and variance(x) (or mean((x - mean(x))^2)) over (N, H, W) of x = conv2d(data, W) [+ b],
an NCHW conv with constant weights (conv_stats.supports). Rewrite: the conv becomes the conv + statistics
kernel and the combine kernel (conv_stats.py), and the mean and variance their outputs; what used x (the
normalisation) still reads the conv's output, once, as one elementwise kernel TVM fuses.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..passes import bindings
from ..schedules.relax_rewrite import (KernelTable, bound_values, conv_ordinal, conv_spec, conv_stats_source,
                                       rewrite_functions, statistic_index)
from .conv_stats import TileGrid, conv2d_stats_compute, gpu_tile, pack_gpu_weight, stats_combine_compute, supports

LAYOUT = "NCHW"  # the CUDA pipeline keeps ONNX's layout


@mutator
class _FuseStatistics(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self._kernels = KernelTable(self.builder_)
        self._stats: list[tuple[relax.Expr, relax.Expr]] = []  # (x, (mean, variance) of x)
        self.statistics_fused: list[int] = []  # ordinals of the convs that sum statistics in their epilogue

    def rewrite(self, func: relax.Function) -> relax.Function:
        self._value_of = bound_values(func)
        self._ordinal = conv_ordinal(func)
        self._wanted = [source for binding in bindings(func)
                        if (source := conv_stats_source(binding.value, self._value_of, LAYOUT)) is not None
                        and supports(conv_spec(source.conv, LAYOUT))]
        return self.visit_expr(func)

    def visit_call_(self, call: relax.Call):
        wanted = next((s for s in self._wanted if s.conv.same_as(call)), None)
        if wanted is not None:
            return self._conv_with_statistics(call, wanted)
        replaced = self._statistic(call)
        return replaced if replaced is not None else super().visit_call_(call)

    def _conv_with_statistics(self, call: relax.Call, wanted) -> relax.Expr:
        spec = conv_spec(call, LAYOUT)
        tile = gpu_tile(spec)
        grid = TileGrid(spec, tile)
        self.statistics_fused.append(self._ordinal(call))
        conv_gv = self._kernels.add(("conv_stats", spec, tile), lambda: conv2d_stats_compute(spec, tile),
                                    "bndeploy_cuda_conv2d_stats")
        combine_gv = self._kernels.add(("combine", spec, tile), lambda: stats_combine_compute(spec, tile),
                                       "bndeploy_cuda_batch_stats_combine")
        weight = relax.const(pack_gpu_weight(call.args[1].value.numpy(), grid))
        sums = relax.TensorType(grid.sums_shape(), "float32")
        conv = self.builder_.emit(relax.call_tir(
            conv_gv, [self.visit_expr(call.args[0]), weight],
            [relax.TensorType(grid.output_shape(), "float32"), sums, sums]))
        out = self.builder_.emit(relax.TupleGetItem(conv, 0))
        bias = wanted.bias if wanted.bias is not None else np.zeros(spec.out_channels, "float32")
        channel = relax.TensorType((spec.out_channels,), "float32")
        stats = self.builder_.emit(relax.call_tir(
            combine_gv, [out, relax.TupleGetItem(conv, 1), relax.TupleGetItem(conv, 2), relax.const(bias)],
            [channel, channel]))
        self._stats.append((wanted.x, stats))
        return out

    def _statistic(self, call: relax.Call) -> relax.Expr | None:
        """mean(x) or variance(x) of an x whose conv sums its statistics: the combine kernel's output."""
        source = conv_stats_source(call, self._value_of, LAYOUT)
        x = source.x if source is not None else None
        stats = next((stats for seen, stats in self._stats if x is not None and seen.same_as(x)), None)
        if stats is None:
            return None
        return relax.op.reshape(relax.TupleGetItem(stats, statistic_index(call, x)), call.ty.shape)


@tvm.transform.module_pass(opt_level=0, name="bndeploy.FuseConvStatisticsCUDA")
def fuse_conv_statistics(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
    """The rewrite above on every Relax function; the fused convs' ordinals go to the module's
    STATISTICS_FUSED_ATTR, as the CPU rewrite records them."""
    return rewrite_functions(mod, _FuseStatistics)

