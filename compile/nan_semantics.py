"""Legalisations that put NaN where ONNX Runtime puts it.

TVM lowers a float `max(a, b)` to `select(a > b, a, b)`, which turns `relu(NaN)` into 0 and
`clip(NaN)` into its lower bound: a compiled artifact would hide a broken sensor behind plausible numbers.
ONNX Runtime propagates NaN through Relu, Clip, Max and Min (from either operand). These legalisations
replace TVM's for those ops, in every target's pipeline; every other op (and the fused conv epilogues,
which are these same ops after fusion) inherits them. MaxPool is left as TVM lowers it: its NaN
behaviour already matches ONNX Runtime's, which depends on where in the window the NaN sits.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.ir.expr import Constant


def _relu(x: te.Tensor) -> te.Tensor:
    zero = tirx.const(0.0, x.dtype)
    return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)), name="relu", tag="elemwise")


def _clip(x: te.Tensor, low: float, high: float) -> te.Tensor:
    lo, hi = tirx.const(low, x.dtype), tirx.const(high, x.dtype)

    def clipped(*i):
        value = x(*i)
        return tirx.Select(value < lo, lo, tirx.Select(value > hi, hi, value))

    return te.compute(x.shape, clipped, name="clip", tag="elemwise")


def _is_nan(t: te.Tensor):
    return topi.isnan(t)  # not `t != t`: TVM's simplifier assumes floats are never NaN and folds it to False


def _maximum(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """a where a > b or a is NaN, else b (so a NaN in either operand comes out)."""
    return topi.where(topi.logical_or(topi.greater(a, b), _is_nan(a)), a, b)


def _minimum(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.where(topi.logical_or(topi.less(a, b), _is_nan(a)), a, b)


def _float(call: relax.Call) -> bool:
    dtype = getattr(call.ty, "dtype", "")
    return str(dtype).startswith(("float", "bfloat"))


def _legalize_relu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(_relu, call.args[0], primfunc_name_hint="relu") if _float(call) else _default(bb, call)


def _legalize_clip(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    bounds = call.args[1:]
    if not _float(call) or not all(isinstance(b, (tirx.FloatImm, tirx.IntImm)) for b in bounds):
        return _default(bb, call)
    low, high = (float(b.value) for b in bounds)
    return bb.call_te(_clip, call.args[0], low, high, primfunc_name_hint="clip")


def _bound(x: te.Tensor, bound: float, keep_above: bool) -> te.Tensor:
    """max(x, bound) (keep_above) or min(x, bound) for a finite constant bound: one compare and select,
    NaN passing through as x (clip's lower and upper bound after `clip_to_bounds`)."""
    c = tirx.const(bound, x.dtype)
    if keep_above:
        return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < c, c, x(*i)), name="maximum", tag="elemwise")
    return te.compute(x.shape, lambda *i: tirx.Select(x(*i) > c, c, x(*i)), name="minimum", tag="elemwise")


def _scalar_constant(expr) -> float | None:
    """The value of a scalar (or one-element) non-NaN constant, else None."""
    if not isinstance(expr, Constant):
        return None
    value = expr.value.numpy()
    if value.size != 1 or np.isnan(value).any():
        return None
    return float(value.reshape(()))


def _legalize_binary(compute, keep_above: bool):
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not _float(call):
            return _default(bb, call)
        a, b = call.args
        bound = _scalar_constant(b)
        if bound is not None and _shape(a) == _shape(call):
            return bb.call_te(_bound, a, bound, keep_above, primfunc_name_hint=compute.__name__.strip("_"))
        return bb.call_te(compute, a, b, primfunc_name_hint=compute.__name__.strip("_"))

    return legalize


def _shape(expr) -> tuple | None:
    shape = getattr(expr.ty, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape.values) if hasattr(shape, "values") else tuple(shape)


