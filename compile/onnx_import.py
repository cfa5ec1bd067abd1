"""ONNX -> Relax through TVM's importer, with bndeploy's converters for the ops it imports wrongly.

TVM's converters for these ops lose NaN or ±Inf where ONNX Runtime keeps them (measured against ORT 1.32):
- Clip emits TE `max`/`min` kernels directly, which TVM lowers to `select(a > b, a, b)`: Clip(NaN) = lo.
  bndeploy emits `relax.clip` (constant bounds) or `relax.maximum`/`relax.minimum`, whose legalisation
  (nan_semantics.py) propagates NaN.
- Max and Min (the variadic ONNX ops) stack the inputs and reduce over the new axis: a 5-D detour that
  also defeats the channels-last layout pass. bndeploy folds them pairwise with relax.maximum/minimum.
- ThresholdedRelu is imported as `(x > alpha) * x`, so NaN and -inf become NaN where ORT gives 0.
- Sum and Mean, like Max and Min, stack and reduce (which the channels-last pass cannot lay out: "Invalid
  SLayout"); bndeploy adds pairwise.
- Dropout becomes `relax.nn.dropout`, a tuple even where the node has one output, which fails the import:
  at inference Dropout is the identity (as in ONNX Runtime); a training_mode that is not a constant false
  (random masks) is refused.
- ConvTranspose ignores `output_shape`: bndeploy derives the pads (and, for an output larger than the pads
  allow, output_padding) from it, as the ONNX spec defines.
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

from bndeploy.errors import UnsupportedModelError

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


class _Mean(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        total = functools.reduce(lambda a, b: bb.normalize(relax.op.add(a, b)), inputs)
        return relax.op.divide(total, relax.const(float(len(inputs)), inputs[0].ty.dtype))


class _ConvTranspose(onnx_frontend.ConvTranspose):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "output_shape" in attr:
            attr = {**attr, **_pads_for_output_shape(inputs, attr)}
            attr.pop("output_shape")
            attr.pop("auto_pad", None)
        return super()._impl_v1(bb, inputs, attr, params)


def _pads_for_output_shape(inputs, attr) -> dict:
    """ONNX ConvTranspose: total_padding = stride * (in - 1) + output_padding + (k - 1) * dilation + 1 - out,
    split as pads (begin, end) = (total - total // 2, total // 2), or (total // 2, total - total // 2) for
    SAME_UPPER. A negative end pad (an output larger than the kernel reaches) is output_padding."""
    spatial = [int(d) for d in inputs[0].ty.shape.values[2:]]
    kernel = list(attr.get("kernel_shape") or [int(d) for d in inputs[1].ty.shape.values[2:]])
    count = len(spatial)
    strides, dilations = attr.get("strides", [1] * count), attr.get("dilations", [1] * count)
    output_padding = list(attr.get("output_padding", [0] * count))
    output_shape = list(attr["output_shape"])[-count:]
    auto_pad = attr.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    begin, end = [], []
    for i in range(count):
        total = strides[i] * (spatial[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - output_shape[i]
        first, second = (total // 2, total - total // 2) if auto_pad == "SAME_UPPER" else (total - total // 2, total // 2)
        if first < 0:
            raise UnsupportedModelError(f"ConvTranspose output_shape {output_shape} needs a negative leading pad")
        if second < 0:
            output_padding[i] -= second
            second = 0
        begin.append(first)
        end.append(second)
    return {"pads": begin + end, "output_padding": output_padding}


class _Dropout(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return inputs[0]

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        training = inputs[2] if len(inputs) > 2 else None
        if training is not None and not (isinstance(training, Constant) and not bool(training.value.numpy())):
            raise UnsupportedModelError("Dropout with training_mode (random masks) is not compiled: export it as the "
                                        "identity (bndeploy export --train-dropout identity)")
        return inputs[0]


class _ThresholdedRelu(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = x.ty.dtype
        alpha = relax.const(attr.get("alpha", 1.0), dtype)
        return relax.op.where(relax.op.greater(x, alpha), x, relax.const(0.0, dtype))


BNDEPLOY_CONVERTERS = {
    "Clip": _Clip,
    "ConvTranspose": _ConvTranspose,
    "Dropout": _Dropout,
    "Sum": _pairwise(relax.op.add),
    "Mean": _Mean,
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
    """TVM's ONNX importer with bndeploy's converters; initializers become constants. Each node's output is
    bound to a variable named ``onnx:<tensor>`` (kernel_map.py: what `check --locate` compares)."""
    from .kernel_map import onnx_names_on_vars

    with _PATCH_LOCK, _bndeploy_converters(), onnx_names_on_vars():
        return from_onnx(model, keep_params_in_input=False)
