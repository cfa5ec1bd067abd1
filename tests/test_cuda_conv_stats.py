"""Train-mode BatchNorm statistics in the CUDA conv's epilogue (compile/cuda/conv_stats.py, fuse_statistics.py).

No GPU is needed for most of this file. The kernels' compute is target-independent, so it is built for this
CPU and judged against a float64 reference (kernel level) and against ONNX Runtime (the rewritten Relax
module, whole networks). The GPU schedule is judged by what it compiles to: one kernel holds the conv and
the statistics' cross-thread reduction (warp shuffles, shared memory), no kernel reduces the conv's
output again, and the library carries SASS and PTX. Only the last test runs the kernels, on a GPU.

Tolerances. Output: the conv itself (rtol 1e-5 of the float64 value: a few hundred products summed in
float32). Mean: rounded once to float32 from float64 (rtol 1e-7 of a 1e4 mean is float32's own
rounding). Variance: each tile sums d and d^2 in float32 over at most 64 pixels, d measured from the
tile's first pixel; that costs at most about 64 u (u = 6e-8) times (1 + delta^2 / sigma^2), delta the
first pixel's distance from the tile mean (a few sigma at most): rtol 1e-5 keeps a 7x margin over the 1.5e-6
seen here and still fails a formula error (which is O(1)) or float32 E[y^2] - E[y]^2 (which loses every
digit at mean 1e4: the first test shows it on its data).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from bndeploy.compile import cuda
from bndeploy.compile.compiler import CompileSettings, load_source, lower_to_relax
from bndeploy.compile.cuda.conv_stats import (WEIGHT_STAGE_BYTES, GpuTile, TileGrid, conv2d_stats_compute, gpu_tile,
                                              pack_gpu_weight, stats_combine_compute)
from bndeploy.compile.cuda.fuse_statistics import fuse_conv_statistics
from bndeploy.compile.schedules.conv2d import ConvSpec
from test_conv_stats import conv_reference

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA Toolkit) not installed")
SM80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def spec_of(batch, channels, size, out_channels, kernel, stride=1, pad=None, dilation=1) -> ConvSpec:
    pad = kernel // 2 * dilation if pad is None else pad
    return ConvSpec(batch, size, size, channels, out_channels, (kernel, kernel), strides=(stride, stride),
                    padding=(pad,) * 4, dilation=(dilation, dilation))


def run_kernels_on_cpu(spec: ConvSpec, x_nchw: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """(conv output NCHW, mean, variance) from the two kernels' compute, built for this CPU."""
    tile = gpu_tile(spec)
    grid = TileGrid(spec, tile)
    conv_lib, combine_lib = (
        tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm")
        for f in (conv2d_stats_compute(spec, tile), stats_combine_compute(spec, tile)))
    t = tvm.runtime.tensor
    out = t(np.zeros(grid.output_shape(), np.float32))
    s1, s2 = (t(np.zeros(grid.sums_shape(), np.float32)) for _ in range(2))
    mean, var = (t(np.zeros(spec.out_channels, np.float32)) for _ in range(2))
    conv_lib["main"](t(x_nchw), t(pack_gpu_weight(weight, grid)), out, s1, s2)
    combine_lib["main"](out, s1, s2, t(bias), mean, var)
    return out.numpy(), mean.numpy(), var.numpy()


# Unpadded convs of 1e4 + unit noise give outputs of mean ~1e4 and unit spread in every channel (a padded
# border would spread them by thousands). Partial tiles at the bottom and right, output channels padded to
# a block (24 -> 24, 6 -> 8, 40 -> 64), strides, dilation, 1x1, a 7x7 stem on 3 channels, N*H*W = 2.
SPECS = [
    spec_of(2, 16, 12, 24, 3, pad=0),
    spec_of(3, 8, 15, 40, 3, stride=2, pad=0),
    spec_of(1, 4, 13, 6, 3, dilation=2, pad=0),
    spec_of(2, 32, 7, 32, 1, pad=0),
    spec_of(1, 3, 26, 16, 7, stride=2, pad=0),
    spec_of(2, 8, 1, 8, 1, pad=0),
]
PADDED = [spec_of(2, 16, 10, 24, 3), spec_of(1, 3, 20, 16, 7, stride=2, pad=3)]


