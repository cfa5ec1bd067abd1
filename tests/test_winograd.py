"""The Winograd F(2x2, 3x3) conv kernel (compile/schedules/winograd.py): the transform is the conv, its
error stays well inside the fp32 inference tolerance, NaN and Inf land where ONNX Runtime puts them, and
only the convs it suits are routed to it.

Error budget: the default fp32 inference tolerance is |got - ORT| <= 1e-5 + 1e-4 * |ORT|. Against a
float64 reference the kernel's error must use at most WINOGRAD_MARGIN of that tolerance per element (F(2x2)
measured 0.10-0.15 on 64-256 channels, the direct kernel 0.13-0.20; F(4x4, 3x3) measured 1.3-2.1, which
is why the kernel is F(2x2)), leaving the rest for ONNX Runtime's own rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from bndeploy.compile.cpu import build_cpu, schedule_module
from bndeploy.compile.onnx_import import import_onnx
from bndeploy.compile.schedules.conv2d import ConvSpec
from bndeploy.compile.schedules.conv_schedule import schedule_conv
from bndeploy.compile.schedules.isa import AVX2, isa_for_target
from bndeploy.compile.schedules.winograd import (A_T, B_T, BAND_BYTES, GUARD_LIMIT, G, band_rows, bands_pay,
                                                 pack_winograd_weight, tile_grid, weights_allow_winograd,
                                                 winograd_compute, winograd_tiling)
from bndeploy.compile.targets import resolve_target
from bndeploy.compile.tir_pipeline import keep_tiles_on_stack
from test_cpu_schedules import conv_onnx, kernel_names, onnxruntime_run, run_vm, runnable_x86_targets
from test_tir_pipeline import allocations, lower_without_builtins, parallel_loops

ATOL, RTOL = 1e-5, 1e-4  # bndeploy.tolerance.FP32_INFERENCE
WINOGRAD_MARGIN = 0.5
WINOGRAD_CONDITION_BOUND = 8  # |error| <= 8 u sum|x||w| per output (measured at most 2.1 u on mean-1e4 data)


def correlate3x3(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The 2x2 outputs of a 3x3 cross-correlation (what ONNX Conv computes) over a 4x4 tile."""
    return np.array([[np.sum(d[y:y + 3, x:x + 3] * g) for x in range(2)] for y in range(2)])


def test_the_transforms_compute_the_convolution():
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
        winograd = A_T @ ((G @ g @ G.T) * (B_T @ d @ B_T.T)) @ A_T.T
        np.testing.assert_allclose(winograd, correlate3x3(d, g), rtol=0, atol=1e-12)


def test_an_unguarded_transform_would_turn_inf_into_nan():
    """Why the kernel scans its input: one Inf meets its own negation inside B^T d B, so the tile's outputs
    become NaN where the direct conv (and ONNX Runtime) give +-Inf."""
    d, g = np.ones((4, 4)), np.ones((3, 3))
    d[1, 1] = np.inf
    with np.errstate(invalid="ignore"):
        winograd = A_T @ ((G @ g @ G.T) * (B_T @ d @ B_T.T)) @ A_T.T
    assert np.all(np.isinf(correlate3x3(d, g))) and np.all(np.isnan(winograd))


def _kernel(spec: ConvSpec, target_name: str):
    target = resolve_target(target_name).tvm_target()
    tiling = winograd_tiling(spec, isa_for_target(target))
    assert tiling is not None
    lib = tvm.compile(tvm.IRModule({"main": schedule_conv(winograd_compute(spec, tiling))}), target=target)
    return lib, tiling


def _run(lib, spec, tiling, x, w):
    transformed, direct = pack_winograd_weight(w, spec, tiling)
    out = tvm.runtime.tensor(np.zeros(spec.output_shape, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, transformed, direct)), out)
    return out.numpy()