def _default(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


# exp(y) = 2^n * exp(r): n = floor(y / ln 2 + 1/2), r = y - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two
# parts, the first exact in 9 bits, so n * LN2_HIGH is exact and r loses nothing), exp(r) by the degree-5
# polynomial of least maximum relative error on that interval with constant term 1, so that exp(0) = 1
# (9.5e-8 with its coefficients rounded to float32; fitted by Lawson's reweighted least squares). In float32
# the whole is within 3e-7 of exp over [-87, 88] (a few ulp). y is clamped to [EXP_LOW, EXP_HIGH] so that 2^n
# is built from the exponent bits alone: n = -126 gives 1.2e-38 for -inf, n = 128 the all-ones exponent,
# +inf, for y above 88.4 (exp overflows float32 from 88.72 on).
EXP_LOW, EXP_HIGH = -87.3, 88.8
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
EXP_POLYNOMIAL = (1.0, 0.9999997019767761, 0.4999915063381195, 0.1666763573884964, 0.04189793020486832,
                  0.008290315978229046)


def exp_float32(y: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(y) in 15 vector instructions on AVX2 (FMAs contracted), no table, no call; NaN in, NaN out (the
    clamp's comparisons are false for NaN, which then reaches r and the product)."""
    f32 = "float32"
    low, high = tirx.const(EXP_LOW, f32), tirx.const(EXP_HIGH, f32)
    y = tirx.Select(y < low, low, tirx.Select(y > high, high, y))
    n = tirx.floor(y * tirx.const(1.0 / np.log(2.0), f32) + tirx.const(0.5, f32))
    r = y - n * tirx.const(LN2_HIGH, f32) - n * tirx.const(LN2_LOW, f32)
    poly = tirx.const(EXP_POLYNOMIAL[-1], f32)
    for coefficient in EXP_POLYNOMIAL[-2::-1]:
        poly = poly * r + tirx.const(coefficient, f32)
    exponent = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return poly * tirx.reinterpret(f32, exponent)


def _sigmoid(x: te.Tensor) -> te.Tensor:
    """1 / (1 + exp(-x)) with `exp_float32` (within 3e-7 of the sigmoid, relative). TVM's own sigmoid calls
    the C library's expf once per element, unvectorised: it made every SiLU-fused conv of EfficientNet-B0 run
    at 2-5% of the FMA peak. TVM's polynomial exp (topi.fast_exp) takes 19 AVX2 instructions where this
    takes 15, and the SiLU epilogue is most of the work of EfficientNet's 1x1 expansions of 16-24 channels
    and of its depthwise convs (EfficientNet-B0 artifacts interleaved, AVX2 code: batch 8 58.4 -> 53.8 ms,
    batch 1 7.70 -> 7.34 ms; AVX-512 code, batch 8: 56.6 -> 55.8 ms).
    NaN stays NaN; +-inf give 1 and 0."""
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + exp_float32(-x(*i))), name="sigmoid", tag="elemwise")


def _tanh(x: te.Tensor) -> te.Tensor:
    """TVM's rational tanh (topi.fast_tanh, Eigen's: a few ulp, vectorisable; TVM's own tanh calls the C
    library's tanhf per element, unvectorised: 20 ns per value, most of a DCGAN generator's last layer).
    Its clamp to +-9 would turn NaN into a bound: NaN is passed through, as ONNX Runtime does."""
    fast = topi.fast_tanh(x)
    return te.compute(x.shape, lambda *i: tirx.Select(_is_nan(x)(*i), x(*i), fast(*i)), name="tanh", tag="elemwise")


def _float32_unary(compute):
    """Legalise a float32 call with `compute`, any other dtype as TVM does."""
    name = compute.__name__.strip("_")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if str(getattr(call.ty, "dtype", "")) != "float32":
            return _default(bb, call)
        return bb.call_te(compute, call.args[0], primfunc_name_hint=name)

    return legalize


# Vectorisable transcendental functions for the CPU (on CUDA the device's own exp is fast).
CPU_FAST_MATH = {"relax.sigmoid": _float32_unary(_sigmoid), "relax.tanh": _float32_unary(_tanh)}

NAN_PRESERVING = {
    "relax.nn.relu": _legalize_relu,
    "relax.clip": _legalize_clip,
    "relax.maximum": _legalize_binary(_maximum, keep_above=True),
    "relax.minimum": _legalize_binary(_minimum, keep_above=False),
}


def legalize_ops(cpu: bool = False) -> tvm.transform.Pass:
    """TVM's LegalizeOps with the NaN-preserving legalisations above (and, for CPUs, vectorisable sigmoid
    and tanh)."""
    return relax.transform.LegalizeOps(customize_legalize_map={**NAN_PRESERVING, **(CPU_FAST_MATH if cpu else {})})