def spec_id(s: ConvSpec) -> str:
    return f"{s.batch}x{s.in_channels}x{s.height}->{s.out_channels}k{s.kernel[0]}s{s.strides[0]}d{s.dilation[0]}p{s.padding[0]}"


def judge_kernels(spec: ConvSpec):
    """Run the kernels on 1e4 + noise; check output, mean and variance; return the exact variance and the
    kernels' variance error."""
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((spec.out_channels, spec.in_channels, *spec.kernel)) * 0.2).astype(np.float32)
    x = (1e4 + rng.standard_normal((spec.batch, spec.in_channels, spec.height, spec.width))).astype(np.float32)
    bias = (rng.standard_normal(spec.out_channels) * 100).astype(np.float32)
    out, mean, var = run_kernels_on_cpu(spec, x, weight, bias)
    want = conv_reference(x.transpose(0, 2, 3, 1), weight, spec).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-2)
    # the mean and variance of the float32 outputs the kernels produced, so that only the summation is judged
    exact = out.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, out.astype(np.float64).mean(axis=(0, 2, 3)) + bias, rtol=1e-7, atol=1e-3)
    np.testing.assert_allclose(var, exact, rtol=1e-5, atol=1e-9)
    return out, exact, np.abs(var - exact)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_tile_statistics_match_float64_for_mean_1e4(spec):
    out, exact, error = judge_kernels(spec)
    naive = (out * out).mean(axis=(0, 2, 3), dtype=np.float32) - out.mean(axis=(0, 2, 3), dtype=np.float32) ** 2
    assert np.abs(naive - exact).max() > 100 * error.max()  # the data is hard enough to tell the formulas apart


@pytest.mark.parametrize("spec", PADDED, ids=spec_id)
def test_padded_borders_are_zeros_of_the_input(spec):
    judge_kernels(spec)


@pytest.mark.parametrize("first_pixel", [False, True], ids=["inside", "at a tile's first pixel"])
def test_nan_and_inf_reach_the_statistics_as_onnxruntime_puts_them(first_pixel):
    """A NaN input makes the mean and variance of every channel it feeds NaN; an Inf makes the mean Inf
    and the variance NaN (Inf - Inf), as ORT's two-pass formula does; also when it lands on the pixel a
    tile's sums are centred on (replaced by 0 there, else the mean would be NaN instead of Inf)."""
    spec = spec_of(1, 8, 12, 16, 1, pad=0)
    rng = np.random.default_rng(3)
    weight = np.abs(rng.standard_normal((16, 8, 1, 1))).astype(np.float32)
    row, col = (8, 0) if first_pixel else (5, 3)  # (8, 0) starts the second row of 8x8 tiles
    for bad in (np.nan, np.inf):
        x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
        x[0, 3, row, col] = bad
        _, mean, var = run_kernels_on_cpu(spec, x, weight, np.zeros(16, np.float32))
        assert np.isnan(mean).all() if np.isnan(bad) else np.isposinf(mean).all()
        assert np.isnan(var).all()


def test_tiles_follow_the_conv_shape():
    assert gpu_tile(spec_of(1, 64, 56, 64, 3)) == GpuTile()  # 32 channels per block, 8 input channels a step
    assert gpu_tile(spec_of(1, 64, 56, 6, 3)).channels == 8  # whole thread registers of 4 channels
    stem = gpu_tile(spec_of(1, 3, 224, 64, 7, stride=2, pad=3))
    assert stem.reduce_step == 3  # a divisor of the 3 input channels
    wide = gpu_tile(spec_of(1, 64, 14, 64, 5))
    assert wide.reduce_step == 4  # 8 input channels' 5x5 weights would not fit the budget
    assert wide.reduce_step * 5 * 5 * wide.channels * 4 <= WEIGHT_STAGE_BYTES


# --------------------------------------------------------------------------------------------------
# The Relax rewrite, built for this CPU against ONNX Runtime


