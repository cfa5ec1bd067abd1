"""Relax-level rewrites that route conv2d chains and BN batch statistics to bndeploy's kernels."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..passes import bindings
from .bn_stats import BatchStatsSpec, build_batch_stats_primfunc
from .conv2d import (DEPTHWISE, DIRECT, INTERLEAVED, PAIRED, ConvSpec, Tiling, choose_tiling, conv2d_compute,
                     in_place_groups_per_vector, interleaved_input_positions, pack_weight, padded_channels)
from .conv_stats import build_conv2d_stats_primfunc, pixel_chunks, shift_primfunc, stats_combine_primfunc
from .conv_transpose import ConvTransposeSpec, col2im_primfunc, gemm_weight
from .isa import isa_for_target
from .winograd import (build_winograd_stats_primfunc, fallback_tiling, pack_winograd_weight, statistics_chunks,
                       weights_allow_winograd, winograd_compute, winograd_tiling)


def op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _static_shape(expr) -> tuple[int, ...] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None


def _dtype(expr) -> str | None:
    sinfo = expr.ty
    return sinfo.dtype if isinstance(sinfo, relax.TensorType) else None


class KernelTable:
    """The PrimFuncs a Relax rewrite adds to its module: one per key (equal convs share a kernel)."""

    def __init__(self, builder: relax.BlockBuilder):
        self._builder = builder
        self._added: dict[tuple, tvm.ir.GlobalVar] = {}

    def add(self, key: tuple, make_primfunc, name: str) -> tvm.ir.GlobalVar:
        if key not in self._added:
            # te.create_prim_func names every function "main"; the module assigns the symbol.
            self._added[key] = self._builder.add_func(make_primfunc().without_attr("global_symbol"), name)
        return self._added[key]


def bound_values(func: relax.Function):
    """expr -> the value a variable of `func` is bound to (one hop), else expr. Patterns are matched on the
    original bindings: rewritten ones are no longer in the builder."""
    var2val = relax.analysis.get_var2val(func)
    return lambda expr: var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr


def conv_ordinal(func: relax.Function):
    """conv2d call -> its position among `func`'s conv2d calls: the numbering STATISTICS_FUSED_ATTR records."""
    convs = [b.value for b in bindings(func) if op_name(b.value) == "relax.nn.conv2d"]
    return lambda call: next(k for k, conv in enumerate(convs) if conv.same_as(call))


