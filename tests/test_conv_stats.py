"""Train-mode BatchNorm statistics summed in the epilogue of the conv before it (compile/schedules/conv_stats.py).

Kernel level: the three kernels (shift, conv + partial sums, combine) against a float64 reference, on data
whose channel means are 1e4 with unit spread (where float32 E[y^2] - E[y]^2 keeps no digit), tiny
N*H*W, pixel counts that leave a partial last tile and chunks past the image, padded channel blocks,
strided and grouped convs, NaN and Inf inputs, on both x86 code paths this host runs.
Product level: a train-mode Conv -> BN -> ReLU compiles to the fused kernels (no separate statistics
kernel), says so in its fusion report, and passes `check` against torch and ONNX Runtime.

Tolerances: the output is the conv itself (rtol 1e-5 of the float64 value: a few hundred products summed
in float32); the mean is rounded once to float32 from float64 sums (rtol 1e-7 of a 1e4 mean is float32's
own rounding); the variance rtol 1e-5 (float64 sums of shifted values: the error is set by the float32
conv outputs, not by the summation).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tvm

from bndeploy.compile.schedules.conv2d import DIRECT, ConvSpec, Tiling, choose_tiling, pack_weight, padded_channels
from bndeploy.compile.schedules.conv_stats import (build_conv2d_stats_primfunc, pixel_chunks, shift_primfunc,
                                                   stats_combine_primfunc)
from bndeploy.compile.schedules.isa import AVX2, AVX512, AVX512_HALF_WIDTH_PIPES, isa_for_target
from bndeploy.compile.targets import resolve_target

HOST_ISA = isa_for_target(tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
# AVX-512 code runs the x86-64-avx512 target's tiles and, built for the same target, the ymm tiles a Zen 4
# target takes for 24 and 40 channels.
PATHS = [("x86-64-avx2", AVX2)] + ([("x86-64-avx512", AVX512), ("x86-64-avx512", AVX512_HALF_WIDTH_PIPES)]
                                   if HOST_ISA.name == AVX512.name else [])


def conv_reference(x_nhwc: np.ndarray, weight: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """float64 NHWC conv (OIHW weights, groups, dilation), straight from the definition."""
    pt, pl, pb, pr = spec.padding
    x = np.pad(x_nhwc.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    (sh, sw), (kh, kw), (dh, dw) = spec.strides, spec.kernel, spec.dilation
    out = np.zeros((spec.batch, spec.out_height, spec.out_width, spec.out_channels))
    per_in, per_out = spec.in_per_group, spec.out_per_group
    for o in range(spec.out_channels):
        g = o // per_out
        for i in range(kh):
            for j in range(kw):
                top, left = i * dh, j * dw
                patch = x[:, top:top + sh * spec.out_height:sh, left:left + sw * spec.out_width:sw,
                          g * per_in:(g + 1) * per_in]
                out[..., o] += patch @ weight[o, :, i, j].astype(np.float64)
    return out


def run_fused_statistics(spec: ConvSpec, tiling: Tiling, target_name: str, x: np.ndarray, weight: np.ndarray,
                         bias: np.ndarray):
    """(conv output, mean, variance) from the shift, conv + sums and combine kernels, as the artifact calls them."""
    target = resolve_target(target_name).tvm_target()
    chunks = pixel_chunks(spec, tiling)
    kernels = [shift_primfunc(spec, tiling), build_conv2d_stats_primfunc(spec, tiling, chunks),
               stats_combine_primfunc(spec, tiling, chunks)]
    shift_lib, conv_lib, combine_lib = (tvm.compile(tvm.IRModule({"main": k.with_attr("global_symbol", "main")}), target=target)
                                        for k in kernels)
    padded = padded_channels(spec, tiling)
    t = tvm.runtime.tensor
    data, packed = t(x), t(pack_weight(weight, spec, tiling))
    shift = t(np.zeros(padded, np.float32))
    out = t(np.zeros(spec.output_shape, np.float32))
    s1, s2 = (t(np.zeros((spec.batch, chunks, padded))) for _ in range(2))
    mean, var = (t(np.zeros(spec.out_channels, np.float32)) for _ in range(2))
    shift_lib["main"](data, packed, shift)
    conv_lib["main"](data, packed, shift, out, s1, s2)
    combine_lib["main"](shift, s1, s2, t(bias), mean, var)
    return out.numpy(), mean.numpy(), var.numpy()


# (N, H, W, C_in), C_out, kernel, stride, pad, groups: partial last tiles, padded channel blocks, chunks
# past the image, strides, 1x1 convs, groups, and N*H*W = 2.
SHAPES = [
    ((2, 9, 9, 16), 24, 3, 1, 1, 1),
    ((3, 7, 7, 8), 40, 3, 2, 1, 1),
    ((1, 56, 56, 8), 16, 3, 1, 1, 1),
    ((1, 5, 5, 32), 32, 1, 1, 0, 1),
    ((2, 6, 6, 32), 32, 3, 1, 1, 2),
    ((1, 1, 2, 8), 16, 1, 1, 0, 1),
    ((2, 1, 1, 8), 8, 1, 1, 0, 1),
]


def spec_of(shape, out_channels, kernel, stride, pad, groups) -> ConvSpec:
    return ConvSpec(*shape, out_channels=out_channels, kernel=(kernel, kernel), strides=(stride, stride),
                    padding=(pad,) * 4, groups=groups)


@pytest.mark.parametrize("target_name, isa", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"->{s[1]}k{s[2]}s{s[3]}g{s[5]}")
def test_statistics_in_the_conv_epilogue_match_float64_for_mean_1e4(shape, target_name, isa):
    spec = spec_of(*shape)
    tiling = choose_tiling(spec, isa)
    assert tiling is not None and tiling.kind == DIRECT
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((spec.out_channels, spec.in_per_group, *spec.kernel)) * 0.2).astype(np.float32)
    # per channel: conv of (1e4 + noise) = 1e4 * (sum of the weights) + spread; the bias moves only the mean
    x = (1e4 + rng.standard_normal(spec.input_shape)).astype(np.float32)
    bias = rng.standard_normal(spec.out_channels).astype(np.float32) * 100
    out, mean, var = run_fused_statistics(spec, tiling, target_name, x, weight, bias)
    want = conv_reference(x, weight, spec)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-2)  # |y| ~ 1e4: atol is 1e-6 of it
    np.testing.assert_allclose(mean, want.mean(axis=(0, 1, 2)) + bias, rtol=1e-7, atol=1e-3)
    # the variance of the float32 outputs the kernel produced, so that only the summation is judged
    np.testing.assert_allclose(var, out.astype(np.float64).var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("row, col", [(4, 2), (0, 0)], ids=["inside", "at the shift pixel"])
def test_nan_and_inf_inputs_reach_the_statistics_of_the_channels_they_touch(row, col):
    """A NaN input pixel makes every output channel it feeds NaN in the statistics (as ORT's mean over
    a NaN); an Inf gives an Inf mean and a NaN variance (Inf - Inf), as the two-pass formula does. Also
    at the first pixel, whose output is the shift: an Inf shift is replaced by 0 (finite_shift), else the
    mean would come out NaN."""
    spec = spec_of((1, 6, 6, 8), 16, 1, 1, 0, 1)
    tiling = choose_tiling(spec, AVX2)
    rng = np.random.default_rng(3)
    weight = np.abs(rng.standard_normal((16, 8, 1, 1))).astype(np.float32)
    for bad, expect_mean in ((np.nan, np.nan), (np.inf, np.inf)):
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        x[0, row, col, 3] = bad
        out, mean, var = run_fused_statistics(spec, tiling, "x86-64-avx2", x, weight, np.zeros(16, np.float32))
        assert np.isnan(mean).all() if np.isnan(expect_mean) else np.isposinf(mean).all()
        assert np.isnan(var).all()
        assert np.isfinite(np.delete(out.reshape(-1, 16), row * 6 + col, axis=0)).all()


# --------------------------------------------------------------------------------------------------
# Through the product: export, compile, check


@pytest.fixture(scope="module")
def compiled_train(exported, tmp_path_factory):
    from bndeploy.compile import compile_model

    def build(name: str):
        (artifact,) = compile_model(exported(name)["train"] / "model.onnx", ["cpu"], tmp_path_factory.mktemp(name) / "cpu")
        return artifact, json.loads((artifact / "artifact.json").read_text())

    return build


def test_train_conv_bn_relu_sums_its_statistics_in_the_conv_and_passes_check(compiled_train):
    from bndeploy.runtime import check

    artifact, manifest = compiled_train("conv-bias-bn-relu")
    kernels = manifest["kernels"]
    assert any(k.startswith("bndeploy_conv2d_direct_stats") for k in kernels), kernels
    assert not any(re.fullmatch(r"bndeploy_batch_stats\d*", k) for k in kernels), kernels  # no second read of y
    (entry,) = manifest["fusion"]
    assert entry["statistics"].startswith(f"fused into {entry['into']}")
    report = check(artifact)
    assert report.exit_code == 0, report.summary()


def test_a_depthwise_conv_keeps_its_statistics_kernel_and_the_report_says_why(compiled_train):
    artifact, manifest = compiled_train("conv-bn-depthwise")
    assert any(re.fullmatch(r"bndeploy_batch_stats\d*", k) for k in manifest["kernels"]), manifest["kernels"]
    (entry,) = manifest["fusion"]
    assert "no register-tiled direct kernel" in entry["statistics"]


def train_conv_bn_relu(groups: int):
    """Conv 3x3 (16 -> 32 channels, `groups`) -> BatchNormalization(training_mode=1) -> Relu, with the
    updated running mean and variance as outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    inits = [c("w", rng.standard_normal((32, 16 // groups, 3, 3)) * 0.3), c("gamma", rng.uniform(0.5, 2, 32)),
             c("beta", rng.standard_normal(32)), c("mean", rng.standard_normal(32)), c("var", rng.uniform(0.5, 2, 32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, group=groups),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b", "rm", "rv"],
                              training_mode=1, momentum=0.9),
             helper.make_node("Relu", ["b"], ["y"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
               for n, shape in (("y", [2, 32, 7, 7]), ("rm", [32]), ("rv", [32]))]
    g = helper.make_graph(nodes, "train", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 7, 7])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("special", [np.nan, np.inf], ids=["nan", "inf"])
def test_train_statistics_put_nan_and_inf_where_onnxruntime_does(special, tmp_path):
    """A NaN or Inf input pixel in one group of a grouped conv: the batch statistics, outputs and running
    statistics of that group's channels become non-finite exactly where ORT's do, the other group's stay
    finite and within the train-mode tolerance."""
    import onnx
    import onnxruntime as ort

    from bndeploy.compile import compile_model
    from bndeploy.runtime import load_artifact

    model = train_conv_bn_relu(groups=2)
    onnx.save(model, tmp_path / "model.onnx")
    (artifact,) = compile_model(tmp_path / "model.onnx", ["cpu"], tmp_path / "artifact")
    manifest = json.loads((artifact / "artifact.json").read_text())
    assert manifest["fusion"][0]["statistics"].startswith("fused into")
    x = np.random.default_rng(2).standard_normal((2, 16, 7, 7)).astype(np.float32)
    x[1, 3, 4, 5] = special  # an input channel of the first group only
    got = load_artifact(artifact).run({"x": x})
    want = dict(zip(("y", "rm", "rv"), ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})))
    for name, expected in want.items():
        actual = got[name]
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{name}: NaN positions")
        np.testing.assert_array_equal(np.isinf(actual), np.isinf(expected), err_msg=f"{name}: Inf positions")
        finite = np.isfinite(expected)
        assert finite.any(), "the other group must stay finite for the test to mean anything"
        np.testing.assert_allclose(actual[finite], expected[finite], atol=1e-4, rtol=1e-4)