def train_model(batch=2, channels=8, size=9, out_channels=12, group=1, bias=True) -> onnx.ModelProto:
    """Conv 3x3 -> BatchNormalization(training_mode=1) -> Relu, the running statistics as outputs."""
    rng = np.random.default_rng(5)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [c("w", rng.standard_normal((out_channels, channels // group, 3, 3)) * 0.3),
             c("gamma", rng.uniform(0.5, 2, out_channels)), c("beta", rng.standard_normal(out_channels)),
             c("mean", rng.standard_normal(out_channels)), c("var", rng.uniform(0.5, 2, out_channels))]
    conv_inputs = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits.append(c("b", rng.standard_normal(out_channels) * 5))
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], pads=[1] * 4, group=group, name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b_", "rm", "rv"],
                              training_mode=1, momentum=0.9, name="bn"),
             helper.make_node("Relu", ["b_"], ["y"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
               for n, shape in (("y", [batch, out_channels, size, size]), ("rm", [out_channels]), ("rv", [out_channels]))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])
    model = helper.make_model(helper.make_graph(nodes, "train", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def rewritten(path) -> tvm.IRModule:
    mod, _, _ = lower_to_relax(load_source(path), CompileSettings())
    return fuse_conv_statistics(mod)


def run_on_cpu(mod: tvm.IRModule, x: np.ndarray) -> list[np.ndarray]:
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return [o.numpy() for o in out]


@pytest.mark.parametrize("bias", [True, False], ids=["conv+bias", "conv"])
def test_rewritten_train_block_matches_onnxruntime(bias, tmp_path):
    model = train_model(bias=bias)
    onnx.save(model, tmp_path / "model.onnx")
    mod = rewritten(tmp_path / "model.onnx")
    assert [int(k) for k in mod.attrs["bndeploy.statistics_fused_convs"]] == [0]
    called = {gv.name_hint for gv in mod.functions}
    assert {"bndeploy_cuda_conv2d_stats", "bndeploy_cuda_batch_stats_combine"} <= called
    x = (np.random.default_rng(1).standard_normal((2, 8, 9, 9)) * 3 + 50).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for name, got, expected in zip(("y", "running_mean", "running_var"), run_on_cpu(mod, x), want):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_a_grouped_conv_is_left_to_the_statistics_kernel(tmp_path):
    onnx.save(train_model(group=2), tmp_path / "model.onnx")
    mod = rewritten(tmp_path / "model.onnx")
    assert list(mod.attrs["bndeploy.statistics_fused_convs"]) == []
    assert not any("conv2d_stats" in gv.name_hint for gv in mod.functions)


def test_only_a_mean_over_batch_and_pixels_is_replaced(tmp_path):
    """A mean over the channel axis of the same conv output is not a BatchNorm statistic: it stays."""
    model = train_model()
    graph = model.graph
    graph.node.append(helper.make_node("ReduceMean", ["c"], ["channel_mean"], axes=[1], keepdims=1))
    graph.output.append(helper.make_tensor_value_info("channel_mean", TensorProto.FLOAT, [2, 1, 9, 9]))
    onnx.save(model, tmp_path / "model.onnx")
    x = np.random.default_rng(4).standard_normal((2, 8, 9, 9)).astype(np.float32)
    got = run_on_cpu(rewritten(tmp_path / "model.onnx"), x)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_tiny_resnet_in_train_mode_matches_onnxruntime(exported):
    """Every conv of a small ResNet (stem, 3x3, strided 3x3, 1x1 shortcuts, residual adds after the BN)."""
    path = exported("tiny-resnet")["train"] / "model.onnx"
    mod = rewritten(path)
    assert len(mod.attrs["bndeploy.statistics_fused_convs"]) == 9
    session = ort.InferenceSession(str(path))
    x = np.random.default_rng(2).standard_normal([d.dim_value for d in onnx.load(path).graph.input[0].type
                                                  .tensor_type.shape.dim]).astype(np.float32)
    want = session.run(None, {session.get_inputs()[0].name: x})
    got = run_on_cpu(mod, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# What the GPU schedule compiles to


def test_gpu_schedule_puts_the_statistics_in_the_conv_kernel(tmp_path):
    onnx.save(train_model(batch=4, channels=16, size=28, out_channels=32), tmp_path / "model.onnx")
    mod, _, _ = lower_to_relax(load_source(tmp_path / "model.onnx"), CompileSettings())
    scheduled = cuda.schedule_for_cuda(mod, SM80)
    reductions = cuda.module_reduction_schedules(scheduled)
    by_function = {}
    for r in reductions:
        by_function.setdefault(r.function, []).append(r)
    (conv_name,) = [name for name in by_function if name.startswith("bndeploy_cuda_conv2d_stats")]
    stats = next(r for r in by_function[conv_name] if r.block == "stats")
    assert stats.reduction_extent == 64 and stats.serial_per_thread == 2  # 64 pixels over 32 threads
    pixels = 4 * 28 * 28
    assert not [r for r in reductions if r.reduction_extent >= pixels], reductions  # nothing re-reads the output
    cuda.require_parallel_reductions(scheduled)


@needs_nvcc
@pytest.mark.slow
def test_train_artifact_holds_the_fused_kernel_as_sass_and_ptx(tmp_path):
    from bndeploy.compile import compile_model

    onnx.save(train_model(), tmp_path / "model.onnx")
    (artifact,) = compile_model(tmp_path / "model.onnx", ["cuda"], tmp_path / "a", CompileSettings(dump=True))
    manifest = json.loads((artifact / "artifact.json").read_text())
    (entry,) = manifest["fusion"]
    assert entry["statistics"] == "fused into conv: summed in the conv kernel's epilogue"
    kernels = manifest["kernels"]
    assert "bndeploy_cuda_conv2d_stats_kernel" in kernels, kernels
    assert not any(re.search(r"(^|_)(mean|variance|sum)\d*_kernel$", k) for k in kernels), kernels
    found = cuda.inspect_cuda_library(artifact / "model.so")
    assert found["archs"] == ["sm_80"] and found["ptx"] == ["compute_80"]
    assert "bndeploy_cuda_conv2d_stats_kernel" in found["kernels"]
    usage = found["resources"]["bndeploy_cuda_conv2d_stats_kernel"]
    assert usage["local"] == 0, usage  # the register tile and the reduction's values never spill
    assert 0 < usage["shared"] <= 48 * 1024 and usage["registers"] * 256 <= 64 * 1024, usage  # a block fits an SM
    source = (artifact / "dump" / cuda.CUDA_SOURCE_NAME).read_text()
    conv_kernel = source[source.index("bndeploy_cuda_conv2d_stats_kernel(float"):]
    conv_kernel = conv_kernel[:conv_kernel.index("\n}\n")]
    assert "__shfl_down_sync" in conv_kernel and "__shared__" in conv_kernel


@pytest.mark.gpu
@pytest.mark.slow
def test_fused_train_block_runs_on_the_gpu(tmp_path):
    from test_cuda import has_gpu

    from bndeploy.compile import compile_model
    from bndeploy.runtime import load_artifact

    if shutil.which("nvcc") is None or not has_gpu("sm_80"):
        pytest.skip("needs nvcc and a CUDA GPU of compute capability 8.0 or newer")
    model = train_model(batch=8, channels=32, size=30, out_channels=64)
    onnx.save(model, tmp_path / "model.onnx")
    (artifact,) = compile_model(tmp_path / "model.onnx", ["cuda"], tmp_path / "a")
    x = (np.random.default_rng(6).standard_normal((8, 32, 30, 30)) + 1e3).astype(np.float32)
    got = load_artifact(artifact).run({"x": x})
    want = dict(zip(("y", "rm", "rv"), ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})))
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_the_report_says_why_a_cuda_conv_keeps_its_statistics_kernel():
    from bndeploy.compile.passes import place_statistics

    entry = {"batchnorm": "bn", "into": "conv", "op": "Conv", "folded": False, "reason": "training mode",
             "statistics": "separate"}
    (placed,) = place_statistics([entry], [], "cuda")
    assert "conv is not a one-group float32 conv" in placed["statistics"]
    (fused,) = place_statistics([entry], ["conv"], "cuda")
    assert fused["statistics"] == "fused into conv: summed in the conv kernel's epilogue"