def _reference(x: np.ndarray, w: np.ndarray, padding: tuple[int, int, int, int]) -> np.ndarray:
    """float64 NHWC conv through torch (CPU); padding (top, left, bottom, right)."""
    import torch

    top, left, bottom, right = padding
    nchw = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64).transpose(0, 3, 1, 2)), (left, right, top, bottom))
    out = torch.nn.functional.conv2d(nchw, torch.from_numpy(w.astype(np.float64)))
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("batch, size, channels, out_channels, padding", [
    (1, 16, 64, 64, (1, 1, 1, 1)), (2, 9, 128, 96, (1, 1, 1, 1)), (1, 8, 256, 256, (1, 1, 1, 1)),
    (1, 12, 64, 64, (0, 0, 0, 0)),  # no border: a 10x10 output
    (2, 11, 64, 64, (0, 1, 1, 0)),  # asymmetric (ONNX auto_pad SAME_LOWER/UPPER): an odd 11x11 output
    (1, 40, 64, 64, (1, 1, 1, 1)),  # 10 bands of 2 tile rows, each padded to whole register tiles
    (2, 30, 64, 64, (1, 1, 1, 1)),  # 5 bands of 3 tile rows per image
])
def test_error_uses_a_small_share_of_the_inference_tolerance(target, batch, size, channels, out_channels, padding):
    spec = ConvSpec(batch, size, size, channels, out_channels, (3, 3), padding=padding)
    lib, tiling = _kernel(spec, target)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    w = (rng.standard_normal((out_channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    want = _reference(x, w, padding)
    margin = np.abs(_run(lib, spec, tiling, x, w) - want) / (ATOL + RTOL * np.abs(want))
    assert margin.max() <= WINOGRAD_MARGIN, f"error at {margin.max():.2f} of the tolerance"


NON_FINITE = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "beyond the guard": 4 * GUARD_LIMIT}


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("padding", [1, 0], ids=["zero border", "no border (no padded copies)"])
def test_nan_and_inf_land_where_onnxruntime_puts_them(target, padding):
    """Each special value at a tile corner, a tile edge and an image border, through the whole compiled
    pipeline (bias and ReLU fused), against ONNX Runtime: the same NaN and Inf positions, the same finite
    values within tolerance."""
    rng = np.random.default_rng(2)
    x_shape = (1, 64, 12, 12)
    model = conv_onnx(x_shape, [(64, 3, 1, padding, 1, True)], rng)
    tvm_target = resolve_target(target).tvm_target()
    assert any("winograd" in k for k in kernel_names(schedule_module(import_onnx(model), tvm_target)))
    executable = build_cpu(import_onnx(model), tvm_target)
    for name, value in NON_FINITE.items():
        x = rng.standard_normal(x_shape).astype(np.float32)
        x[0, 3, 4, 4], x[0, 7, 5, 8], x[0, 1, 0, 11] = value, value, value
        got, want = run_vm(executable, x)[0], onnxruntime_run(model, x)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaN positions, input {name}")
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"+Inf positions, input {name}")
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"-Inf positions, input {name}")
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4, err_msg=f"input {name}")
    x = rng.standard_normal(x_shape).astype(np.float32)  # and back: ordinary inputs after special ones
    np.testing.assert_allclose(run_vm(executable, x)[0], onnxruntime_run(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec, chosen", [
    (ConvSpec(1, 14, 14, 64, 64, (3, 3), padding=(1, 1, 1, 1)), True),
    (ConvSpec(8, 7, 7, 512, 512, (3, 3), padding=(1, 1, 1, 1)), True),
    (ConvSpec(1, 14, 14, 32, 64, (3, 3), padding=(1, 1, 1, 1)), False),  # reduction too short
    (ConvSpec(1, 14, 14, 64, 64, (3, 3), strides=(2, 2), padding=(1, 1, 1, 1)), False),
    (ConvSpec(1, 14, 14, 64, 64, (3, 3), padding=(1, 1, 1, 1), groups=2), False),
    (ConvSpec(1, 14, 14, 64, 64, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)), False),
    (ConvSpec(1, 14, 14, 64, 60, (3, 3), padding=(1, 1, 1, 1)), False),  # output channels not whole vectors
    (ConvSpec(1, 6, 6, 64, 64, (3, 3), padding=(1, 1, 1, 1)), False),  # 9 tiles: the transforms would dominate
    (ConvSpec(1, 14, 14, 64, 64, (5, 5), padding=(2, 2, 2, 2)), False),
])
def test_only_the_convs_it_suits_are_routed_to_it(spec, chosen):
    assert (winograd_tiling(spec, AVX2) is not None) is chosen