@mutator
class _KernelRewriter(PyExprMutator):
    """Replaces each NHWC conv2d with constant weights by a call to bndeploy's conv kernel, and
    `variance(x)` / `mean(square(x - mean(x)))` over (N, H, W) by the one-pass statistics kernel, or, when
    x is a direct conv's output (plus a per-channel constant), by statistics summed in that conv's epilogue."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, winograd: bool = True):
        super().__init__(mod)
        self._isa = isa_for_target(target)
        self._winograd = winograd
        self._kernels = KernelTable(self.builder_)
        self._stats_calls: list[tuple[relax.Expr, relax.Var]] = []
        self._epilogue_stats: list[tuple[relax.Expr, relax.Expr]] = []  # (x, (mean, variance) from its conv)
        self.statistics_fused: list[int] = []  # ordinals of the convs that sum statistics in their epilogue

    def rewrite(self, func: relax.Function) -> relax.Function:
        self._value_of = bound_values(func)
        self._stats_wanted = [source for binding in bindings(func)
                              if (source := conv_stats_source(binding.value, self._value_of)) is not None]
        self._ordinal = conv_ordinal(func)
        return self.visit_expr(func)

    def visit_call_(self, call: relax.Call):
        replacement = None
        if op_name(call) == "relax.nn.conv2d":
            replacement = self._rewrite_conv(call)
        elif op_name(call) == "relax.matmul":
            replacement = self._rewrite_dense(call)
        elif op_name(call) == "relax.nn.conv2d_transpose":
            replacement = self._rewrite_conv_transpose(call)
        if replacement is None:
            replacement = self._rewrite_batch_stats(call)
        return replacement if replacement is not None else super().visit_call_(call)

    # conv2d --------------------------------------------------------------------------------------

    def _rewrite_conv(self, call: relax.Call):
        """An NHWC conv2d with constant OIHW weights -> bndeploy's kernel for its class, weights packed."""
        spec = conv_spec(call)
        if spec is None:
            return None
        weights = call.args[1].value.numpy()
        wanted = next((s for s in self._stats_wanted if s.conv.same_as(call)), None)
        winograd = winograd_tiling(spec, self._isa) if self._winograd else None
        if winograd is not None and weights_allow_winograd(weights):
            return self._winograd_conv(call, spec, winograd, weights, wanted)
        tiling = choose_tiling(spec, self._isa, batch_statistics=wanted is not None)
        if tiling is None:
            return None
        data = call.args[0]
        source = self._value_of(data)
        interleaved = _interleaved_source(source, spec, tiling, self._isa)
        if interleaved is not None:
            data, per_vector = interleaved
            spec = replace(spec, input_groups_interleaved=per_vector)
            tiling = choose_tiling(spec, self._isa)
        # A network's NCHW input: a direct conv's padding copy can transpose it on the way (one pass instead
        # of two). Not a depthwise conv's: it reads its input in place, and strided NCHW reads per tap were
        # 4-6x slower than transposing first.
        transposed = op_name(source) == "relax.permute_dims" and _is_nchw_to_nhwc(source)
        if spec.padded and transposed and tiling.kind not in (DEPTHWISE, PAIRED):
            data, spec = source.args[0], replace(spec, input_layout="NCHW")
        weight = relax.const(pack_weight(weights, spec, tiling))
        if wanted is not None and tiling.kind == DIRECT:
            chunks = pixel_chunks(spec, tiling)
            conv_gv = self._kernels.add(("conv2d_stats", spec, tiling), lambda: build_conv2d_stats_primfunc(spec, tiling, chunks),
                                        "bndeploy_conv2d_direct_stats")
            return self._conv_with_stats(call, self.visit_expr(data), [weight], weight, spec, tiling, conv_gv, chunks, wanted)
        gv = self._kernels.add(("conv2d", spec, tiling), lambda: conv2d_compute(spec, tiling),
                               f"bndeploy_conv2d_{'depthwise' if tiling.kind == DEPTHWISE else 'direct'}")
        return relax.call_tir(gv, [self.visit_expr(data), weight], relax.TensorType(spec.output_shape, "float32"))

    def _winograd_conv(self, call: relax.Call, spec: ConvSpec, tiling: Tiling, weights: np.ndarray,
                       wanted: "StatsSource | None") -> relax.Expr:
        transformed, direct = (relax.const(w) for w in pack_winograd_weight(weights, spec, tiling))
        data = self.visit_expr(call.args[0])
        if wanted is not None:
            chunks = statistics_chunks(spec, tiling)
            conv_gv = self._kernels.add(("winograd_stats", spec, tiling),
                                        lambda: build_winograd_stats_primfunc(spec, tiling),
                                        "bndeploy_conv2d_winograd_stats")
            # the fallback's weights are the direct layout the shift kernel reads
            return self._conv_with_stats(call, data, [transformed, direct], direct, spec,
                                         fallback_tiling(spec, tiling), conv_gv, chunks, wanted)
        gv = self._kernels.add(("conv2d", spec, tiling), lambda: winograd_compute(spec, tiling), "bndeploy_conv2d_winograd")
        return relax.call_tir(gv, [data, transformed, direct], relax.TensorType(spec.output_shape, "float32"))

    def _conv_with_stats(self, call: relax.Call, data: relax.Expr, weights: list[relax.Expr], shift_weight: relax.Expr,
                         spec: ConvSpec, tiling: Tiling, conv_gv: tvm.ir.GlobalVar, chunks: int,
                         wanted: "StatsSource") -> relax.Expr:
        """`conv_gv`, a conv kernel that also sums its output's batch statistics in `chunks` chunks per image
        (conv_stats.py, winograd.py), and the small kernels around it: the shift before (a direct conv of the
        first pixel, with `shift_weight` packed for `tiling`), the mean and variance after. Returns the conv's
        output."""
        self.statistics_fused.append(self._ordinal(call))
        shift_gv = self._kernels.add(("conv2d_shift", spec, tiling), lambda: shift_primfunc(spec, tiling), "bndeploy_batch_stats_shift")
        combine_gv = self._kernels.add(("stats_combine", spec, tiling, chunks),
                                       lambda: stats_combine_primfunc(spec, tiling, chunks), "bndeploy_batch_stats_combine")
        padded = padded_channels(spec, tiling)
        shift = self.builder_.emit(relax.call_tir(shift_gv, [data, shift_weight], relax.TensorType((padded,), "float32")))
        sums = relax.TensorType((spec.batch, chunks, padded), "float64")
        conv = self.builder_.emit(relax.call_tir(
            conv_gv, [data, *weights, shift], [relax.TensorType(spec.output_shape, "float32"), sums, sums]))
        channel = relax.TensorType((spec.out_channels,), "float32")
        # statistics of conv + b: the mean moves by b, the variance does not
        bias = relax.const(wanted.bias if wanted.bias is not None else np.zeros(spec.out_channels, "float32"))
        stats = self.builder_.emit(relax.call_tir(
            combine_gv, [shift, relax.TupleGetItem(conv, 1), relax.TupleGetItem(conv, 2), bias], [channel, channel]))
        self._epilogue_stats.append((wanted.x, stats))
        return relax.TupleGetItem(conv, 0)

    def _rewrite_dense(self, call: relax.Call):
        """matmul(x (rows, K), W const (K, M)) -> the direct conv kernel as a 1x1 conv over the rows, so a
        classifier (ONNX Gemm/MatMul) gets register tiles, packed weights and a fused bias epilogue."""
        x, weight = call.args
        shape = _static_shape(x)
        if shape is None or len(shape) != 2 or _dtype(x) != "float32" or not isinstance(weight, Constant):
            return None
        matrix = weight.value.numpy()
        if matrix.dtype != "float32" or matrix.ndim != 2 or matrix.shape[0] != shape[1]:
            return None
        return self._dense(self.visit_expr(x), shape[0], matrix)

    def _dense(self, x: relax.Expr, rows: int, matrix: np.ndarray):
        """x (rows, K) @ matrix (K, M) by bndeploy's dense kernel, or None when no tile fits the ISA."""
        spec = ConvSpec.dense(rows, matrix.shape[0], matrix.shape[1])
        tiling = choose_tiling(spec, self._isa)
        if tiling is None:
            return None
        gv = self._kernels.add(("dense", spec, tiling), lambda: conv2d_compute(spec, tiling), "bndeploy_dense")
        packed = pack_weight(np.ascontiguousarray(matrix.T).reshape(spec.out_channels, spec.in_channels, 1, 1), spec, tiling)
        return relax.call_tir(gv, [x, relax.const(packed)], relax.TensorType(spec.output_shape, "float32"))

    # conv2d_transpose ----------------------------------------------------------------------------

    def _rewrite_conv_transpose(self, call: relax.Call):
        """An NHWC, one-group conv2d_transpose with constant IOHW weights -> bndeploy's dense kernel (every
        input pixel times the weights of every tap) and a col2im gather (conv_transpose.py)."""
        spec = _conv_transpose_spec(call)
        if spec is None:
            return self._conv_transpose_in_nchw(call)
        flat = self.builder_.emit(relax.op.reshape(self.visit_expr(call.args[0]), (spec.rows, spec.in_channels)))
        cols = self._dense(flat, spec.rows, gemm_weight(call.args[1].value.numpy()))
        if cols is None:  # no register tile on this ISA (the reshape above is left to dead-code elimination)
            return self._conv_transpose_in_nchw(call)
        gv = self._kernels.add(("col2im", spec), lambda: col2im_primfunc(spec), "bndeploy_col2im")
        return relax.call_tir(gv, [self.builder_.emit(cols)], relax.TensorType(spec.output_shape, "float32"))

    def _conv_transpose_in_nchw(self, call: relax.Call):
        """TVM legalises conv2d_transpose only in NCHW: one bndeploy does not compute (groups, a dynamic
        shape) goes back to NCHW between two transposes."""
        attrs = call.attrs
        if attrs.data_layout != "NHWC":
            return None
        nchw = relax.op.permute_dims(self.visit_expr(call.args[0]), [0, 3, 1, 2])
        out = relax.op.nn.conv2d_transpose(
            self.builder_.emit(nchw), self.visit_expr(call.args[1]), strides=attrs.strides, padding=attrs.padding,
            output_padding=attrs.output_padding, dilation=attrs.dilation, groups=attrs.groups, data_layout="NCHW",
            kernel_layout=attrs.kernel_layout, out_layout="NCHW", out_dtype=attrs.out_dtype)
        return relax.op.permute_dims(self.builder_.emit(out), [0, 2, 3, 1])

    # batch statistics ----------------------------------------------------------------------------

    def _rewrite_batch_stats(self, call: relax.Call):
        """mean(x) and variance(x) / mean((x - mean(x))^2) over (N, H, W) of an NCHW or NHWC tensor: TVM would
        read x three times (mean, variance, then normalise); one kernel computes both in one pass."""
        x = stats_operand(call, self._value_of)
        if x is None:
            return None
        which = statistic_index(call, x)
        shape = _static_shape(x)
        axes = call.attrs.axis
        if shape is None or len(shape) != 4 or _dtype(x) != "float32" or axes is None:
            return None
        reduced = sorted(int(a) % 4 for a in axes)
        if reduced == [0, 2, 3]:  # NCHW
            spec, keepdims_shape = BatchStatsSpec(*shape), (1, shape[1], 1, 1)
        elif reduced == [0, 1, 2]:  # NHWC, as the channels-last pass leaves a train-mode BatchNorm
            n, h, w, c = shape
            spec, keepdims_shape = BatchStatsSpec(n, c, h, w, channels_last=True), (1, 1, 1, c)
        else:
            return None
        stats = self._batch_stats(x, spec)
        out_shape = keepdims_shape if call.attrs.keepdims else (spec.channels,)
        return relax.op.reshape(relax.TupleGetItem(stats, which), out_shape)

    def _batch_stats(self, x: relax.Expr, spec: BatchStatsSpec) -> relax.Expr:
        """One statistics call per tensor, shared by its mean and its variance."""
        for seen, stats in self._epilogue_stats + self._stats_calls:
            if seen.same_as(x):
                return stats
        gv = self._kernels.add(("bn_stats", spec), lambda: build_batch_stats_primfunc(spec), "bndeploy_batch_stats")
        flat_shape = (spec.rows, spec.channels) if spec.channels_last else (spec.batch, spec.channels, spec.plane)
        flat = self.builder_.emit(relax.op.reshape(self.visit_expr(x), flat_shape))
        channel = relax.TensorType((spec.channels,), "float32")
        stats = self.builder_.emit(relax.call_tir(gv, [flat], [channel, channel]))
        self._stats_calls.append((x, stats))
        return stats


