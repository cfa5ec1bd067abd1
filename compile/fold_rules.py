"""How an inference BatchNorm folds into the linear op before it: one rule per kind of op.

BN(op(x, W) + b) = op(x, W * s) + ((b - mean) * s + beta), s = gamma / sqrt(var + eps), when s scales the
channels of op's output one by one: each output channel of the op is a linear function of the weights of
that channel only. A rule knows, for its Relax ops, which argument is the constant weight, which axis of
the op's output holds those channels, and how to scale the weight per output channel:

- Conv (conv1d/2d/3d, kernel OI...): weight axis 0.
- ConvTranspose (conv1d/2d/3d_transpose, kernel IO...): the weight is (C_in, C_out / groups, k...), so an
  output channel g * (C_out / groups) + j is column j of group g's rows.
- MatMul (Gemm and MatMul; Gemm's transB arrives as a permute of the constant): x @ W scales W's last
  axis (the output's last axis); W @ x scales W's second-to-last (the output's axis -2, e.g. (N, C, L)).

The scale is applied in float64 and rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.ir.expr import Constant

CONV, CONV_TRANSPOSE, MATMUL = "Conv", "ConvTranspose", "Gemm/MatMul"


@dataclass(frozen=True)
class FoldTarget:
    """A linear op a BN may fold into: the call, its kind, which argument is the weight, and the weight's
    value (None when it is not a constant)."""

    call: relax.Call
    kind: str
    weight_index: int
    weight: np.ndarray | None

    @property
    def data_index(self) -> int:
        return 1 - self.weight_index

    def channel_axis(self) -> int | None:
        """The axis of the op's output whose channels the weight produces one by one (None: a layout
        bndeploy does not fold)."""
        out_ndim = len(self.call.ty.shape.values)
        if self.kind == CONV:
            layout = str(self.call.attrs.kernel_layout)
            return 1 if layout.startswith("OI") and str(self.call.attrs.data_layout).startswith("NC") else None
        if self.kind == CONV_TRANSPOSE:
            layout = str(self.call.attrs.kernel_layout)
            return 1 if layout.startswith("IO") and str(self.call.attrs.data_layout).startswith("NC") else None
        if self.weight is None or self.weight.ndim < 2 or out_ndim < 2:
            return None  # a vector operand reduces the axis away
        return out_ndim - 1 if self.weight_index == 1 else out_ndim - 2

    def scaled_weight(self, scale: np.ndarray) -> np.ndarray:
        """The weight with output channel c multiplied by scale[c], in float64."""
        weight = self.weight.astype(np.float64)
        if self.kind == CONV:
            return weight * scale.reshape([-1] + [1] * (weight.ndim - 1))
        if self.kind == CONV_TRANSPOSE:
            groups = int(self.call.attrs.groups)
            c_in, per_group, *kernel = weight.shape
            grouped = weight.reshape(groups, c_in // groups, per_group, *kernel)
            return (grouped * scale.reshape(groups, 1, per_group, *[1] * len(kernel))).reshape(weight.shape)
        if self.weight_index == 1:
            return weight * scale  # (..., K, C): the last axis
        return weight * scale.reshape(-1, 1)  # (..., C, K): the second-to-last axis

    def rebuilt(self, bb: relax.BlockBuilder, data: relax.Expr, weight: np.ndarray) -> relax.Expr:
        """The same op with `data` and the folded weight (rounded once to the original dtype)."""
        args = list(self.call.args)
        args[self.data_index] = data
        args[self.weight_index] = relax.const(weight.astype(self.weight.dtype))
        return bb.emit(relax.Call(self.call.op, args, self.call.attrs, self.call.ty_args))


_KINDS = {
    **{f"relax.nn.conv{d}d": CONV for d in (1, 2, 3)},
    **{f"relax.nn.conv{d}d_transpose": CONV_TRANSPOSE for d in (1, 2, 3)},
    "relax.matmul": MATMUL,
}
LINEAR_OPS = tuple(_KINDS)


def linear_kind(expr) -> str | None:
    """CONV, CONV_TRANSPOSE or MATMUL for a linear op bndeploy folds into, else None."""
    return _KINDS.get(expr.op.name) if isinstance(expr, relax.Call) and hasattr(expr.op, "name") else None


def fold_target(call: relax.Call, var2val) -> FoldTarget | None:
    """The call as a fold target, or None when it is not a linear op bndeploy folds into."""
    kind = linear_kind(call)
    if kind is None:
        return None
    if kind != MATMUL:
        return FoldTarget(call, kind, 1, constant_value(call.args[1], var2val))
    right, left = (constant_value(call.args[i], var2val) for i in (1, 0))
    if right is None and left is not None:
        return FoldTarget(call, kind, 0, left)
    return FoldTarget(call, kind, 1, right)


# --------------------------------------------------------------------------------------------------
# Constants the importer spells as small expressions (Gemm: permute_dims(W), multiply(C, beta))


_ELEMENTWISE = {"relax.multiply": np.multiply, "relax.add": np.add, "relax.subtract": np.subtract,
                "relax.divide": np.divide}


def constant_value(expr, var2val) -> np.ndarray | None:
    """The value of an expression built only from constants by permute/reshape/elementwise ops, or None."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    if isinstance(expr, Constant):
        return expr.value.numpy()
    if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
        return None
    name = expr.op.name
    if name in _ELEMENTWISE:
        a, b = (constant_value(arg, var2val) for arg in expr.args)
        return None if a is None or b is None else _ELEMENTWISE[name](a, b).astype(np.result_type(a, b))
    inner = constant_value(expr.args[0], var2val)
    if inner is None:
        return None
    if name == "relax.permute_dims":
        axes = expr.attrs.axes
        return np.transpose(inner, None if axes is None else [int(a) for a in axes])
    if name == "relax.reshape":
        return inner.reshape([int(d) for d in expr.ty.shape.values])
    return None
