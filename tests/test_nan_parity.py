"""NaN and ±Inf come out of a compiled CPU artifact where ONNX Runtime puts them.

Each case is a small ONNX graph and an input with NaN, +Inf and -Inf at known positions among ordinary
values; the artifact (built by compile_model, as users build it) must match ORT element for element:
NaN where ORT has NaN, the same infinities, and the finite values within the fp32 tolerance
(1e-5 + 1e-4·|x|: one rounding per op, no long reductions). The activations cover every op the compile
stage lowers with a max/min/select; the conv cases cover bndeploy's fused conv epilogues (direct and
depthwise kernels), where one NaN pixel must poison exactly the outputs whose window contains it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bndeploy.compile import CompileSettings, compile_model
from bndeploy.runtime import load_artifact
from test_cpu_schedules import runnable_x86_targets

SPECIALS = np.array([np.nan, np.inf, -np.inf, -7.0, -1.0, -0.25, 0.0, 0.5, 2.0, 7.0], np.float32)
ATOL, RTOL = 1e-5, 1e-4


def graph(nodes, x_shape, initializers=(), opset=18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def const(name, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def activation(op, *initializers, **attrs) -> onnx.ModelProto:
    inputs = ["x"] + [i.name for i in initializers]
    return graph([helper.make_node(op, inputs, ["y"], **attrs)], (1, SPECIALS.size), initializers)


ACTIVATIONS = {
    "relu": activation("Relu"),
    "clip_relu6": activation("Clip", const("lo", 0.0), const("hi", 6.0)),
    "clip_lower_only": activation("Clip", const("lo", -1.0)),
    "max_constant": activation("Max", const("m", np.ones((1, SPECIALS.size)))),
    "max_nan_operand": activation("Max", const("m", np.where(np.arange(SPECIALS.size) % 3 == 0, np.nan, 1.0))),
    "min_constant": activation("Min", const("m", np.ones((1, SPECIALS.size)))),
    "leaky_relu": activation("LeakyRelu", alpha=0.1),
    "prelu": activation("PRelu", const("slope", 0.25)),
    "hard_sigmoid": activation("HardSigmoid"),
    "hard_swish": activation("HardSwish"),
    "elu": activation("Elu"),
    "selu": activation("Selu"),
    "sigmoid": activation("Sigmoid"),
    "tanh": activation("Tanh"),
    "softplus": activation("Softplus"),
    "thresholded_relu": activation("ThresholdedRelu", alpha=0.5),
}


def conv_block(x_shape, out_channels, groups, epilogue) -> onnx.ModelProto:
    """Conv (+bias) -> epilogue, channel counts and kernel as a real network would have them."""
    rng = np.random.default_rng(0)
    channels = x_shape[1]
    weight = rng.standard_normal((out_channels, channels // groups, 3, 3)).astype(np.float32) * 0.3
    inits = [const("w", weight), const("b", rng.standard_normal(out_channels))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=groups)]
    nodes += epilogue(inits)
    return graph(nodes, x_shape, inits)


def conv_transpose_block(x_shape, out_channels, epilogue) -> onnx.ModelProto:
    """ConvTranspose 4x4 stride 2 (+bias) -> epilogue, as a GAN generator has it: bndeploy's dense kernel and
    col2im gather, where a NaN or Inf input pixel must reach exactly the outputs its taps land on."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((x_shape[1], out_channels, 4, 4)).astype(np.float32) * 0.3
    inits = [const("w", weight), const("b", rng.standard_normal(out_channels))]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1])]
    nodes += epilogue(inits)
    return graph(nodes, x_shape, inits)


def relu(inits):
    return [helper.make_node("Relu", ["c"], ["y"])]


def relu6(inits):
    inits += [const("lo", 0.0), const("hi", 6.0)]
    return [helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]


def silu(inits):
    return [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]


def tanh(inits):
    return [helper.make_node("Tanh", ["c"], ["y"])]


def residual_relu(inits):
    return [helper.make_node("Add", ["c", "x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]


CONV_BLOCKS = {
    "conv_relu": conv_block((1, 16, 9, 9), 16, 1, relu),
    "conv_relu6": conv_block((1, 16, 9, 9), 32, 1, relu6),
    "conv_silu": conv_block((1, 16, 9, 9), 16, 1, silu),
    "conv_residual_relu": conv_block((1, 16, 9, 9), 16, 1, residual_relu),
    "grouped_conv_relu": conv_block((1, 32, 9, 9), 32, 4, relu),
    "depthwise_relu6": conv_block((1, 32, 9, 9), 32, 32, relu6),
    "conv_transpose_relu": conv_transpose_block((1, 16, 5, 5), 16, relu),
    "conv_transpose_tanh": conv_transpose_block((1, 16, 5, 5), 8, tanh),
}


def special_input(shape, rng) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    positions = rng.choice(flat.size, size=min(flat.size, 3 * SPECIALS.size), replace=False)
    flat[positions[:3]] = [np.nan, np.inf, -np.inf]
    return x


def compiled_output(model, tmp_path, x, target: str = "cpu") -> np.ndarray:
    onnx.save(model, tmp_path / "model.onnx")
    (artifact,) = compile_model(tmp_path / "model.onnx", [target], tmp_path / "artifact", CompileSettings())
    return load_artifact(artifact).run({"x": x})["y"]


def onnxruntime_output(model, x) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def assert_same_specials(got, want):
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions differ from ONNX Runtime")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg="+Inf positions differ")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg="-Inf positions differ")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_puts_nan_and_inf_where_onnxruntime_does(name, tmp_path):
    model = ACTIVATIONS[name]
    x = SPECIALS.reshape(1, -1)
    want = onnxruntime_output(model, x)
    assert_same_specials(compiled_output(model, tmp_path, x), want)


@pytest.mark.parametrize("name", sorted(CONV_BLOCKS))
def test_fused_conv_epilogue_puts_nan_and_inf_where_onnxruntime_does(name, tmp_path):
    model = CONV_BLOCKS[name]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = special_input(shape, np.random.default_rng(1))
    want = onnxruntime_output(model, x)
    assert np.isnan(want).any(), "the case must produce NaN outputs to test anything"
    assert_same_specials(compiled_output(model, tmp_path, x), want)


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("shape, groups", [((1, 104, 28, 28), 13), ((2, 64, 14, 14), 4)])
def test_grouped_conv_border_reads_put_nan_and_inf_where_onnxruntime_does(target, shape, groups, tmp_path):
    """RegNet's 8 per group on 28x28 (row-aligned tiles reading the border through conditions, partitioned
    rows of 7-pixel tiles on AVX2) and 16 per group on 14x14 (AVX2: 6-pixel tiles reading the copy split by
    group), on both x86 code paths."""
    model = conv_block(shape, shape[1], groups, relu)
    x = special_input(list(shape), np.random.default_rng(1))
    want = onnxruntime_output(model, x)
    assert np.isnan(want).any() and np.isinf(want).any()
    assert_same_specials(compiled_output(model, tmp_path, x, target), want)


def test_relu_of_nan_is_nan_not_zero(tmp_path):
    """The reported bug, stated plainly: one NaN in, one NaN out (TVM's own lowering gives 0)."""
    x = np.array([[np.nan, -1.0, 1.0]], np.float32)
    model = graph([helper.make_node("Relu", ["x"], ["y"])], x.shape)
    got = compiled_output(model, tmp_path, x)
    assert np.isnan(got[0, 0]) and got[0, 1] == 0.0 and got[0, 2] == 1.0