def test_weights_that_could_overflow_a_transform_keep_the_direct_kernel():
    w = np.ones((64, 64, 3, 3), np.float32)
    assert weights_allow_winograd(w)
    assert not weights_allow_winograd(np.where(np.arange(9).reshape(3, 3) == 4, np.nan, w).astype(np.float32))
    assert not weights_allow_winograd(w * np.float32(1e20))


# --------------------------------------------------------------------------------------------------
# Train mode: batch statistics summed in the output transform (the conv_stats.py design; the same data
# and tolerances as tests/test_conv_stats.py: channel means of 1e4 with unit spread)


def run_winograd_statistics(spec: ConvSpec, target_name: str, x: np.ndarray, w: np.ndarray, bias: np.ndarray):
    """(conv output, mean, variance) from the shift, Winograd conv + sums and combine kernels, as the artifact calls them."""
    from bndeploy.compile.schedules.conv_stats import shift_primfunc, stats_combine_primfunc
    from bndeploy.compile.schedules.winograd import build_winograd_stats_primfunc, fallback_tiling, statistics_chunks

    target = resolve_target(target_name).tvm_target()
    tiling = winograd_tiling(spec, isa_for_target(target))
    direct_tiling = fallback_tiling(spec, tiling)
    chunks = statistics_chunks(spec, tiling)
    kernels = [shift_primfunc(spec, direct_tiling), build_winograd_stats_primfunc(spec, tiling),
               stats_combine_primfunc(spec, direct_tiling, chunks)]
    shift_lib, conv_lib, combine_lib = (tvm.compile(tvm.IRModule({"main": k.with_attr("global_symbol", "main")}),
                                                    target=target) for k in kernels)
    t = tvm.runtime.tensor
    transformed, direct = (t(a) for a in pack_winograd_weight(w, spec, tiling))
    data, shift = t(x), t(np.zeros(spec.out_channels, np.float32))
    out = t(np.zeros(spec.output_shape, np.float32))
    s1, s2 = (t(np.zeros((spec.batch, chunks, spec.out_channels))) for _ in range(2))
    mean, var = (t(np.zeros(spec.out_channels, np.float32)) for _ in range(2))
    shift_lib["main"](data, direct, shift)
    conv_lib["main"](data, transformed, direct, shift, out, s1, s2)
    combine_lib["main"](shift, s1, s2, t(bias), mean, var)
    return out.numpy(), mean.numpy(), var.numpy()


