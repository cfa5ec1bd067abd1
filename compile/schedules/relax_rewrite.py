"""Relax-level rewrites that route conv2d chains and BN batch statistics to bndeploy's kernels."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from .bn_stats import BatchStatsSpec, build_batch_stats_primfunc
from .conv2d import ConvSpec, build_conv2d_primfunc, choose_tiling, pack_weight


def _op_name(expr) -> str | None:
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


@mutator
class _KernelRewriter(PyExprMutator):
    """Replaces `relu?(add?(conv2d(x, W_const), bias_const))` by one call to a scheduled kernel, and
    `variance(x)` / `mean(square(x - mean(x)))` over (N, H, W) by the one-pass statistics kernel."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self._kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self._stats_calls: list[tuple[relax.Expr, relax.Var]] = []

    def rewrite(self, func: relax.Function) -> relax.Function:
        # Patterns are matched on the original bindings: rewritten ones are no longer in the builder.
        self._var2val = relax.analysis.get_var2val(func)
        return self.visit_expr(func)

    def _value_of(self, expr):
        """The bound value of a variable of the original function (one hop), else the expression."""
        if isinstance(expr, relax.Var) and expr in self._var2val:
            return self._var2val[expr]
        return expr

    def _kernel(self, key: tuple, make_primfunc, name: str) -> tvm.ir.GlobalVar:
        if key not in self._kernels:
            # te.create_prim_func names every function "main"; the module assigns the symbol.
            func = make_primfunc().without_attr("global_symbol")
            self._kernels[key] = self.builder_.add_func(func, name)
        return self._kernels[key]

    def visit_call_(self, call: relax.Call):
        name = _op_name(call)
        replacement = None
        if name in ("relax.nn.relu", "relax.add", "relax.nn.conv2d"):
            replacement = self._rewrite_conv_chain(call)
        if replacement is None:
            replacement = self._rewrite_batch_stats(call)
        return replacement if replacement is not None else super().visit_call_(call)

    # conv2d chains -------------------------------------------------------------------------------

    def _rewrite_conv_chain(self, call: relax.Call):
        relu = _op_name(call) == "relax.nn.relu"
        node = self._value_of(call.args[0]) if relu else call
        bias = None
        if _op_name(node) == "relax.add":
            lhs, rhs = (self._value_of(a) for a in node.args)
            if _op_name(lhs) == "relax.nn.conv2d" and isinstance(rhs, Constant):
                node, bias = lhs, rhs
            elif _op_name(rhs) == "relax.nn.conv2d" and isinstance(lhs, Constant):
                node, bias = rhs, lhs
            else:
                return None
        if _op_name(node) != "relax.nn.conv2d":
            return None
        spec = _conv_spec(node)
        if spec is None:
            return None
        bias_values = _channel_vector(bias, spec.out_channels) if bias is not None else None
        if bias is not None and bias_values is None:
            return None
        tiling = choose_tiling(spec)
        if tiling is None:
            return None
        has_bias = bias_values is not None
        gv = self._kernel(
            ("conv2d", spec, tiling, has_bias, relu),
            lambda: build_conv2d_primfunc(spec, tiling, has_bias, relu),
            f"bndeploy_conv2d{'_bias' if has_bias else ''}{'_relu' if relu else ''}",
        )
        weight = pack_weight(node.args[1].value.numpy(), tiling.oc_block)
        args = [self.visit_expr(node.args[0]), relax.const(weight)]
        if has_bias:
            args.append(relax.const(bias_values))
        out_shape = (spec.batch, spec.out_channels, spec.out_height, spec.out_width)
        return relax.call_tir(gv, args, relax.TensorType(out_shape, "float32"))

    # batch statistics ----------------------------------------------------------------------------

    def _rewrite_batch_stats(self, call: relax.Call):
        """mean(x) and variance(x) / mean((x - mean(x))^2) over (N, H, W) of an NCHW tensor: TVM would
        read x three times (mean, variance, then normalise); one kernel computes both in one pass."""
        name = _op_name(call)
        if name == "relax.variance":
            x, which = call.args[0], 1
        elif name == "relax.mean":
            centered = _centered_square_source(self._value_of(call.args[0]), self._value_of)
            x, which = (call.args[0], 0) if centered is None else (centered, 1)
        else:
            return None
        shape = _static_shape(x)
        axes = call.attrs.axis
        if shape is None or len(shape) != 4 or _dtype(x) != "float32":
            return None
        if axes is None or sorted(int(a) % 4 for a in axes) != [0, 2, 3]:
            return None
        stats = self._batch_stats(self.visit_expr(x), BatchStatsSpec(*shape))
        out_shape = (1, shape[1], 1, 1) if call.attrs.keepdims else (shape[1],)
        return relax.op.reshape(relax.TupleGetItem(stats, which), out_shape)

    def _batch_stats(self, x: relax.Expr, spec: BatchStatsSpec) -> relax.Var:
        """One statistics call per tensor, shared by its mean and its variance."""
        for seen, stats in self._stats_calls:
            if seen.same_as(x):
                return stats
        gv = self._kernel(("bn_stats", spec), lambda: build_batch_stats_primfunc(spec), "bndeploy_batch_stats")
        flat = self.builder_.emit(relax.op.reshape(x, (spec.batch, spec.channels, spec.height * spec.width)))
        channel = relax.TensorType((spec.channels,), "float32")
        stats = self.builder_.emit(relax.call_tir(gv, [flat], [channel, channel]))
        self._stats_calls.append((x, stats))
        return stats


