"""ONNX -> Relax through TVM's importer, with bndeploy's converters for the ops it imports wrongly.

TVM's converters for these ops lose NaN or ±Inf where ONNX Runtime keeps them (measured against ORT 1.32):
- Clip emits TE `max`/`min` kernels directly, which TVM lowers to `select(a > b, a, b)`: Clip(NaN) = lo.
  bndeploy emits `relax.clip` (constant bounds) or `relax.maximum`/`relax.minimum`, whose legalisation
  (nan_semantics.py) propagates NaN.
- Max and Min (the variadic ONNX ops) stack the inputs and reduce over the new axis: a 5-D detour that
  also defeats the channels-last layout pass. bndeploy folds them pairwise with relax.maximum/minimum.
- ThresholdedRelu is imported as `(x > alpha) * x`, so NaN and -inf become NaN where ORT gives 0.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.ir.expr import Constant
from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

_PATCH_LOCK = threading.Lock()


class _Clip(onnx_frontend.OnnxOpConverter):
    @staticmethod
    def _bound(value) -> float | None:
        if value is None:
            return None
        if isinstance(value, Constant) and value.value.numpy().size == 1:
            bound = float(value.value.numpy().reshape(()))
            return None if np.isnan(bound) else bound  # ONNX: a NaN bound means unbounded
        raise _NotConstant

    @classmethod
    def _clip(cls, x, low: float | None, high: float | None):
        # An absent bound is the dtype's largest finite value, as in Clip-6's defaults and in ONNX
        # Runtime for every version: Clip(+inf) with only a lower bound is FLT_MAX, not +inf.
        largest = float(np.finfo(str(x.ty.dtype)).max)
        low = -largest if low is None else low
        high = largest if high is None else high
        return relax.op.clip(x, tirx.FloatImm("float64", low), tirx.FloatImm("float64", high))

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return cls._clip(inputs[0], attr.get("min"), attr.get("max"))

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        padded = list(inputs) + [None] * (3 - len(inputs))
        try:
            return cls._clip(x, cls._bound(padded[1]), cls._bound(padded[2]))
        except _NotConstant:
            result = x
            largest = float(np.finfo(str(x.ty.dtype)).max)
            if padded[1] is not None:
                result = relax.op.maximum(result, _nan_to(padded[1], -largest, bb))
            if padded[2] is not None:
                result = relax.op.minimum(result, _nan_to(padded[2], largest, bb))
            return result


class _NotConstant(Exception):
    pass


def _nan_to(bound, replacement: float, bb):
    dtype = bound.ty.dtype
    return bb.emit(relax.op.where(relax.op.isnan(bound), relax.const(replacement, dtype), bound))


def _pairwise(binary_op):
    class _Pairwise(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            return functools.reduce(lambda a, b: bb.normalize(binary_op(a, b)), inputs)

    return _Pairwise


class _ThresholdedRelu(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = x.ty.dtype
        alpha = relax.const(attr.get("alpha", 1.0), dtype)
        return relax.op.where(relax.op.greater(x, alpha), x, relax.const(0.0, dtype))


BNDEPLOY_CONVERTERS = {
    "Clip": _Clip,
    "Max": _pairwise(relax.op.maximum),
    "Min": _pairwise(relax.op.minimum),
    "ThresholdedRelu": _ThresholdedRelu,
}


@contextlib.contextmanager
def _bndeploy_converters():
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **BNDEPLOY_CONVERTERS}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_onnx(model: onnx.ModelProto) -> tvm.IRModule:
    """TVM's ONNX importer with bndeploy's converters; initializers become constants."""
    with _PATCH_LOCK, _bndeploy_converters():
        return from_onnx(model, keep_params_in_input=False)