# (N, H, W, C_in), C_out: odd sizes (a tile's pixels past the image), one band per image, many bands (the
# kernel's own bands: 5 of 3 tile rows for 30x30), and whole-image stages with statistics chunks (256 channels)
STATISTICS_SHAPES = [((2, 9, 9, 64), 64), ((1, 8, 8, 64), 128), ((3, 16, 12, 64), 64), ((1, 30, 30, 64), 64),
                     ((1, 10, 10, 256), 256)]


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("shape, out_channels", STATISTICS_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_statistics_in_the_output_transform_match_float64_for_mean_1e4(target, shape, out_channels):
    from test_conv_stats import conv_reference

    spec = ConvSpec(*shape, out_channels=out_channels, kernel=(3, 3), padding=(1, 1, 1, 1))
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((out_channels, shape[3], 3, 3)) * 0.2).astype(np.float32)
    x = (1e4 + rng.standard_normal(spec.input_shape)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32) * 100
    out, mean, var = run_winograd_statistics(spec, target, x, w, bias)
    want = conv_reference(x, w, spec)
    # The output's error against the sum's condition, u * sum |x| |w| (u = 2^-24): measured up to 2.1 here;
    # near the zero border, where the transforms meet 1e4-sized differences, it exceeds the direct conv's
    # random-walk error (rtol 1e-5 of |y| in test_conv_stats), so the bound is stated on the condition.
    condition = conv_reference(np.abs(x), np.abs(w), spec) * 2.0 ** -24
    assert np.all(np.abs(out - want) <= WINOGRAD_CONDITION_BOUND * condition)
    # the statistics of the float32 outputs the kernel produced, so that only the summation is judged
    own = out.astype(np.float64)
    np.testing.assert_allclose(mean, own.mean(axis=(0, 1, 2)) + bias, rtol=1e-7, atol=1e-3)
    np.testing.assert_allclose(var, own.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("row, col", [(4, 5), (0, 0)], ids=["inside", "at the shift pixel"])
def test_statistics_of_nan_and_inf_inputs_are_the_direct_convs(row, col):
    """Through the guard: a NaN input gives NaN statistics; an Inf input (positive weights) an Inf mean and
    a NaN variance, as the direct conv's outputs give (unguarded, the transform would make them all NaN);
    also at the first pixel, whose output is the shift."""
    spec = ConvSpec(1, 8, 8, 64, 64, (3, 3), padding=(1, 1, 1, 1))
    rng = np.random.default_rng(3)
    w = np.abs(rng.standard_normal((64, 64, 3, 3))).astype(np.float32)
    for bad in (np.nan, np.inf):
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        x[0, row, col, 3] = bad
        out, mean, var = run_winograd_statistics(spec, "x86-64-avx2", x, w, np.zeros(64, np.float32))
        assert (np.isnan(mean).all() if np.isnan(bad) else np.isposinf(mean).all()), mean
        assert np.isnan(var).all()
        touched = np.zeros((8, 8), bool)
        touched[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = True
        assert np.isfinite(out[0][~touched]).all()
        assert (np.isnan(out[0][touched]).all() if np.isnan(bad) else np.isposinf(out[0][touched]).all())


def test_conv_algorithm_direct_keeps_every_conv_on_the_direct_kernel():
    from bndeploy.compile.schedules.relax_rewrite import CONV_ALGORITHM_ATTR

    model = conv_onnx((1, 64, 12, 12), [(64, 3, 1, 1, 1, True)], np.random.default_rng(0))
    target = resolve_target("x86-64-avx2").tvm_target()
    for algorithm, kind in (("auto", "winograd"), ("direct", "direct")):
        mod = import_onnx(model).with_attr(CONV_ALGORITHM_ATTR, algorithm)
        convs = [k for k in kernel_names(schedule_module(mod, target)) if "conv2d" in k]
        assert convs and all(kind in k for k in convs), (algorithm, convs)


def test_an_unknown_conv_algorithm_is_refused_in_one_line():
    from bndeploy.compile import CompileSettings
    from bndeploy.errors import BndeployError

    with pytest.raises(BndeployError, match="conv_algorithm must be one of auto, direct"):
        CompileSettings(conv_algorithm="fastest").validate()


@pytest.mark.parametrize("spec, bands", [
    (ConvSpec(1, 40, 40, 64, 64, (3, 3), padding=(1, 1, 1, 1)), 10),
    (ConvSpec(2, 30, 30, 64, 64, (3, 3), padding=(1, 1, 1, 1)), 2 * 5),
    (ConvSpec(8, 28, 28, 128, 128, (3, 3), padding=(1, 1, 1, 1)), 8 * 7),
    (ConvSpec(1, 14, 14, 256, 256, (3, 3), padding=(1, 1, 1, 1)), None),  # U of 4 MiB: whole-image stages
])
def test_each_band_task_holds_only_its_own_transformed_tiles(spec, bands):
    """Banded: one parallel loop of `bands` tasks, inside it the transformed input and the GEMM outputs
    allocated for one band (under BAND_BYTES, so they stay in the core's L2) and the register tiles on the
    stack; nothing else allocated per task."""
    target = resolve_target("x86-64-avx512").tvm_target()
    tiling = winograd_tiling(spec, isa_for_target(target))
    assert bands_pay(spec, tiling) == (bands is not None)
    if bands is None:
        return
    lowered = keep_tiles_on_stack(lower_without_builtins(tvm.IRModule({"main": schedule_conv(winograd_compute(spec, tiling))})))
    (band_loop,) = [loop for loop in parallel_loops(lowered["main"].body) if int(loop.extent) == bands]
    per_task = [a for a in allocations(band_loop.body) if not a.annotations.get("disable_lower_builtin")]
    rows, cols = tile_grid(spec)
    band_tiles = -(-band_rows(spec, tiling) * cols // tiling.pixel_block) * tiling.pixel_block
    sizes = sorted(int(np.prod([int(d) for d in a.buffer.shape])) for a in per_task)
    assert sizes == [16 * band_tiles * spec.in_channels, 16 * band_tiles * spec.out_channels]
    assert 4 * sum(sizes) <= BAND_BYTES