def stats_operand(call, value_of) -> relax.Expr | None:
    """x when call is variance(x), mean(x) or mean((x - mean(x))^2), else None."""
    name = op_name(call)
    if name == "relax.variance":
        return call.args[0]
    if name == "relax.mean":
        centered = _centered_square_source(value_of(call.args[0]), value_of)
        return call.args[0] if centered is None else centered
    return None


def statistic_index(call, x) -> int:
    """0 when `call` (a stats_operand call on x) is x's mean, 1 when it is x's variance."""
    return 0 if op_name(call) == "relax.mean" and x.same_as(call.args[0]) else 1


@dataclass(frozen=True)
class StatsSource:
    """Batch statistics over (N, H, W) of x = conv(...) [+ bias]: the conv can sum them in its epilogue."""

    x: relax.Expr
    conv: relax.Call
    bias: np.ndarray | None  # per output channel


CHANNEL_AXIS = {"NHWC": 3, "NCHW": 1}


def conv_stats_source(call, value_of, layout: str = "NHWC") -> StatsSource | None:
    """The conv (and per-channel constant bias) whose `layout` output a mean or variance over (N, H, W)
    reduces, when `call` is one."""
    x = stats_operand(call, value_of)
    channel_axis = CHANNEL_AXIS[layout]
    reduced = [axis for axis in range(4) if axis != channel_axis]
    if x is None or call.attrs.axis is None or sorted(int(a) % 4 for a in call.attrs.axis) != reduced:
        return None
    shape = _static_shape(x)
    if shape is None or len(shape) != 4 or _dtype(x) != "float32":
        return None
    producer, bias = value_of(x), None
    if op_name(producer) == "relax.add":
        for operand, other in (producer.args, reversed(producer.args)):
            bias = channel_vector(other, shape[channel_axis], channel_axis)
            if bias is not None and op_name(value_of(operand)) == "relax.nn.conv2d":
                producer = value_of(operand)
                break
        else:
            return None
    if op_name(producer) != "relax.nn.conv2d" or conv_spec(producer, layout) is None:
        return None
    return StatsSource(x, producer, bias)


