"""Small ONNX models for the compile tests, each with inputs and a float64 numpy reference.

In the style of ONNX's backend node tests: every case is data generated from a short numpy formula.
Each case also carries an elementwise bound on the float32 rounding error any correct fp32
implementation may show against the float64 reference (see ``fp32_bound``), so no test uses a
hand-picked tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]  # float64 reference per graph output
    bound: dict[str, np.ndarray]  # elementwise fp32 error bound per graph output
    folded: list[bool]  # expected fusion-report "folded" per BatchNormalization, in graph order
    mode: str = "inference"
    conv_dims: int = field(default=0)
    into: str | None = None  # the ONNX op type the fusion report names before the first BN (None: none)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def bn_params(channels: int, rng) -> dict[str, np.ndarray]:
    return {
        "scale": _f32(rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)),
        "bias": _f32(rng.standard_normal(channels)),
        "mean": _f32(rng.standard_normal(channels)),
        "var": _f32(rng.uniform(0.2, 3.0, channels)),
    }


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, np.float64).reshape([1, -1] + [1] * (ndim - 2))


# --------------------------------------------------------------------------------------------------
# numpy references (float64)


def conv_reference(x, w, b=None, strides=None, pads=None, dilations=None, groups=1) -> np.ndarray:
    """ONNX Conv (NC..., OI...), any rank, groups, strides, pads (begin..., end...), dilations."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides, dilations = strides or [1] * nd, dilations or [1] * nd
    pads = pads or [0] * (2 * nd)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    kernel = w.shape[2:]
    out_sp = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    out = np.zeros((x.shape[0], w.shape[0], *out_sp))
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    for g in range(groups):
        xg, wg = xp[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]
        for k in np.ndindex(*kernel):
            window = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + strides[i] * (out_sp[i] - 1) + 1,
                                 strides[i]) for i in range(nd))
            patch = xg[(slice(None), slice(None)) + window]
            out[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", patch, wg[(slice(None), slice(None)) + k])
    if b is not None:
        out += _channel(b, out.ndim)
    return out


def conv_transpose_reference(x, w, b=None, strides=None, pads=None, dilations=None, output_padding=None,
                             groups=1) -> np.ndarray:
    """ONNX ConvTranspose (NC..., weight (C_in, C_out / groups, k...)): every input element adds its
    weights at out = in * stride + k * dilation - pad_begin; output_padding extends the end."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = x.ndim - 2
    strides, dilations = strides or [1] * nd, dilations or [1] * nd
    pads, output_padding = pads or [0] * (2 * nd), output_padding or [0] * nd
    kernel = w.shape[2:]
    full = [strides[i] * (x.shape[2 + i] - 1) + dilations[i] * (kernel[i] - 1) + 1 + output_padding[i] for i in range(nd)]
    cg, og = x.shape[1] // groups, w.shape[1]
    out = np.zeros((x.shape[0], og * groups, *full))
    for g in range(groups):
        xg, wg = x[:, g * cg:(g + 1) * cg], w[g * cg:(g + 1) * cg]
        for k in np.ndindex(*kernel):
            window = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + strides[i] * (x.shape[2 + i] - 1) + 1,
                                 strides[i]) for i in range(nd))
            contribution = np.einsum("nc...,co->no...", xg, wg[(slice(None), slice(None)) + k])
            out[(slice(None), slice(g * og, (g + 1) * og)) + window] += contribution
    crop = tuple(slice(pads[i], full[i] - pads[nd + i]) for i in range(nd))
    out = out[(slice(None), slice(None)) + crop]
    if b is not None:
        out += _channel(b, out.ndim)
    return out


def bn_inference_reference(x, p, eps) -> np.ndarray:
    s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps)
    return (np.asarray(x, np.float64) - _channel(p["mean"], x.ndim)) * _channel(s, x.ndim) + _channel(p["bias"], x.ndim)


def bn_training_reference(x, p, eps, momentum, running_var="onnx"):
    """ONNX BatchNormalization training_mode=1: y, running_mean', running_var' (float64)."""
    x = np.asarray(x, np.float64)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - _channel(mean, x.ndim)) ** 2).mean(axis=axes)
    y = (x - _channel(mean, x.ndim)) / np.sqrt(_channel(var, x.ndim) + eps) * _channel(p["scale"], x.ndim) \
        + _channel(p["bias"], x.ndim)
    update_var = var * n / (n - 1) if running_var == "torch" else var
    new_mean = np.asarray(p["mean"], np.float64) * momentum + mean * (1 - momentum)
    new_var = np.asarray(p["var"], np.float64) * momentum + update_var * (1 - momentum)
    return y, new_mean, new_var


# --------------------------------------------------------------------------------------------------
# fp32 error bounds
#
# A dot product of K terms computed in float32 (any summation order) is within (K-1)*u*sum|a_i b_i|
# of the exact value (Higham, Accuracy and Stability, eq. 3.5, to first order). Each further
# elementwise operation adds at most u times the magnitude it works on. The bounds below take the
# magnitude M of every intermediate along both the folded and the unfolded computation, and allow
# (K + 8) roundings of it: K for the reduction, the rest for the folded weight/bias, s = g/sqrt(v+e)
# (sqrt, add, divide) and the final multiply/add. A correct fp32 implementation cannot exceed it; a
# wrong formula (e.g. a missing bias, a wrong variance) exceeds it by orders of magnitude.


def fp32_bound(terms: int, magnitude: np.ndarray, u: float = U32) -> np.ndarray:
    return (terms + 8) * u * magnitude


def conv_bn_magnitude(x, w, b, p, eps, conv_kw) -> np.ndarray:
    s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps)
    folded_abs = conv_reference(np.abs(x), np.abs(w) * np.abs(s).reshape([-1] + [1] * (w.ndim - 1)), **conv_kw)
    extra = np.abs(s) * (np.abs(b if b is not None else 0) + np.abs(p["mean"])) + np.abs(p["bias"])
    return folded_abs + _channel(extra, folded_abs.ndim)


def bn_magnitude(x, p, eps) -> np.ndarray:
    s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps)
    return np.abs(x) * _channel(np.abs(s), x.ndim) + _channel(np.abs(s * p["mean"]) + np.abs(p["bias"]), x.ndim)


def training_bounds(x, p, eps, momentum, new_var, u: float = U32):
    """Bounds for (y, running_mean', running_var'); n = values reduced per channel.

    The batch mean carries up to n*u*mean|x| error; the two-pass variance's relative error is
    O(n*u) (the mean's error enters it only squared); y, running_mean and running_var inherit those.
    """
    x = np.asarray(x, np.float64)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    n = x.size // x.shape[1]
    mean_abs = np.abs(x).mean(axis=axes)
    mean = x.mean(axis=axes)
    var = ((x - _channel(mean, x.ndim)) ** 2).mean(axis=axes)
    r = 1 / np.sqrt(var + eps)
    g = np.abs(np.asarray(p["scale"], np.float64))
    y_mag = _channel(g * r, x.ndim) * (_channel(mean_abs, x.ndim) + np.abs(x - _channel(mean, x.ndim))) \
        + _channel(np.abs(p["bias"]), x.ndim)
    mean_mag = momentum * np.abs(p["mean"]) + (1 - momentum) * mean_abs
    var_mag = momentum * np.abs(p["var"]) + np.abs(new_var)
    return fp32_bound(n, y_mag, u), fp32_bound(n, mean_mag, u), fp32_bound(n, var_mag, u)


# --------------------------------------------------------------------------------------------------
# ONNX builders


def _tensor_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _initializer(a) -> np.ndarray:
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.integer) else _f32(a)  # a Reshape's shape stays int64


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "case", [_tensor_info(n, a.shape) for n, a in inputs.items()],
                              [_tensor_info(n, s) for n, s in outputs.items()],
                              [numpy_helper.from_array(_initializer(a), n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn_node(x, y, eps, name="bn", extra_outputs=(), training=False, momentum=0.9, prefix="bn"):
    attrs = {"epsilon": eps, "momentum": momentum}
    if training:
        attrs["training_mode"] = 1
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [y, *extra_outputs], name=name, **attrs)


def _bn_inits(p, prefix="bn"):
    return {f"{prefix}.{k}": v for k, v in p.items()}


def batchnorm_case(shape=(2, 3, 4, 5), eps=1e-5, seed=0, params_as_inputs=False) -> Case:
    rng = _rng(seed)
    x = _f32(rng.standard_normal(shape) * 2 + 0.5)
    p = bn_params(shape[1], rng)
    eps32 = float(np.float32(eps))
    inits = _bn_inits(p)
    inputs = {"x": x, **(inits if params_as_inputs else {})}
    model = _model([_bn_node("x", "y", eps)], inputs, {"y": shape}, {} if params_as_inputs else inits)
    name = f"bn{len(shape) - 2}d" + ("_param_inputs" if params_as_inputs else "")
    return Case(name, model, inputs, {"y": bn_inference_reference(x, p, eps32)},
                {"y": fp32_bound(0, bn_magnitude(x, p, eps32))}, [False])


def conv_bn_case(name, x_shape=(2, 4, 7, 6), out_channels=6, kernel=(3, 3), bias=True, groups=1,
                 strides=None, pads=None, dilations=None, activation=None, eps=1e-5, seed=1,
                 conv_output_too=False) -> Case:
    """Conv [+bias] -> BN [-> Relu | Clip(0, 6)]; conv_output_too also makes the conv output a graph output."""
    rng = _rng(seed)
    nd = len(x_shape) - 2
    x = _f32(rng.standard_normal(x_shape))
    w = _f32(rng.standard_normal((out_channels, x_shape[1] // groups, *kernel)) / np.sqrt(np.prod(kernel)))
    b = _f32(rng.standard_normal(out_channels)) if bias else None
    p = bn_params(out_channels, rng)
    eps32 = float(np.float32(eps))
    conv_kw = dict(strides=strides, pads=pads, dilations=dilations, groups=groups)
    onnx_names = {"strides": "strides", "pads": "pads", "dilations": "dilations", "groups": "group"}
    conv_attrs = {onnx_names[k]: v for k, v in conv_kw.items() if v is not None}
    inits = {"W": w, **({"B": b} if bias else {}), **_bn_inits(p)}
    nodes = [helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["c"], name="conv", **conv_attrs),
             _bn_node("c", "y", eps)]
    c = conv_reference(x, w, b, **conv_kw)
    y = bn_inference_reference(c, p, eps32)
    bound = fp32_bound(int(np.prod(w.shape[1:])), conv_bn_magnitude(x, w, b, p, eps32, conv_kw))
    final = "y"
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        y, final = np.maximum(y, 0), "z"
    elif activation == "clip":
        inits.update({"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
        nodes.append(helper.make_node("Clip", ["y", "lo", "hi"], ["z"], name="clip"))
        y, final = np.clip(y, 0, 6), "z"
    outputs, expected, bounds = {final: y.shape}, {final: y}, {final: bound}
    if conv_output_too:
        outputs["c"] = c.shape
        expected["c"] = c
        conv_mag = conv_reference(np.abs(x), np.abs(w), None, **conv_kw) + _channel(np.abs(b if bias else 0), c.ndim)
        bounds["c"] = fp32_bound(int(np.prod(w.shape[1:])), conv_mag)
    model = _model(nodes, {"x": x}, outputs, inits)
    return Case(name, model, {"x": x}, expected, bounds, [not conv_output_too], conv_dims=nd, into="Conv")


def conv_transpose_bn_case(name, x_shape=(2, 4, 5, 4), out_channels=6, kernel=(3, 3), bias=True, groups=1,
                           strides=None, pads=None, dilations=None, output_padding=None, eps=1e-5, seed=7) -> Case:
    """ConvTranspose [+bias] -> BN: the scale applies per output channel, axis 1 of the weight within a group."""
    rng = _rng(seed)
    nd = len(x_shape) - 2
    x = _f32(rng.standard_normal(x_shape))
    w = _f32(rng.standard_normal((x_shape[1], out_channels // groups, *kernel)) / np.sqrt(np.prod(kernel)))
    b = _f32(rng.standard_normal(out_channels)) if bias else None
    p = bn_params(out_channels, rng)
    eps32 = float(np.float32(eps))
    kw = dict(strides=strides, pads=pads, dilations=dilations, output_padding=output_padding, groups=groups)
    onnx_names = {"strides": "strides", "pads": "pads", "dilations": "dilations", "output_padding": "output_padding",
                  "groups": "group"}
    attrs = {onnx_names[k]: v for k, v in kw.items() if v is not None}
    inits = {"W": w, **({"B": b} if bias else {}), **_bn_inits(p)}
    nodes = [helper.make_node("ConvTranspose", ["x", "W"] + (["B"] if bias else []), ["c"], name="deconv", **attrs),
             _bn_node("c", "y", eps)]
    y = bn_inference_reference(conv_transpose_reference(x, w, b, **kw), p, eps32)
    s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps32)
    folded_abs = conv_transpose_reference(np.abs(x), np.abs(w), **kw) * _channel(np.abs(s), nd + 2)
    extra = np.abs(s) * (np.abs(b if b is not None else 0) + np.abs(p["mean"])) + np.abs(p["bias"])
    terms = x_shape[1] // groups * int(np.prod(kernel))
    bound = fp32_bound(terms, folded_abs + _channel(extra, nd + 2))
    model = _model(nodes, {"x": x}, {"y": y.shape}, inits)
    return Case(name, model, {"x": x}, {"y": y}, {"y": bound}, [True], conv_dims=nd, into="ConvTranspose")


def gemm_bn_case(name, rows=5, features_in=12, features_out=7, trans_b=1, alpha=1.0, beta=1.0, with_c=True,
                 eps=1e-5, seed=8) -> Case:
    """Gemm(x, W[, C]) -> BatchNorm1d over the output features (Linear -> BN1d)."""
    rng = _rng(seed)
    x = _f32(rng.standard_normal((rows, features_in)))
    w_math = _f32(rng.standard_normal((features_in, features_out)) / np.sqrt(features_in))
    w = w_math.T.copy() if trans_b else w_math
    c = _f32(rng.standard_normal(features_out))
    p = bn_params(features_out, rng)
    eps32 = float(np.float32(eps))
    inits = {"W": w, **({"C": c} if with_c else {}), **_bn_inits(p)}
    nodes = [helper.make_node("Gemm", ["x", "W"] + (["C"] if with_c else []), ["g"], name="gemm", transB=trans_b,
                              alpha=alpha, beta=beta), _bn_node("g", "y", eps)]
    product = float(np.float32(alpha)) * (np.asarray(x, np.float64) @ np.asarray(w_math, np.float64))
    bias = float(np.float32(beta)) * np.asarray(c, np.float64) if with_c else 0
    y = bn_inference_reference(product + bias, p, eps32)
    magnitude = abs(alpha) * np.abs(x) @ np.abs(w_math) + np.abs(bias)
    return _dense_case(name, nodes, x, y, magnitude, features_in, p, eps32, inits, "Gemm")


def matmul_bn_case(name, x_shape=(5, 12), weight_shape=(12, 7), weight_left=False, bias=True, bn_axis=1,
                   reshape_to=None, eps=1e-5, seed=9, folded=True) -> Case:
    """MatMul(x, W) or MatMul(W, x) [+ Add(bias)] [-> Reshape] -> BN over `bn_axis`."""
    rng = _rng(seed)
    x = _f32(rng.standard_normal(x_shape))
    w = _f32(rng.standard_normal(weight_shape) / np.sqrt(weight_shape[-1 if weight_left else -2]))
    product = np.asarray(w, np.float64) @ np.asarray(x, np.float64) if weight_left else \
        np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    channel_axis_of_product = product.ndim - 2 if weight_left else product.ndim - 1
    b = _f32(rng.standard_normal(product.shape[channel_axis_of_product]))
    b_shaped = b.reshape([-1] + [1] * (product.ndim - 1 - channel_axis_of_product))
    bn_input = product + (b_shaped if bias else 0)
    nodes = [helper.make_node("MatMul", ["W", "x"] if weight_left else ["x", "W"], ["m"], name="matmul")]
    inits = {"W": w}
    last = "m"
    if bias:
        nodes.append(helper.make_node("Add", ["m", "B"], ["a"], name="bias"))
        inits["B"], last = b_shaped, "a"
    if reshape_to is not None:
        nodes.append(helper.make_node("Reshape", [last, "shape"], ["r"], name="reshape"))
        inits["shape"] = np.array(reshape_to, np.int64)
        bn_input, last = bn_input.reshape(reshape_to), "r"
    channels = bn_input.shape[bn_axis]
    p = bn_params(channels, rng)
    eps32 = float(np.float32(eps))
    nodes.append(_bn_node(last, "y", eps))
    moved = np.moveaxis(bn_input, bn_axis, 1)
    y = np.moveaxis(bn_inference_reference(moved, p, eps32), 1, bn_axis)
    magnitude = (np.abs(w) @ np.abs(x) if weight_left else np.abs(x) @ np.abs(w)) + (np.abs(b_shaped) if bias else 0)
    terms = weight_shape[-1 if weight_left else -2]
    case = _dense_case(name, nodes, x, y, magnitude.reshape(bn_input.shape), terms, p, eps32, inits, "MatMul", bn_axis)
    case.folded = [folded]
    return case


def _dense_case(name, nodes, x, y, magnitude, terms, p, eps32, inits, into, bn_axis=1) -> Case:
    """`magnitude`: |linear op + bias| computed on absolute values, in y's shape."""
    s = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(p["var"], np.float64) + eps32)
    shape = [1] * y.ndim
    shape[bn_axis] = -1
    scaled = (magnitude + np.abs(np.asarray(p["mean"], np.float64)).reshape(shape)) * np.abs(s).reshape(shape)
    bound = fp32_bound(terms, scaled + np.abs(np.asarray(p["bias"], np.float64)).reshape(shape))
    model = _model(nodes, {"x": x}, {"y": y.shape}, {**inits, **_bn_inits(p)})
    return Case(name, model, {"x": x}, {"y": y}, {"y": bound}, [True], into=into)


def training_case(name, shape=(4, 3, 5, 5), conv=False, relu=False, momentum=0.9, eps=1e-5, seed=2,
                  running_var="onnx") -> Case:
    """[Conv ->] BN(training_mode=1) [-> Relu], running mean/var as graph outputs."""
    rng = _rng(seed)
    x = _f32(rng.standard_normal(shape) * 1.5 + 2.0)  # a non-zero mean exercises the two-pass variance
    p = bn_params(shape[1], rng)
    eps32, m32 = float(np.float32(eps)), float(np.float32(momentum))
    nodes, inits, bn_in, bn_x = [], _bn_inits(p), "x", x
    if conv:
        w = _f32(rng.standard_normal((shape[1], shape[1], 1, 1)))
        nodes.append(helper.make_node("Conv", ["x", "W"], ["c"], name="conv"))
        inits["W"] = w
        bn_in, bn_x = "c", conv_reference(x, w)
    nodes.append(_bn_node(bn_in, "y", eps, extra_outputs=("running_mean", "running_var"), training=True,
                          momentum=momentum))
    y, new_mean, new_var = bn_training_reference(bn_x, p, eps32, m32, running_var)
    y_bound, mean_bound, var_bound = training_bounds(bn_x, p, eps32, m32, new_var)
    final = "y"
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        y, final = np.maximum(y, 0), "z"
    channels = (shape[1],)
    model = _model(nodes, {"x": x}, {final: shape, "running_mean": channels, "running_var": channels}, inits)
    return Case(name, model, {"x": x}, {final: y, "running_mean": new_mean, "running_var": new_var},
                {final: y_bound, "running_mean": mean_bound, "running_var": var_bound}, [False], mode="train")


def inference_cases() -> list[Case]:
    return [
        batchnorm_case((2, 3, 4, 5)),
        batchnorm_case((2, 3, 7), seed=3),
        batchnorm_case((2, 3, 3, 4, 5), seed=4),
        batchnorm_case((2, 3, 4, 5), seed=5, params_as_inputs=True),
        conv_bn_case("conv_bias_bn"),
        conv_bn_case("conv_nobias_bn", bias=False),
        conv_bn_case("grouped_conv_bn", out_channels=6, groups=2),
        conv_bn_case("depthwise_conv_bn", out_channels=8, groups=4),
        conv_bn_case("strided_dilated_padded_conv_bn", x_shape=(2, 4, 11, 9), strides=[2, 1], dilations=[2, 2],
                     pads=[1, 0, 2, 1]),
        conv_bn_case("conv_bn_relu", activation="relu"),
        conv_bn_case("conv_bn_clip", activation="clip"),
        conv_bn_case("conv1d_bn", x_shape=(2, 4, 9), kernel=(3,), pads=[1, 1]),
        conv_bn_case("conv3d_bn", x_shape=(1, 2, 4, 5, 3), out_channels=3, kernel=(2, 2, 2)),
        conv_bn_case("conv_shared_output_bn", conv_output_too=True),
        *linear_fold_cases(),
    ]


def linear_fold_cases() -> list[Case]:
    """BatchNorm after the other linear ops: ConvTranspose, Gemm, MatMul (fold_rules.py)."""
    return [
        conv_transpose_bn_case("conv_transpose_bias_bn"),
        conv_transpose_bn_case("conv_transpose_strided_padded_outpad_bn", bias=False, strides=[2, 2],
                               pads=[1, 0, 1, 1], output_padding=[1, 0]),
        conv_transpose_bn_case("conv_transpose_dilated_bn", dilations=[2, 1], pads=[1, 1, 0, 0]),
        conv_transpose_bn_case("grouped_conv_transpose_bn", out_channels=6, groups=2),
        conv_transpose_bn_case("depthwise_conv_transpose_bn", out_channels=4, groups=4, strides=[2, 2]),
        conv_transpose_bn_case("conv1d_transpose_bn", x_shape=(2, 4, 7), kernel=(4,), strides=[2], pads=[1, 1]),
        conv_transpose_bn_case("conv3d_transpose_bn", x_shape=(1, 2, 3, 4, 3), out_channels=3, kernel=(2, 2, 2),
                               strides=[2, 1, 2]),
        gemm_bn_case("gemm_transb_bn"),
        gemm_bn_case("gemm_alpha_beta_bn", trans_b=0, alpha=0.5, beta=2.0),
        gemm_bn_case("gemm_no_c_bn", with_c=False),
        matmul_bn_case("matmul_add_bn"),
        matmul_bn_case("matmul_bn", bias=False),
        matmul_bn_case("matmul_weight_left_ncl_bn", x_shape=(2, 12, 5), weight_shape=(7, 12), weight_left=True),
        matmul_bn_case("matmul_reshape_bn", reshape_to=(5, 7, 1)),
        matmul_bn_case("matmul_bn_on_the_wrong_axis", x_shape=(2, 5, 12), folded=False),
    ]


def training_cases() -> list[Case]:
    return [
        training_case("train_bn2d"),
        training_case("train_bn1d", shape=(6, 3, 8), seed=6),
        training_case("train_bn3d", shape=(2, 3, 3, 4, 5), seed=7),
        training_case("train_conv_bn_relu", conv=True, relu=True, momentum=0.8, seed=8),
    ]
