"""bndeploy's CPU schedules (compile/schedules/): applied, and numerically equal to TVM's unscheduled build.

fp32 tolerance: |bndeploy - reference| <= 1e-4 + 1e-4 * |reference| (reductions of up to a few
hundred products, summed in a different order than the reference).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

from bndeploy.bench import bn_relax_module
from bndeploy.compile.cpu import build_cpu, schedule_module
from bndeploy.compile.schedules import SCHEDULED_ATTR, BatchStatsSpec, ConvSpec, Tiling, build_batch_stats_primfunc, build_conv2d_primfunc, choose_tiling

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
ATOL = RTOL = 1e-4


def loop_kinds(func: tirx.PrimFunc) -> set[str]:
    """Loop annotations present in the PrimFunc (this TVM has no Python statement visitor)."""
    text = func.script()
    return {kind for kind in ("parallel", "vectorized", "unroll") if f"T.{kind}(" in text}


def run_vm(executable, *arrays):
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy") else [out.numpy()]


def conv_model(x_shape, layers, rng):
    """ONNX chain of Conv (+bias) (+Relu); layers: (out_channels, kernel, stride, pad, bias, relu)."""
    nodes, inits, current, channels = [], [], "x", x_shape[1]
    for i, (oc, k, stride, pad, bias, relu) in enumerate(layers):
        w = (rng.standard_normal((oc, channels, k, k)) / np.sqrt(channels * k * k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inputs = [current, f"w{i}"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(oc).astype(np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], pads=[pad] * 4, strides=[stride] * 2))
        current = f"c{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
        channels = oc
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), keep_params_in_input=False)


def test_conv_kernel_is_register_tiled_parallel_and_vectorised():
    spec = ConvSpec(1, 64, 56, 56, 64, (3, 3), padding=(1, 1, 1, 1))
    tiling = choose_tiling(spec)
    func = build_conv2d_primfunc(spec, tiling, has_bias=True, relu=True)
    assert {"parallel", "vectorized", "unroll"} <= loop_kinds(func)
    weight = func.params[1]
    assert [int(d) for d in weight.shape] == [64 // tiling.oc_block, 3, 3, 64, tiling.oc_block]  # packed
    assert tiling.oc_block % 16 == 0 and tiling.accumulators <= 28
    assert bool(func.attrs[SCHEDULED_ATTR])


@pytest.mark.parametrize("channels, width, tiling", [(64, 56, Tiling(64, 7)), (256, 14, Tiling(64, 7)), (32, 14, Tiling(32, 14))])
def test_tiling_fills_registers_with_fewest_loads(channels, width, tiling):
    assert choose_tiling(ConvSpec(1, channels, width, width, channels, (3, 3), padding=(1, 1, 1, 1))) == tiling


def test_batch_statistics_use_many_accumulator_lanes():
    assert BatchStatsSpec(32, 64, 56, 56).lanes == 64 and BatchStatsSpec(3, 5, 7, 7).lanes == 1


@pytest.mark.parametrize(
    "x_shape, layers",
    [
        ((1, 32, 14, 14), [(32, 3, 1, 1, True, True)]),
        ((2, 16, 13, 13), [(32, 3, 2, 1, True, False), (64, 1, 1, 0, False, True)]),  # stride, odd width, 1x1
        ((1, 3, 20, 20), [(16, 7, 2, 3, True, True)]),  # stem-like: few input channels, 7x7
    ],
)
def test_build_cpu_conv_matches_unscheduled_build(x_shape, layers):
    rng = np.random.default_rng(0)
    mod = conv_model(x_shape, layers, rng)
    scheduled = schedule_module(mod, TARGET)
    conv_kernels = [gv.name_hint for gv in scheduled.functions if gv.name_hint.startswith("bndeploy_conv2d")]
    assert conv_kernels, "conv2d was not routed to bndeploy's kernel"
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = run_vm(build_cpu(mod, TARGET), x)[0]
    want = run_vm(tvm.compile(mod, target=TARGET), x)[0]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_every_kernel_is_scheduled_parallel_and_vectorised():
    mod, _ = bn_relax_module((4, 32, 16, 16), training=True)
    scheduled = schedule_module(mod, TARGET)
    prim_funcs = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert "bndeploy_batch_stats" in prim_funcs
    for name, func in prim_funcs.items():
        assert func.attrs is not None and SCHEDULED_ATTR in func.attrs, name
    normalise = [f for n, f in prim_funcs.items() if len(f.params[-1].shape) == 4 and int(f.params[-1].shape[0]) == 4]
    assert normalise and all({"parallel", "vectorized"} <= loop_kinds(f) for f in normalise)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_matches_unscheduled_build(training):
    mod, _ = bn_relax_module((4, 16, 8, 8), training)
    x = np.random.default_rng(3).standard_normal((4, 16, 8, 8)).astype(np.float32) * 3 + 1
    got, want = run_vm(build_cpu(mod, TARGET), x), run_vm(tvm.compile(mod, target=TARGET), x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (3, 5, 7, 7)])  # 64-lane and scalar (49) planes
def test_train_statistics_are_accurate_for_mean_1e4(shape):
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    spec = BatchStatsSpec(*shape)
    lib = tvm.compile(tvm.IRModule({"main": build_batch_stats_primfunc(spec)}), target=TARGET)
    mean, var = (tvm.runtime.tensor(np.zeros(shape[1], np.float32)) for _ in range(2))
    lib["main"](tvm.runtime.tensor(x.reshape(shape[0], shape[1], -1)), mean, var)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), x64.mean(axis=(0, 2, 3)), rtol=1e-7)  # float32 rounding of 1e4
    np.testing.assert_allclose(var.numpy(), x64.var(axis=(0, 2, 3)), rtol=1e-5)


def test_small_resnet_compiles_fast_and_matches():
    rng = np.random.default_rng(5)
    layers = [(32, 3, 1, 1, True, True), (32, 3, 1, 1, True, True), (64, 3, 2, 1, True, True), (64, 3, 1, 1, True, True),
              (128, 3, 2, 1, True, True), (128, 1, 1, 0, True, False)]
    mod = conv_model((1, 16, 32, 32), layers, rng)
    start = time.perf_counter()
    executable = build_cpu(mod, TARGET)
    assert time.perf_counter() - start < 30  # typically 2-5 s; generous for shared CI cores
    x = rng.standard_normal((1, 16, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run_vm(executable, x)[0], run_vm(tvm.compile(mod, target=TARGET), x)[0], atol=ATOL, rtol=RTOL)