def channel_vector(expr, channels: int, channel_axis: int) -> np.ndarray | None:
    """A constant broadcast along the channel axis only, as a (channels,) float32 vector."""
    if not isinstance(expr, Constant):
        return None
    value = expr.value.numpy()
    if value.dtype != np.float32 or value.size not in (1, channels) or value.ndim > 4:
        return None
    aligned = (1,) * (4 - value.ndim) + value.shape  # as broadcasting lines it up with the 4-D tensor
    if any(size != 1 for axis, size in enumerate(aligned) if axis != channel_axis):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _centered_square_source(expr, value_of):
    """x if expr is square(x - mean(x)), multiply(d, d) with d = x - mean(x), or power(d, 2)."""
    name = op_name(expr)
    if name == "relax.square":
        diff = value_of(expr.args[0])
    elif name == "relax.multiply" and expr.args[0].same_as(expr.args[1]):
        diff = value_of(expr.args[0])
    elif name == "relax.power" and isinstance(expr.args[1], Constant) and float(expr.args[1].value.numpy()) == 2.0:
        diff = value_of(expr.args[0])
    else:
        return None
    if op_name(diff) != "relax.subtract":
        return None
    x, mean = diff.args[0], value_of(diff.args[1])
    if op_name(mean) != "relax.mean" or not mean.args[0].same_as(x):
        return None
    return x