def _centered_square_source(expr, value_of):
    """x if expr is square(x - mean(x)), multiply(d, d) with d = x - mean(x), or power(d, 2)."""
    name = _op_name(expr)
    if name == "relax.square":
        diff = value_of(expr.args[0])
    elif name == "relax.multiply" and expr.args[0].same_as(expr.args[1]):
        diff = value_of(expr.args[0])
    elif name == "relax.power" and isinstance(expr.args[1], Constant) and float(expr.args[1].value.numpy()) == 2.0:
        diff = value_of(expr.args[0])
    else:
        return None
    if _op_name(diff) != "relax.subtract":
        return None
    x, mean = diff.args[0], value_of(diff.args[1])
    if _op_name(mean) != "relax.mean" or not mean.args[0].same_as(x):
        return None
    return x


def _conv_spec(conv: relax.Call) -> ConvSpec | None:
    attrs = conv.attrs
    data, weight = conv.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if int(attrs.groups) != 1 or not isinstance(weight, Constant):
        return None
    if _dtype(data) != "float32" or weight.value.dtype != "float32" or str(attrs.out_dtype) not in ("", "None", "void", "float32"):
        return None
    shape = _static_shape(data)
    if shape is None:
        return None
    out_channels, in_channels, kh, kw = weight.value.shape
    if in_channels != shape[1]:
        return None
    return ConvSpec(
        *shape,
        out_channels=int(out_channels),
        kernel=(int(kh), int(kw)),
        strides=tuple(int(s) for s in attrs.strides),
        padding=tuple(int(p) for p in attrs.padding),
        dilation=tuple(int(d) for d in attrs.dilation),
    )


def _channel_vector(const: Constant, channels: int) -> np.ndarray | None:
    """A per-output-channel bias of shape (C,), (C,1,1) or (1,C,1,1), as float32 (C,)."""
    values = const.value.numpy()
    if values.dtype != np.float32 or values.size != channels:
        return None
    if values.ndim == 4 and values.shape != (1, channels, 1, 1):
        return None
    if values.ndim == 3 and values.shape != (channels, 1, 1):
        return None
    if values.ndim not in (1, 3, 4):
        return None
    return values.reshape(channels)


@tvm.transform.module_pass(opt_level=0, name="bndeploy.RewriteToKernels")
def rewrite_to_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    mod = relax.transform.FoldConstant()(mod)  # e.g. the reshape of an ONNX Conv bias
    rewriter = _KernelRewriter(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.rewrite(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