def _interleaved_source(source, spec: ConvSpec, tiling: Tiling, isa) -> tuple[relax.Expr, int] | None:
    """(x, groups per vector) when `source`, a conv's input, is take(x, positions, axis=3) restoring the
    channel order of an x stored interleaved for this conv's tile (interleave_inputs.py), which the kernel
    can read in place."""
    if op_name(source) != "relax.take" or tiling.kind not in (INTERLEAVED, PAIRED) or int(source.attrs.axis) != CHANNEL_AXIS["NHWC"]:
        return None
    per_vector = in_place_groups_per_vector(spec, isa)
    indices = source.args[1]
    if per_vector == 1 or not isinstance(indices, Constant):
        return None
    if not np.array_equal(indices.value.numpy(), interleaved_input_positions(spec, per_vector)):
        return None
    return source.args[0], per_vector


def _is_nchw_to_nhwc(permute: relax.Call) -> bool:
    axes = permute.attrs.axes
    return axes is not None and [int(a) for a in axes] == [0, 2, 3, 1]


def conv_spec(conv: relax.Call, layout: str = "NHWC") -> ConvSpec | None:
    """The spec of a float32 conv2d in `layout` (NHWC or NCHW) with constant OIHW weights and a static shape
    (ConvSpec's sizes are the same for either layout), else None."""
    attrs = conv.attrs
    data, weight = conv.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (layout, "OIHW", layout):
        return None
    if not isinstance(weight, Constant):
        return None
    if _dtype(data) != "float32" or weight.value.dtype != "float32" or str(attrs.out_dtype) not in ("", "None", "void", "float32"):
        return None
    shape = _static_shape(data)
    if shape is None:
        return None
    if layout == "NCHW":
        n, c, h, w = shape
        shape = (n, h, w, c)
    out_channels, in_per_group, kh, kw = weight.value.shape
    groups = int(attrs.groups)
    if in_per_group * groups != shape[3]:
        return None
    return ConvSpec(
        *shape,
        out_channels=int(out_channels),
        kernel=(int(kh), int(kw)),
        strides=tuple(int(s) for s in attrs.strides),
        padding=tuple(int(p) for p in attrs.padding),
        dilation=tuple(int(d) for d in attrs.dilation),
        groups=groups,
    )


def _conv_transpose_spec(call: relax.Call) -> ConvTransposeSpec | None:
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "IOHW", "NHWC") or int(attrs.groups) != 1:
        return None
    if not isinstance(weight, Constant) or weight.value.dtype != "float32" or _dtype(data) != "float32":
        return None
    if str(attrs.out_dtype) not in ("", "None", "void", "float32"):
        return None
    shape = _static_shape(data)
    if shape is None or weight.value.shape[0] != shape[3]:
        return None
    _, out_channels, kh, kw = weight.value.shape
    return ConvTransposeSpec(*shape, out_channels=int(out_channels), kernel=(int(kh), int(kw)),
                             strides=tuple(int(s) for s in attrs.strides),
                             padding=tuple(int(p) for p in attrs.padding),
                             output_padding=tuple(int(p) for p in attrs.output_padding),
                             dilation=tuple(int(d) for d in attrs.dilation))


# Module attribute: the ordinals (k-th conv2d binding of the function, which is the k-th ONNX Conv node) of
# the convs whose output's batch statistics are summed in their epilogue; the fusion report reads it.
STATISTICS_FUSED_ATTR = "bndeploy.statistics_fused_convs"
# Module attribute read by rewrite_to_kernels: "auto" (Winograd where winograd_tiling takes a conv, else the
# direct kernel) or "direct" (every conv by the direct or depthwise kernel: CompileSettings.conv_algorithm).
CONV_ALGORITHM_ATTR = "bndeploy.conv_algorithm"
CONV_ALGORITHMS = ("auto", "direct")


# Channels-last for every conv2d and conv2d_transpose: the layout bndeploy's kernels compute in.
# ConvertLayout carries it through elementwise ops, pooling and reductions, so a network transposes only
# at its edges.
CHANNELS_LAST = {"relax.nn.conv2d": ["NHWC", "OIHW"], "relax.nn.conv2d_transpose": ["NHWC", "IOHW"]}


@tvm.transform.module_pass(opt_level=0, name="bndeploy.ConvertToChannelsLast")
def convert_to_channels_last(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return relax.transform.ConvertLayout(CHANNELS_LAST)(clip_to_bounds(mod))


@mutator
class _ClipToBounds(PyExprMutator):
    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if op_name(call) != "relax.clip" or _dtype(call) is None:
            return call
        low, high = (float(bound.value) for bound in call.args[1:])
        dtype = _dtype(call)
        return relax.op.minimum(relax.op.maximum(call.args[0], relax.const(low, dtype)), relax.const(high, dtype))


@tvm.transform.module_pass(opt_level=0, name="bndeploy.ClipToBounds")
def clip_to_bounds(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): TVM's ConvertLayout has no layout rule for clip, so
    every ReLU6/HardSwish/HardSigmoid would be wrapped in a transpose back to NCHW and out again (measured
    on MobileNetV2: a fifth of its time in those transposes); maximum/minimum with a constant follow any
    layout, and legalise to the same compare-and-select (nan_semantics.py)."""
    mutator = _ClipToBounds(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = mutator.visit_expr(func)
    return mod


def statistics_fused_attrs(rewriter) -> dict:
    """The ordinals of the convs that sum BatchNorm statistics in their epilogue (the rewriter's
    `statistics_fused`), as STATISTICS_FUSED_ATTR."""
    return {STATISTICS_FUSED_ATTR: sorted(rewriter.statistics_fused)}


def rewrite_functions(mod: tvm.IRModule, make_rewriter, fold: bool = True, attrs=statistics_fused_attrs) -> tvm.IRModule:
    """`make_rewriter(mod)`'s `rewrite` on every Relax function of `mod` (constants folded first, e.g. the
    reshape of an ONNX Conv bias, unless `fold` is False: the caller folded them), dead code removed after;
    `attrs(rewriter)`: the module attributes the rewrite records."""
    if fold:
        mod = relax.transform.FoldConstant()(mod)
    rewriter = make_rewriter(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.rewrite(func))
    mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    for key, value in attrs(rewriter).items():
        mod = mod.with_attr(key, value)
    return mod


@tvm.transform.module_pass(opt_level=0, name="bndeploy.RewriteToKernels")
def rewrite_to_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Expects the module's constants folded (cpu.fusion_passes folds them after the channels-last layout)."""
    winograd = str((mod.attrs or {}).get(CONV_ALGORITHM_ATTR, "auto")) == "auto"
    return rewrite_functions(mod, lambda folded: _KernelRewriter(folded, tvm.target.Target.current(), winograd),
                             fold=False)
