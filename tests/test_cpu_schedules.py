"""bndeploy's CPU kernels (compile/schedules/): routed, fused, register-tiled from the target's ISA, and
numerically equal to ONNX Runtime for every conv class of real CNNs.

fp32 tolerance: |bndeploy - ORT| <= 1e-4 + 1e-4 * |ORT| (sums of up to a few thousand products in a
different order than ORT: the typical error is about sqrt(K) * 6e-8 of the summed magnitude, ~1e-6 here).
"""

from __future__ import annotations

import re
import time

import numpy as np
import onnxruntime as ort
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, s_tir, te, tirx, topi
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

from bndeploy.compile.cpu import build_cpu, schedule_module
from bndeploy.compile.onnx_import import import_onnx
from bndeploy.compile.schedules import SCHEDULED_ATTR, BatchStatsSpec, ConvSpec, build_batch_stats_primfunc, choose_tiling
from bndeploy.compile.schedules import conv2d, convert_to_channels_last, interleave_grouped_inputs, rewrite_to_kernels
from bndeploy.compile.schedules.conv2d import DEPTHWISE, DIRECT, INTERLEAVED, PAIRED, conv2d_compute, direct_tiling
from bndeploy.compile.schedules.conv_schedule import schedule_conv
from bndeploy.compile.schedules.isa import (AVX2, AVX512, AVX512_HALF_WIDTH_PIPES, NEON32, NEON64, NEON64_CARMEL,
                                           isa_for_target)
from bndeploy.compile.targets import resolve_target
from bndeploy.compile.tir_exprs import loads_in, reduction_bindings, vars_in

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
ATOL = RTOL = 1e-4
ALL_ISAS = (AVX512, AVX2, NEON64, NEON64_CARMEL, NEON32)


def runnable_x86_targets() -> list[str]:
    """Both x86 code paths where this CPU runs them (AVX2 code runs on an AVX-512 host)."""
    names = ["x86-64-avx2"]
    if isa_for_target(HOST).name == AVX512.name:
        names.append("x86-64-avx512")
    return names


def loop_kinds(func: tirx.PrimFunc) -> set[str]:
    """Loop annotations present in the PrimFunc (this TVM has no Python statement visitor)."""
    text = func.script()
    return {kind for kind in ("parallel", "vectorized", "unroll") if f"T.{kind}(" in text}


def run_vm(executable, *arrays):
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy") else [out.numpy()]


def conv_onnx(x_shape, layers, rng):
    """ONNX chain of Conv (+bias) (+Relu); layers: (out_channels, kernel, stride, pad, groups, relu)."""
    nodes, inits, current, channels = [], [], "x", x_shape[1]
    for i, (oc, k, stride, pad, groups, relu) in enumerate(layers):
        w = (rng.standard_normal((oc, channels // groups, k, k)) / np.sqrt(channels // groups * k * k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(oc).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], pads=[pad] * 4, strides=[stride] * 2,
                                      group=groups))
        current = f"c{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
        channels = oc
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bn_relax_module(shape, training: bool, eps: float = 1e-5):
    """Relax BatchNorm as bndeploy's graph passes emit it: inference as per-channel scale/shift,
    training as mean, variance = mean((x - mean)^2), normalise, running-statistic updates."""
    from tvm import relax

    c = shape[1]
    rng = np.random.default_rng(1)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    running_mean, running_var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    per_channel = lambda v: relax.const(v.reshape(1, c, 1, 1))  # noqa: E731
    with bb.function("main", [x]):
        with bb.dataflow():
            if not training:
                scale = gamma / np.sqrt(running_var + eps)
                out = bb.emit_output(relax.op.add(relax.op.multiply(x, per_channel(scale)), per_channel(beta - running_mean * scale)))
            else:
                axes = [0, 2, 3]
                mean = bb.emit(relax.op.mean(x, axes, keepdims=True))
                centered = bb.emit(relax.op.subtract(x, mean))
                var = bb.emit(relax.op.mean(relax.op.square(centered), axes, keepdims=True))
                inv_std = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, "float32"))))
                y = bb.emit(relax.op.add(relax.op.multiply(relax.op.multiply(centered, inv_std), per_channel(gamma)), per_channel(beta)))
                momentum = relax.const(0.9, "float32")
                keep = lambda run, batch: relax.op.add(  # noqa: E731
                    relax.op.multiply(relax.const(run), momentum),
                    relax.op.multiply(relax.op.reshape(batch, (c,)), relax.const(0.1, "float32")))
                out = bb.emit_output(relax.Tuple([y, bb.emit(keep(running_mean, mean)), bb.emit(keep(running_var, var))]))
        bb.emit_func_output(out)
    return bb.get(), (gamma, beta, running_mean, running_var)


def onnxruntime_run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def kernel_names(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]


# --------------------------------------------------------------------------------------------------
# The register tile model


def test_isa_classes_of_the_named_targets():
    assert isa_for_target(resolve_target("x86-64-avx2").tvm_target()) is AVX2
    assert isa_for_target(resolve_target("x86-64-avx512").tvm_target()) is AVX512
    for arm in ("cortex-a72", "cortex-a76", "cortex-a78ae", "aarch64"):
        assert isa_for_target(resolve_target(arm).tvm_target()) is NEON64
    assert isa_for_target(resolve_target("carmel").tvm_target()) is NEON64_CARMEL
    assert isa_for_target(resolve_target("armv7").tvm_target()) is NEON32
    zen4 = resolve_target('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}').tvm_target()
    assert isa_for_target(zen4) is AVX512_HALF_WIDTH_PIPES


@pytest.mark.parametrize("out_channels, block", [(24, 24), (40, 40), (64, None), (96, None)])
def test_half_width_pipes_take_ymm_blocks_where_zmm_blocks_would_pad(out_channels, block):
    """Where a ymm FMA costs half a zmm one (Zen 4), 24 and 40 channels take blocks of 8-lane vectors, not
    zmm blocks a quarter or a sixth padding; channels that fill zmm vectors keep the zmm tile."""
    spec = ConvSpec(1, 28, 28, 144, out_channels, (1, 1), padding=(0, 0, 0, 0))
    full, half = choose_tiling(spec, AVX512), choose_tiling(spec, AVX512_HALF_WIDTH_PIPES)
    assert full.lanes == 16
    if block is None:
        assert half == full
    else:
        assert full.channel_block > out_channels and (half.channel_block, half.lanes) == (block, 8)
        vectors = half.channel_block // half.lanes
        assert half.pixel_block * vectors + vectors + AVX512.broadcast_registers <= AVX512.registers


@pytest.mark.skipif("x86-64-avx512" not in runnable_x86_targets(), reason="needs a CPU that runs AVX-512 code")
@pytest.mark.parametrize("case", ["1x1 to 24 channels", "3x3 s1", "3x3 s2 odd width"])
def test_half_width_tiles_match_onnxruntime(case, monkeypatch):
    """The ymm tiles a Zen 4 target takes, built for any AVX-512 CPU (the x86-64-avx512 target with the
    Zen 4 model's tiles) and checked against ONNX Runtime."""
    import bndeploy.compile.schedules.relax_rewrite as relax_rewrite

    monkeypatch.setattr(relax_rewrite, "isa_for_target", lambda target: AVX512_HALF_WIDTH_PIPES)
    x_shape, (layer,) = CONV_CLASSES[case]
    out_channels = 40 if layer[0] != 24 else 24  # 40 channels: five ymm vectors
    rng = np.random.default_rng(3)
    model = conv_onnx(x_shape, [(out_channels, *layer[1:])], rng)
    target = resolve_target("x86-64-avx512").tvm_target()
    scheduled = schedule_module(import_onnx(model), target)
    assert any(f":{out_channels}:8:" in f.script() for gv, f in scheduled.functions.items() if "conv2d" in gv.name_hint)
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = run_vm(build_cpu(import_onnx(model), target), x)[0]
    np.testing.assert_allclose(got, onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


REFERENCE_SHAPES = [(1, 56, 56, 64, 64), (8, 28, 28, 128, 128), (1, 14, 14, 256, 256), (1, 7, 7, 512, 512)]


@pytest.mark.parametrize("isa", ALL_ISAS, ids=lambda isa: isa.name)
@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
def test_direct_tile_fits_the_register_file_and_hides_fma_latency(isa, shape):
    tiling = choose_tiling(ConvSpec(*shape, kernel=(3, 3), padding=(1, 1, 1, 1)), isa)
    vectors = tiling.channel_block // isa.lanes
    accumulators = tiling.pixel_block * vectors
    assert tiling.kind == DIRECT and tiling.channel_block % isa.lanes == 0
    assert accumulators + vectors + isa.broadcast_registers <= isa.tile_budget <= isa.registers
    assert accumulators >= isa.min_accumulators


@pytest.mark.parametrize("isa, tile", [(AVX512, (6, 64)), (AVX2, (6, 16)), (NEON64, (6, 16)), (NEON32, (6, 8))])
def test_reference_tile_per_isa(isa, tile):
    """The tiles the model derives for a 3x3 conv 64->64 on 56x56 (pixels x channels): 24 accumulators
    of 32 zmm on AVX-512 (plus 4 weight vectors and a broadcast), 12 of 16 ymm on AVX2, 24 of 32 q
    registers on AArch64 NEON, 12 of 16 on ARMv7 NEON."""
    tiling = choose_tiling(ConvSpec(1, 56, 56, 64, 64, (3, 3), padding=(1, 1, 1, 1)), isa)
    assert (tiling.pixel_block, tiling.channel_block) == tile


def test_grouped_channel_block_stays_inside_a_group():
    """RegNet's 8-channel groups: a direct tile's block never spans two groups (a zero weight times a NaN
    input of another group would leak NaN across groups), so on AVX-512 it is a half vector."""
    tiling = direct_tiling(ConvSpec(1, 28, 28, 64, 64, (3, 3), padding=(1, 1, 1, 1), groups=8), AVX512)
    assert tiling.kind == DIRECT and tiling.channel_block == 8


@pytest.mark.parametrize("isa, per_group, kind, groups_per_vector", [
    (AVX512, 8, PAIRED, 2),  # a ymm FMA takes a whole zmm FMA's slot: two groups' worth of lanes a zmm
    (AVX512, 4, INTERLEAVED, 4),  # ResNeXt's groups of 4
    (AVX512_HALF_WIDTH_PIPES, 8, DIRECT, 1),  # Zen 4: a ymm FMA costs half a zmm one, nothing to gain
    (AVX512_HALF_WIDTH_PIPES, 4, INTERLEAVED, 4),  # an xmm FMA costs half a zmm one too, for a quarter of it
    (AVX2, 8, DIRECT, 1),  # a group fills the ymm
    (AVX2, 4, INTERLEAVED, 2),
    (NEON64, 4, DIRECT, 1),  # a group fills the q register
    (AVX512, 16, DIRECT, 1),
])
def test_groups_narrower_than_a_vector_share_it(isa, per_group, kind, groups_per_vector):
    """Where a vector wider than a group would run its FMAs at a fraction of the peak, the outputs of
    several groups share each vector (their inputs interleaved), or, two groups' worth of lanes (this input
    is no producer's interleaved output), one group's output and input channels in pairs (the paired tile);
    where a narrower vector costs no more than its share, the direct tile keeps one group per block."""
    spec = ConvSpec(1, 28, 28, 128, 128, (3, 3), padding=(1, 1, 1, 1), groups=128 // per_group)
    tiling = choose_tiling(spec, isa)
    assert (tiling.kind, conv2d.groups_per_vector(spec, isa)) == (kind, groups_per_vector)
    if kind in (INTERLEAVED, PAIRED):
        assert tiling.channel_block == isa.lanes


@pytest.mark.parametrize("isa, size, channels, groups, stride, tile", [
    (AVX512, 56, 48, 6, 1, (28, 8)),  # the model's best, 30 pixels, would cross row ends
    (AVX512, 28, 128, 8, 2, (28, 16)),  # 14x14 output: two whole rows per tile
    (AVX512, 7, 440, 55, 1, (7, 8)),
    (AVX2, 28, 104, 13, 1, (7, 8)),  # 14 pixels would take the register the border test needs
    (AVX2, 28, 128, 8, 2, (6, 16)),  # a row-aligned tile of 16 channels would be 1 or 2 pixels: the model's stays
])
def test_grouped_tiles_stay_within_an_output_row_when_the_model_rates_them_close(isa, size, channels, groups, stride, tile):
    """The direct tile of a grouped conv (AVX-512 code takes the interleaved one for groups of 8; Zen 4 and
    AVX2 take this)."""
    tiling = direct_tiling(ConvSpec(1, size, size, channels, channels, (3, 3), strides=(stride, stride),
                                    padding=(1, 1, 1, 1), groups=groups), isa)
    assert (tiling.pixel_block, tiling.channel_block) == tile


@pytest.mark.parametrize("isa, out_channels, kernel, tile", [
    (AVX2, 32, 3, (4, 16)),  # the model's 6 pixels would cross the 112-pixel rows: 4 of them, 28 to a row
    (AVX2, 16, 3, (4, 16)),  # MobileNetV3's stem
    (AVX512, 16, 3, (28, 16)),  # the model's 30 would cross rows
    (AVX512, 32, 3, (14, 32)),  # the model's own tile is row-aligned
    (AVX2, 64, 7, (6, 16)),  # 147 steps: the model's tile, crossing rows
])
def test_a_short_reduction_stem_takes_row_aligned_tiles(isa, out_channels, kernel, tile):
    """A 3x3 stem over 3 channels is 27 reduction steps: a tile crossing a row end pays its pixels' index
    arithmetic over too few FMAs (AVX2: 47% of the FMA peak in 6-pixel tiles, 81% in 4-pixel ones)."""
    spec = ConvSpec(1, 224, 224, 3, out_channels, (kernel, kernel), strides=(2, 2), padding=(kernel // 2,) * 4)
    tiling = choose_tiling(spec, isa)
    assert (tiling.pixel_block, tiling.channel_block) == tile


def _pad_copies(func: tirx.PrimFunc) -> list[tuple[int | None, bool]]:
    """Per pad block: (extent of the parallel loop it runs in, whether the conv's tiles run in the same
    loop's tasks)."""

    def blocks(node, name: str) -> list:
        found = []
        tvm_ffi.structural_walk(node, (s_tir.SBlock, lambda b: found.append(b) if b.name_hint == name else None))
        return found

    loops = []
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda f: loops.append(f) if f.kind == tirx.ForKind.PARALLEL else None))
    copies = []
    for pad in blocks(func.body, "pad"):
        loop = next((loop for loop in loops if any(p.same_as(pad) for p in blocks(loop.body, "pad"))), None)
        copies.append((None, False) if loop is None else (int(loop.extent), bool(blocks(loop.body, "conv_update"))))
    return copies


@pytest.mark.parametrize("target, size, channels, groups, stride, copy", [
    ("x86-64-avx512", 28, 104, 13, 1, None),  # paired: reads its input in place
    ("x86-64-avx512", 28, 128, 32, 1, (16, True)),  # interleaved, 4 groups a vector: 8 vectors x 2 chunks of rows, a copy each
    ("x86-64-avx2", 28, 104, 13, 1, None),  # 7-pixel tiles, four to a row
    ("x86-64-avx512", 28, 128, 8, 2, None),  # two rows per tile
    ("cortex-a76", 28, 104, 13, 1, None),
    ("x86-64-avx2", 28, 128, 8, 2, (16, True)),  # 6-pixel tiles cross row ends: 8 groups x 2 chunks pad their own
    ("x86-64-avx2", 14, 512, 32, 1, (32, True)),  # 32 groups: one task each
    ("x86-64-avx512", 28, 104, 1, 1, (30, False)),  # dense: a copy of its own in parallel rows
])
def test_grouped_conv_reads_its_border_in_row_aligned_tiles(target, size, channels, groups, stride, copy):
    """No padding pass where every tile's rows are known: a grouped conv's row-aligned tiles read the zero
    border through conditions. Where tiles cross row ends, each (group, chunk of tiles) task pads what its
    tiles read before computing them."""
    from bndeploy.compile.schedules.conv2d import conv2d_compute
    from bndeploy.compile.schedules.conv_schedule import schedule_conv

    tvm_target = resolve_target(target).tvm_target()
    spec = ConvSpec(1, size, size, channels, channels, (3, 3), strides=(stride, stride), padding=(1, 1, 1, 1),
                    groups=groups)
    with tvm_target:
        func = schedule_conv(conv2d_compute(spec, choose_tiling(spec, isa_for_target(tvm_target))))
    assert _pad_copies(func) == ([copy] if copy else [])


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("size, groups, stride", [(5, 8, 1), (9, 8, 1), (9, 8, 2), (10, 2, 1), (7, 3, 2), (14, 4, 1)])
def test_grouped_border_reads_match_onnxruntime(target, size, groups, stride):
    """Grouped convs on small maps, where every tile touches the border: tiles within a row (AVX2: 5 of a
    10-pixel row, 4 of 4), of whole rows (AVX-512: 25, 27, 16 and 28 pixels), and tiles crossing row ends
    that read a copy each task pads for its group (AVX2: 13 pixels on a 5x5 map; 6 on 14x14, two tasks
    per group, the second's last tile partial). Borders, strides, group boundaries and the batch against
    ONNX Runtime."""
    channels = 48 if groups == 3 else 64
    rng = np.random.default_rng(3)
    model = conv_onnx((2, channels, size, size), [(channels, 3, stride, 1, groups, True)], rng)
    x = rng.standard_normal((2, channels, size, size)).astype(np.float32)
    got = run_vm(build_cpu(import_onnx(model), resolve_target(target).tvm_target()), x)[0]
    np.testing.assert_allclose(got, onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


def test_a_conv_summing_batch_statistics_keeps_the_direct_tile():
    """Train mode: only the direct kernel sums a BatchNorm's statistics in its epilogue (conv_stats.py), so
    a grouped conv feeding one keeps it where it would otherwise share vectors between groups."""
    spec = ConvSpec(1, 28, 28, 104, 104, (3, 3), padding=(1, 1, 1, 1), groups=13)
    assert choose_tiling(spec, AVX512).kind == PAIRED
    assert choose_tiling(spec, AVX512, batch_statistics=True).kind == DIRECT


INTERLEAVED_CASES = [  # (size, channels, groups, stride)
    (14, 104, 13, 1),  # groups of 8, odd count: the last vector's second group is missing
    (9, 48, 6, 2),  # stride 2, odd size
    (7, 88, 11, 1),  # a 7x7 map: tiles of whole rows, the last one's missing rows not written
    (10, 64, 16, 1),  # groups of 4
    (11, 40, 10, 2),  # groups of 4 on AVX-512: the last vector holds 2 of its 4
]


def _grouped_runs(cases, taken, batch: int = 1):
    """(target, size, channels, groups, stride, id) of the grouped 3x3 `cases` for which `taken(spec, isa)`
    holds on each x86 target this CPU runs."""
    for target in runnable_x86_targets():
        isa = isa_for_target(resolve_target(target).tvm_target())
        for size, channels, groups, stride in cases:
            spec = ConvSpec(batch, size, size, channels, channels, (3, 3), strides=(stride, stride), padding=(1, 1, 1, 1),
                            groups=groups)
            if taken(spec, isa):
                yield target, size, channels, groups, stride, f"{target}-{size}x{size}-{channels}/{groups}-s{stride}"


def _interleaved_runs():
    for *case, name in _grouped_runs(INTERLEAVED_CASES, lambda spec, isa: conv2d.groups_per_vector(spec, isa) > 1):
        for inner in (False, True):
            yield pytest.param(*case, inner, id=f"{name}-{'inner' if inner else 'first'}")


@pytest.mark.parametrize("target, size, channels, groups, stride, inner", list(_interleaved_runs()))
def test_interleaved_groups_match_onnxruntime(target, size, channels, groups, stride, inner):
    """Groups sharing vectors, as the network's first layer (the copy transposes the NCHW input; AVX-512's
    groups of 8 take the paired tile, which reads the transposed input in place) and after a 1x1 conv (NHWC,
    read in place where the 1x1 writes it interleaved), batch 2: against ONNX Runtime, with a NaN in one group's input and an Inf in
    another's, which must reach exactly the outputs of their own groups that ONNX Runtime's reach."""
    rng = np.random.default_rng(5)
    layers = [(channels, 1, 1, 0, 1, False)] * inner + [(channels, 3, stride, 1, groups, True)]
    model = conv_onnx((2, channels, size, size), layers, rng)
    x = rng.standard_normal((2, channels, size, size)).astype(np.float32)
    if not inner:
        x[0, 1, size // 2, 2], x[1, channels - 1, 0, size - 1] = np.nan, np.inf
    executable = build_cpu(import_onnx(model), resolve_target(target).tvm_target())
    got, want = run_vm(executable, x)[0], onnxruntime_run(model, x)
    assert np.isnan(want).any() == (not inner)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)



@pytest.mark.parametrize("target", [t for t in runnable_x86_targets() if t == "x86-64-avx512"])
@pytest.mark.parametrize("x_shape, kernel, stride, pad, groups", [
    ((2, 104, 1, 1), 3, 1, 1, 13),  # a 1x1 map: a one-row tile, its other rows computed on zeros, not written
    ((2, 64, 9, 9), 1, 1, 0, 8),  # a grouped 1x1: no kernel rows or taps to step over
    ((1, 48, 5, 7), 3, 2, 1, 6),  # not square, stride 2
    ((1, 16, 3, 3), 3, 1, 1, 2),  # two groups
])
def test_paired_tiles_of_odd_shapes_match_onnxruntime(target, x_shape, kernel, stride, pad, groups):
    """The paired tile (AVX-512, groups of 8, an input read as it is) on shapes whose loops of extent 1 TVM
    does not generate, against ONNX Runtime, with a NaN and an Inf in the input."""
    rng = np.random.default_rng(12)
    channels = x_shape[1]
    spec = ConvSpec(x_shape[0], x_shape[2], x_shape[3], channels, channels, (kernel, kernel), strides=(stride, stride),
                    padding=(pad,) * 4, groups=groups)
    assert choose_tiling(spec, AVX512).kind == PAIRED
    model = conv_onnx(x_shape, [(channels, kernel, stride, pad, groups, False)], rng)
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = np.nan, np.inf
    got, want = run_vm(build_cpu(import_onnx(model), resolve_target(target).tvm_target()), x)[0], onnxruntime_run(model, x)
    assert np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)

# A 1x1 conv + ReLU feeding a grouped conv (RegNet's, ResNeXt's): the 1x1 writes its channels in the order
# the grouped conv's interleaved tile reads, which then reads them in place (interleave_inputs.py).
IN_PLACE_CASES = [  # (size, channels, groups, stride)
    (28, 104, 13, 1),  # odd groups: the 1x1 writes 112 channels, the last 8 zero-weight ones
    (24, 48, 6, 2),  # stride 2
    (20, 64, 16, 1),  # groups of 4: four per zmm
    (7, 88, 11, 1),  # half the pixels read the border
]


def _relax_ops(mod: tvm.IRModule) -> list[str]:
    return re.findall(r"R\.(take|nn\.conv2d)\(", mod["main"].script(show_meta=False))


def _interleaved_module(model, target: str) -> tvm.IRModule:
    with resolve_target(target).tvm_target():
        return interleave_grouped_inputs(relax.transform.FoldConstant()(convert_to_channels_last(import_onnx(model))))


@pytest.mark.parametrize("size, channels, groups, stride", IN_PLACE_CASES)
def test_a_producing_conv_writes_the_interleaved_order(size, channels, groups, stride):
    """The pass permutes the 1x1 conv's output channels (padding a short last vector with zero channels) and
    restores the order with a take, which the kernel rewrite then reads in place: no take is left."""
    rng = np.random.default_rng(7)
    model = conv_onnx((1, channels, size, size), [(channels, 1, 1, 0, 1, True), (channels, 3, stride, 1, groups, True)], rng)
    mod = _interleaved_module(model, "x86-64-avx512")
    assert _relax_ops(mod) == ["nn.conv2d", "take", "nn.conv2d"]
    per_vector = conv2d.groups_per_vector(ConvSpec(1, size, size, channels, channels, (3, 3), groups=groups), AVX512)
    producer = next(b.value for b in mod["main"].body.blocks[0].bindings if "conv2d" in str(getattr(b.value, "op", "")))
    assert producer.args[1].value.shape[0] == -(-groups // per_vector) * per_vector * (channels // groups)
    with resolve_target("x86-64-avx512").tvm_target():
        assert "take" not in _relax_ops(rewrite_to_kernels(mod))


def test_a_producing_conv_whose_output_is_used_elsewhere_keeps_its_order():
    """The permuted tensor may feed only the grouped conv: a second use (here a graph output) keeps the copy."""
    rng = np.random.default_rng(7)
    model = conv_onnx((1, 104, 28, 28), [(104, 1, 1, 0, 1, True), (104, 3, 1, 1, 13, True)], rng)
    model.graph.output.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, None))
    assert "take" not in _relax_ops(_interleaved_module(model, "x86-64-avx512"))


@pytest.mark.parametrize("spec, isa", [
    (ConvSpec(1, 22, 22, 128, 128, (3, 3), padding=(1, 1, 1, 1), groups=32), AVX2),  # the border register shrinks the tile
    (ConvSpec(8, 56, 56, 104, 104, (3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=13), AVX512),  # 11 MB input
    (ConvSpec(1, 28, 28, 104, 104, (3, 3), padding=(1, 1, 1, 1), groups=13), AVX512_HALF_WIDTH_PIPES),  # direct tile
])
def test_convs_that_read_a_copy_faster_are_not_fed_in_place(spec, isa):
    assert conv2d.in_place_groups_per_vector(spec, isa) == 1


def _in_place_runs():
    for *case, name in _grouped_runs(IN_PLACE_CASES, lambda spec, isa: conv2d.in_place_groups_per_vector(spec, isa) > 1, batch=2):
        yield pytest.param(*case, id=name)


@pytest.mark.parametrize("target, size, channels, groups, stride", list(_in_place_runs()))
def test_in_place_interleaved_groups_match_onnxruntime(target, size, channels, groups, stride):
    """Read in place, batch 2: against ONNX Runtime, a NaN and an Inf in the network's input (each reaches
    every channel of its pixel's neighbourhood through the 1x1 conv, the zero channels of a short last vector
    too: 0 * Inf is NaN there, and must reach no output) and values near the border."""
    rng = np.random.default_rng(11)
    model = conv_onnx((2, channels, size, size), [(channels, 1, 1, 0, 1, True), (channels, 3, stride, 1, groups, True)], rng)
    x = rng.standard_normal((2, channels, size, size)).astype(np.float32)
    x[0, 3, size // 2, size // 2], x[1, 0, size - 1, 0] = np.nan, np.inf
    got, want = run_vm(build_cpu(import_onnx(model), resolve_target(target).tvm_target()), x)[0], onnxruntime_run(model, x)
    assert np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_depthwise_gets_its_own_kernel():
    tiling = choose_tiling(ConvSpec(1, 56, 56, 96, 96, (3, 3), padding=(1, 1, 1, 1), groups=96), AVX512)
    assert tiling.kind == DEPTHWISE and 96 % tiling.channel_block == 0


# --------------------------------------------------------------------------------------------------
# Every conv class: routed to a bndeploy kernel, fused with bias and ReLU, equal to ONNX Runtime

CONV_CLASSES = {
    "3x3 s1": ((1, 32, 14, 14), [(32, 3, 1, 1, 1, True)]),
    "3x3 s1 wide": ((1, 64, 14, 14), [(64, 3, 1, 1, 1, True)]),
    "3x3 s1 wide odd size": ((2, 64, 15, 15), [(128, 3, 1, 1, 1, True)]),
    "3x3 s2 odd width": ((2, 16, 13, 13), [(32, 3, 2, 1, 1, True)]),
    "1x1 pointwise": ((1, 40, 14, 14), [(24, 1, 1, 0, 1, False)]),
    "7x7 s2 stem": ((1, 3, 33, 33), [(32, 7, 2, 3, 1, True)]),
    "3x3 s2 stem": ((2, 3, 32, 32), [(32, 3, 2, 1, 1, True)]),  # short reduction: row-aligned tiles
    "depthwise 3x3 s1": ((1, 32, 15, 15), [(32, 3, 1, 1, 32, True)]),
    "depthwise 3x3 s2": ((2, 64, 14, 14), [(64, 3, 2, 1, 64, True)]),
    "depthwise 5x5 s2": ((1, 72, 13, 13), [(72, 5, 2, 2, 72, True)]),
    "grouped 8 per group": ((1, 64, 14, 14), [(64, 3, 1, 1, 8, True)]),
    "grouped 16 per group s2": ((1, 64, 14, 14), [(64, 3, 2, 1, 4, True)]),
    "grouped 4 per group (ResNeXt)": ((1, 64, 14, 14), [(64, 3, 1, 1, 16, True)]),  # a quarter of a zmm
    "depthwise 3x3 36 channels": ((1, 36, 9, 9), [(36, 3, 1, 1, 36, True)]),  # no 8 | 36: 4-lane blocks
    "wide classifier 1x1": ((1, 96, 7, 7), [(1000, 1, 1, 0, 1, False)]),
    "1x1 to 24 channels": ((1, 48, 10, 10), [(24, 1, 1, 0, 1, True)]),  # AVX-512: 24 real of a 32-block
}


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("case", sorted(CONV_CLASSES))
def test_conv_class_runs_bndeploy_kernel_and_matches_onnxruntime(case, target):
    x_shape, layers = CONV_CLASSES[case]
    rng = np.random.default_rng(0)
    model = conv_onnx(x_shape, layers, rng)
    tvm_target = resolve_target(target).tvm_target()
    kernels = kernel_names(schedule_module(import_onnx(model), tvm_target))
    convs = [k for k in kernels if "conv2d" in k]
    assert convs and all(k.startswith("fused_bndeploy_conv2d") for k in convs), kernels
    expected_kind = ("depthwise" if case.startswith("depthwise")
                     else "winograd" if case.startswith("3x3 s1 wide") else "direct")
    assert all(expected_kind in k for k in convs), kernels
    if layers[-1][-1]:
        assert all("add" in k and "relu" in k for k in convs), f"bias and ReLU not fused: {kernels}"
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = run_vm(build_cpu(import_onnx(model), tvm_target), x)[0]
    np.testing.assert_allclose(got, onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("x_shape, out_channels", [((1, 1, 1, 1), 1), ((2, 3, 1, 1), 1), ((1, 1, 1, 2), 2)])
def test_a_degenerate_tile_still_compiles_and_matches(x_shape, out_channels):
    """One pixel and one real channel: the writer's loops of extent 1 are not generated (found by the long
    property profile: the schedule unpacked two loops and failed to compile)."""
    rng = np.random.default_rng(0)
    model = conv_onnx(x_shape, [(out_channels, 1, 1, 0, 1, True)], rng)
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = run_vm(build_cpu(import_onnx(model), HOST), x)[0]
    np.testing.assert_allclose(got, onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


# Transposed convs (GAN generators, segmentation decoders, U-Net up-sampling): the dense kernel and a col2im
# gather, bias and activation fused into the gather. name: (input NCHW, out channels, kernel, stride, pads
# (top, left, bottom, right), output_padding, dilation, groups)
CONV_TRANSPOSE_CLASSES = {
    "4x4 s2 p1 (DCGAN)": ((2, 32, 5, 5), 16, 4, 2, (1, 1, 1, 1), (0, 0), 1, 1),
    "3x3 s2 p1 output_padding 1 (decoder)": ((1, 24, 7, 6), 12, 3, 2, (1, 1, 1, 1), (1, 1), 1, 1),
    "2x2 s2 (U-Net)": ((1, 16, 8, 8), 8, 2, 2, (0, 0, 0, 0), (0, 0), 1, 1),
    "4x4 s1 p0 from 1x1 (latent)": ((4, 64, 1, 1), 32, 4, 1, (0, 0, 0, 0), (0, 0), 1, 1),
    "3x3 s1 dilation 2 asymmetric pads": ((1, 8, 6, 5), 8, 3, 1, (1, 0, 2, 1), (0, 0), 2, 1),
    "grouped (NCHW fallback)": ((1, 8, 5, 5), 8, 3, 2, (1, 1, 1, 1), (0, 0), 1, 2),
}


def conv_transpose_onnx(x_shape, out_channels, kernel, stride, pads, output_padding, dilation, groups, rng):
    w = (rng.standard_normal((x_shape[1], out_channels // groups, kernel, kernel)) / kernel).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    top, left, bottom, right = pads
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[stride] * 2, pads=[top, left, bottom, right],
                              output_padding=list(output_padding), dilations=[dilation] * 2, group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("case", sorted(CONV_TRANSPOSE_CLASSES))
def test_conv_transpose_runs_dense_and_col2im_and_matches_onnxruntime(case, target):
    rng = np.random.default_rng(1)
    model = conv_transpose_onnx(*CONV_TRANSPOSE_CLASSES[case], rng)
    tvm_target = resolve_target(target).tvm_target()
    kernels = kernel_names(schedule_module(import_onnx(model), tvm_target))
    if "grouped" in case:
        assert any("conv2d_transpose" in k for k in kernels), kernels  # TVM's NCHW kernel, between transposes
    else:
        assert any(k.startswith("bndeploy_dense") for k in kernels), kernels
        (gather,) = [k for k in kernels if "col2im" in k]
        assert gather.startswith("fused_bndeploy_col2im_add_relu"), kernels  # (and the output transpose)
        assert not any("conv2d_transpose" in k for k in kernels), kernels
    x = rng.standard_normal(CONV_TRANSPOSE_CLASSES[case][0]).astype(np.float32)
    got = run_vm(build_cpu(import_onnx(model), tvm_target), x)[0]
    np.testing.assert_allclose(got, onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


def test_residual_add_and_relu_fuse_into_the_conv_that_feeds_them():
    """ResNet's block end: conv -> +bias -> +identity -> ReLU is one kernel writing from registers."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Conv", ["a", "w", "b"], ["c"], pads=[1] * 4),
             helper.make_node("Add", ["c", "a"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    kernels = kernel_names(schedule_module(import_onnx(model), HOST))
    fused = [k for k in kernels if "conv2d" in k]
    assert len(fused) == 1 and fused[0].count("add") == 2 and "relu" in fused[0], kernels
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_vm(build_cpu(import_onnx(model), HOST), x)[0], onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)



def pointwise_residual_onnx(x_shape, rng):
    """ResNet's block end on a 1x1 conv of as many channels as its input: y = Relu(Conv(a) + b + a), a = Relu(x)."""
    channels = x_shape[1]
    w = numpy_helper.from_array((rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Conv", ["a", "w", "b"], ["c"]),
             helper.make_node("Add", ["c", "a"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# 232 channels: a pixel's channels start mid-line, channel blocks of 24 (AVX2) and 48 (AVX-512) span a
# varying number of lines, and the last block and pixel tile are partial; 1.4 MB of residual, past the
# 512 KiB below which it is taken to be still in cache
RESIDUAL_PREFETCH_SHAPE = (2, 232, 28, 28)


@pytest.mark.parametrize("target", runnable_x86_targets())
def test_tiles_prefetching_the_next_tiles_residual_match_onnxruntime(target):
    """A 1x1 conv adding a residual prefetches, over its first reduction steps, the residual its next tile
    reads (compile/schedules/next_tile_prefetch.py), the last tile its own: the result is ONNX Runtime's,
    with a NaN and an Inf in the input where ORT puts them."""
    rng = np.random.default_rng(6)
    model = pointwise_residual_onnx(RESIDUAL_PREFETCH_SHAPE, rng)
    x = rng.standard_normal(RESIDUAL_PREFETCH_SHAPE).astype(np.float32)
    x[0, 5, 3, 3], x[1, 231, 27, 0] = np.nan, np.inf
    _assert_prefetching_build_matches_onnxruntime(model, x, target)


def _assert_prefetching_build_matches_onnxruntime(model, x: np.ndarray, target: str) -> None:
    """`model` built for `target` prefetches (`prefetcht0`) and gives ONNX Runtime's result on `x`, whose
    NaN and Inf reach the output."""
    executable = build_cpu(import_onnx(model), resolve_target(target).tvm_target())
    assert "prefetcht0" in executable.mod.imports[0].inspect_source("asm")
    got, want = run_vm(executable, x)[0], onnxruntime_run(model, x)
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("target", ["x86-64-avx2", "x86-64-avx512"])
def test_the_residual_prefetched_is_the_residual_the_next_tile_reads(target, monkeypatch):
    """Over the steps of a tile's reduction, its prefetches cover exactly the residual lines (64 bytes of
    memory) the next parallel task's epilogue reads, and no line outside the tensor; the last task
    prefetches its own. (The conv's input, past the cache too, has its own test: not prefetched here.)"""
    from bndeploy.compile.schedules import conv_schedule
    from bndeploy.compile.schedules.next_tile_prefetch import insert_next_tile_prefetches

    monkeypatch.setattr(conv_schedule, "streams_input_outside_cache", lambda *args: False)

    model = pointwise_residual_onnx(RESIDUAL_PREFETCH_SHAPE, np.random.default_rng(6))
    scheduled = schedule_module(import_onnx(model), resolve_target(target).tvm_target())
    (conv,) = [f for gv, f in scheduled.functions.items() if "conv2d" in gv.name_hint]
    func = insert_next_tile_prefetches(conv)
    (task,) = _loops(func.body, lambda loop: loop.kind == tirx.ForKind.PARALLEL)
    (prefetching,) = _loops(task.body, lambda loop: bool(_prefetches_in(loop.body)))
    writer = _realizes(task.body)[-1]
    tasks, output = int(task.extent), writer.block.body.buffer
    tensor_lines = int(np.prod([int(d) for d in output.shape])) * 4 // 64
    for t in (0, tasks // 2 + 1, tasks - 2, tasks - 1):
        prefetched = set()
        for step in range(int(prefetching.extent)):
            values = {prefetching.loop_var.name: step, task.loop_var.name: t}
            prefetched |= {_line(load.source, [_evaluate(i, values) for i in load.indices]) for load in _prefetches_in(prefetching.body)}
        read = _residual_lines_read(task, writer, min(t + 1, tasks - 1))
        assert read <= prefetched and all(0 <= line < tensor_lines for line in prefetched), t
        # the last tile's padded pixels prefetch the tensor's last line instead
        assert prefetched == read or t >= tasks - 2, t


def pointwise_projection_onnx(x_shape, out_channels: int, rng):
    """MobileNetV2's projection: a 1x1 conv to few channels (+ bias), y = Conv(x) + b."""
    w = numpy_helper.from_array((rng.standard_normal((out_channels, x_shape[1], 1, 1)) / np.sqrt(x_shape[1])).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"])], "projection",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# 29x29 pixels: partial last tiles in each image (4 to 29-pixel tiles); 144 channels are 9 lines a pixel,
# 136 are 8.5 (runs start mid-line); 0.9-1 MB of input, past the 512 KiB below which it is taken to be
# still in cache. 24 outputs: one channel block, the next task computes the next pixels; 80: 5 blocks, each
# pixel tile's blocks in consecutive tasks (AVX2 and AVX-512 alike)
INPUT_PREFETCH_SHAPES = [(2, 144, 29, 29), (2, 136, 29, 29)]


@pytest.mark.parametrize("target", ["x86-64-avx2", "x86-64-avx512"])
@pytest.mark.parametrize("x_shape", INPUT_PREFETCH_SHAPES)
@pytest.mark.parametrize("out_channels", [24, 80])
def test_the_input_prefetched_is_the_input_the_next_tile_reads(target, x_shape, out_channels):
    """A pointwise conv's tile prefetches, over its reduction's steps, the input lines of the next parallel
    task that reads other pixels (one run of memory: its pixels' channels), at most one line more where a
    run starts mid-line, and no line outside the tensor; the last tasks prefetch the last task's."""
    from bndeploy.compile.schedules.next_tile_prefetch import insert_next_tile_prefetches

    model = pointwise_projection_onnx(x_shape, out_channels, np.random.default_rng(7))
    scheduled = schedule_module(import_onnx(model), resolve_target(target).tvm_target())
    (conv,) = [f for gv, f in scheduled.functions.items() if "conv2d" in gv.name_hint]
    func = insert_next_tile_prefetches(conv)
    (task,) = _loops(func.body, lambda loop: loop.kind == tirx.ForKind.PARALLEL)
    pieces = _loops(task.body, lambda loop: bool(_prefetches_in(loop.body)))
    (unsplit,) = _loops(conv.body, lambda loop: loop.kind == tirx.ForKind.PARALLEL)
    (update,) = [r for r in _realizes(unsplit.body) if r.block.name_hint == "conv_update"]
    (data,) = [load for load in loads_in(update.block.body) if len(load.source.shape) == 4]
    tasks, tensor_lines = int(task.extent), int(np.prod([int(d) for d in data.source.shape])) * 4 // 64
    assert pieces, "no step prefetches"
    reads = {}

    def read_by(t):
        return reads.setdefault(t, _lines_read(unsplit, update, data, t))

    stride = next(s for s in range(1, tasks) if read_by(s) != read_by(0))  # tasks a pixel tile takes
    assert stride == (1 if out_channels == 24 else 5)
    for t in (0, 1, tasks // 2 + 1, tasks - stride - 1, tasks - 1):
        prefetched = set()
        for piece in pieces:
            for step in range(int(piece.min), int(piece.min) + int(piece.extent)):
                values = {piece.loop_var.name: step, task.loop_var.name: t}
                prefetched |= {_line(load.source, [_evaluate(i, values) for i in load.indices]) for load in _prefetches_in(piece.body)}
        read = read_by(min(t + stride, tasks - 1))
        assert read <= prefetched and all(0 <= line < tensor_lines for line in prefetched), t
        last_tiles = t >= tasks - 2 * stride  # a partial tile's padded pixels, the last task's own lines
        assert len(prefetched - read) <= (1 if x_shape[1] % 16 else 0) or last_tiles, (t, sorted(prefetched - read))


@pytest.mark.parametrize("target", runnable_x86_targets())
@pytest.mark.parametrize("out_channels", [24, 80])
def test_tiles_prefetching_the_next_tiles_input_match_onnxruntime(target, out_channels):
    """A pointwise conv over an input past the cache prefetches the next tile's input over its reduction's
    steps: the result is ONNX Runtime's, with a NaN and an Inf (in the last task's pixels, which prefetch
    their own) where ORT puts them."""
    rng = np.random.default_rng(8)
    x_shape = INPUT_PREFETCH_SHAPES[1]
    model = pointwise_projection_onnx(x_shape, out_channels, rng)
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[0, 5, 3, 3], x[1, 135, 28, 28] = np.nan, np.inf
    _assert_prefetching_build_matches_onnxruntime(model, x, target)


def _lines_read(task, realize, load, t: int) -> set:
    """The lines of `load`'s tensor the block `realize` reads in task `t` (where its predicate holds): for
    each point of its spatial loops, the elements from its reduction's first step to its last, which must
    be one run (a pointwise conv's pixel: its channels)."""
    import itertools

    loops = _loops(task.body, lambda loop: any(r.same_as(realize) for r in _realizes(loop.body)))
    reduction_vars = {var.name for value in reduction_bindings(realize) for var in vars_in(value)}
    ends = [(int(loop.min), int(loop.min) + int(loop.extent) - 1) if loop.loop_var.name in reduction_vars
            else range(int(loop.min), int(loop.min) + int(loop.extent)) for loop in loops]
    steps = int(np.prod([int(loop.extent) for loop in loops if loop.loop_var.name in reduction_vars]))
    bindings = {iv.var.name: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
    runs = {}
    for point in itertools.product(*ends):
        values = {task.loop_var.name: t, **{loop.loop_var.name: v for loop, v in zip(loops, point)}}
        if not _evaluate(realize.predicate, values):
            continue
        block_values = {name: _evaluate(value, values) for name, value in bindings.items()}
        spatial = tuple(v for loop, v in zip(loops, point) if loop.loop_var.name not in reduction_vars)
        runs.setdefault(spatial, []).append(_element(load.source, [_evaluate(i, block_values) for i in load.indices]))
    lines = set()
    for elements in runs.values():
        assert max(elements) - min(elements) == steps - 1, "a tile's pixel does not read one run"
        lines |= set(range(min(elements) * 4 // 64, max(elements) * 4 // 64 + 1))
    return lines


def _element(tensor, indices: list[int]) -> int:
    offset = 0
    for index, extent in zip(indices, tensor.shape):
        offset = offset * int(extent) + index
    return offset


def _loops(stmt, keep) -> list:
    found = []
    tvm_ffi.structural_walk(stmt, (tirx.For, lambda loop: found.append(loop) if keep(loop) else None))
    return found


def _realizes(stmt) -> list:
    found = []
    tvm_ffi.structural_walk(stmt, (s_tir.SBlockRealize, found.append))
    return found


def _prefetches_in(body) -> list:
    """The elements the prefetches directly in `body` (a loop's body, not nested loops) address."""
    statements = body.seq if isinstance(body, tirx.SeqStmt) else [body]
    return [statement.value.args[0].args[0] for statement in statements
            if isinstance(statement, tirx.Evaluate) and "prefetch" in str(statement.value.op)]


def _evaluate(expr, values: dict) -> int:
    bound = tvm_ffi.structural_map(expr, (tirx.Var, lambda var: tirx.const(values[var.name], str(var.ty.dtype))
                                          if var.name in values else var))
    return int(tvm.sym.Analyzer().simplify(bound))


def _line(tensor, indices: list[int]) -> int:
    """The 64-byte line of memory of an element of a row-major float32 tensor."""
    return _element(tensor, indices) * 4 // 64


def _residual_lines_read(task, writer, t: int) -> set:
    """The lines of every tensor of the output's shape the writer reads in task `t` (where its predicate holds)."""
    import itertools

    loops = _loops(task.body, lambda loop: any(r.same_as(writer) for r in _realizes(loop.body)))
    store = writer.block.body
    shape = [int(d) for d in store.buffer.shape]
    loads = []
    tvm_ffi.structural_walk(store.value, (TensorLoad, lambda load: loads.append(load)
                                          if [int(d) for d in load.source.shape] == shape else None))
    bindings = {iv.var.name: value for iv, value in zip(writer.block.iter_vars, writer.iter_values)}
    lines = set()
    for point in itertools.product(*[range(int(loop.extent)) for loop in loops]):
        values = {task.loop_var.name: t, **{loop.loop_var.name: v for loop, v in zip(loops, point)}}
        if not _evaluate(writer.predicate, values):
            continue  # the padded part of a partial block or tile, not written
        block_values = {name: _evaluate(value, values) for name, value in bindings.items()}
        lines |= {_line(load.source, [_evaluate(i, block_values) for i in load.indices]) for load in loads}
    return lines


def _vectorized_writer_lanes(func: tirx.PrimFunc) -> list[int]:
    """Extents of the vectorized loops the epilogue's writer block runs in."""
    loops = []
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda f: loops.append(f) if f.kind == tirx.ForKind.VECTORIZED else None))

    def writes(loop) -> bool:
        found = []
        tvm_ffi.structural_walk(loop.body, (s_tir.SBlock, lambda b: found.append(b) if b.name_hint == "conv_out" else None))
        return bool(found)

    return [int(loop.extent) for loop in loops if writes(loop)]


@pytest.mark.parametrize("out_channels, lanes", [(24, 8), (20, 4)])
def test_a_conv_narrower_than_its_channel_block_writes_in_vectors(out_channels, lanes):
    """AVX-512's 32-channel block over 24 (MobileNetV2's projections) or 20 channels: the epilogue writes the
    real channels in the widest vectors that divide them, not one lane at a time."""
    spec = ConvSpec(1, 10, 10, 48, out_channels, (1, 1), padding=(0, 0, 0, 0))
    tiling = choose_tiling(spec, AVX512)
    assert tiling.channel_block > out_channels
    with resolve_target("x86-64-avx512").tvm_target():
        func = schedule_conv(conv2d_compute(spec, tiling))
    assert _vectorized_writer_lanes(func) == [lanes]


def test_conv_kernel_is_parallel_vectorised_and_unrolled():
    model = conv_onnx((1, 32, 14, 14), [(32, 3, 1, 1, 1, True)], np.random.default_rng(2))
    scheduled = schedule_module(import_onnx(model), HOST)
    conv = next(f for gv, f in scheduled.functions.items() if "conv2d" in gv.name_hint)
    assert {"parallel", "vectorized", "unroll"} <= loop_kinds(conv)
    assert bool(conv.attrs[SCHEDULED_ATTR])


def test_small_resnet_compiles_fast_and_matches():
    rng = np.random.default_rng(5)
    layers = [(32, 3, 1, 1, 1, True), (32, 3, 1, 1, 1, True), (64, 3, 2, 1, 1, True), (64, 3, 1, 1, 1, True),
              (128, 3, 2, 1, 1, True), (128, 1, 1, 0, 1, False)]
    model = conv_onnx((1, 16, 32, 32), layers, rng)
    start = time.perf_counter()
    executable = build_cpu(import_onnx(model), HOST)
    assert time.perf_counter() - start < 30  # typically 2-5 s; generous for shared CI cores
    x = rng.standard_normal((1, 16, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run_vm(executable, x)[0], onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics and the other kernels


def test_every_kernel_is_scheduled_parallel_and_vectorised():
    mod, _ = bn_relax_module((4, 32, 16, 16), training=True)
    scheduled = schedule_module(mod, HOST)
    prim_funcs = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert "bndeploy_batch_stats" in prim_funcs
    for name, func in prim_funcs.items():
        assert func.attrs is not None and SCHEDULED_ATTR in func.attrs, name
    normalise = [f for n, f in prim_funcs.items() if len(f.params[-1].shape) == 4 and int(f.params[-1].shape[0]) == 4]
    assert normalise and all({"parallel", "vectorized"} <= loop_kinds(f) for f in normalise)


def test_batch_statistics_use_many_accumulator_lanes():
    assert BatchStatsSpec(32, 64, 56, 56).lanes == 64 and BatchStatsSpec(3, 5, 7, 7).lanes == 1


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_matches_unscheduled_build(training):
    mod, _ = bn_relax_module((4, 16, 8, 8), training)
    x = np.random.default_rng(3).standard_normal((4, 16, 8, 8)).astype(np.float32) * 3 + 1
    got, want = run_vm(build_cpu(mod, HOST), x), run_vm(tvm.compile(mod, target=HOST), x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape, channels_last", [((8, 4, 32, 32), False), ((3, 5, 7, 7), False),
                                                   ((8, 32, 32, 4), True), ((3, 7, 7, 24), True), ((1, 1, 2, 3), True)])
def test_train_statistics_are_accurate_for_mean_1e4(shape, channels_last):
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    if channels_last:
        n, h, w, c = shape
        spec, flat, axes = BatchStatsSpec(n, c, h, w, channels_last=True), x.reshape(-1, c), (0, 1, 2)
    else:
        spec, flat, axes = BatchStatsSpec(*shape), x.reshape(shape[0], shape[1], -1), (0, 2, 3)
    lib = tvm.compile(tvm.IRModule({"main": build_batch_stats_primfunc(spec)}), target=HOST)
    mean, var = (tvm.runtime.tensor(np.zeros(spec.channels, np.float32)) for _ in range(2))
    lib["main"](tvm.runtime.tensor(flat), mean, var)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), x64.mean(axis=axes), rtol=1e-7)  # float32 rounding of 1e4
    np.testing.assert_allclose(var.numpy(), x64.var(axis=axes), rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_statistics_of_an_inf_first_value_are_onnxruntimes(channels_last):
    """The sums are taken around each channel's first value; an Inf there is replaced by 0 (finite_shift),
    else the channel's mean would come out NaN where ONNX Runtime's is Inf. A NaN first value gives NaN."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    x[0, 1, 0, 0], x[0, 2, 0, 0] = np.inf, np.nan  # channel 1, channel 2: each its first value
    if channels_last:
        spec, flat = BatchStatsSpec(2, 4, 3, 3, channels_last=True), x.transpose(0, 2, 3, 1).reshape(-1, 4)
    else:
        spec, flat = BatchStatsSpec(2, 4, 3, 3), x.reshape(2, 4, -1)
    lib = tvm.compile(tvm.IRModule({"main": build_batch_stats_primfunc(spec)}), target=HOST)
    mean, var = (tvm.runtime.tensor(np.zeros(4, np.float32)) for _ in range(2))
    lib["main"](tvm.runtime.tensor(np.ascontiguousarray(flat)), mean, var)
    mean, var = mean.numpy(), var.numpy()
    assert np.isposinf(mean[1]) and np.isnan(var[1])
    assert np.isnan(mean[2]) and np.isnan(var[2])
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean[[0, 3]], x64[:, [0, 3]].mean(axis=(0, 2, 3)), rtol=1e-6)


def test_squeeze_excitation_broadcast_stays_out_of_the_conv_tile():
    """RegNetY/MobileNetV3/EfficientNet: x * sigmoid(conv1x1(mean(x))). FuseOps appends the broadcast
    multiply (to x's full shape) to the 1x1 conv on the pooled 1x1 map; it must run as a loop nest of its
    own, not inside the conv's 1-pixel register tile (which unrolled it over every pixel of x: minutes of
    LLVM time per kernel at batch 8)."""
    rng = np.random.default_rng(6)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)
               for name, shape in (("w0", (32, 32, 3, 3)), ("w1", (32, 32, 1, 1)), ("w2", (16, 32, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["r"], pads=[1] * 4),  # x channels-last inside the network
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Conv", ["p", "w1"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["r", "s"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    scheduled = schedule_module(import_onnx(model), HOST)
    (se_kernel,) = [f for gv, f in scheduled.functions.items() if "conv2d" in gv.name_hint and "multiply" in gv.name_hint]
    unrolled = [int(n) for n in re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", se_kernel.script())]
    assert unrolled and max(unrolled) <= 64, f"a loop longer than a register tile is unrolled: {unrolled}"
    executable = build_cpu(import_onnx(model), HOST)
    x = rng.standard_normal((8, 32, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run_vm(executable, x)[0], onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


FAST_MATH = {  # ONNX op: (C library function TVM would call per element, float64 reference, f(+inf), f(-inf))
    "Sigmoid": ("expf", lambda x: 1.0 / (1.0 + np.exp(-x)), 1.0, 0.0),
    "Tanh": ("tanhf", np.tanh, 1.0, -1.0),
}


@pytest.mark.parametrize("op", sorted(FAST_MATH))
def test_transcendental_activations_are_vectorised_and_accurate(op):
    """Sigmoid (SiLU, in every EfficientNet conv epilogue) and Tanh (a GAN generator's output) must not call
    the C library's scalar function per element. The polynomial forms stay within 1e-6 of the float64 value
    (the fp32 inference tolerance is 1e-5 + 1e-4 |x|); NaN stays NaN, +-inf give the limits, as in ONNX Runtime."""
    libm, reference, at_inf, at_minus_inf = FAST_MATH[op]
    x = np.concatenate([np.linspace(-30, 30, 4093), [1e-20, -3e-8, np.nan, np.inf, -np.inf]]).astype(np.float32)
    x = x.reshape(1, -1)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "s",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = resolve_target("x86-64-avx2").tvm_target()
    executable = build_cpu(import_onnx(model), target)
    asm = executable.mod.imports[0].inspect_source("asm")
    assert libm not in asm and "vfmadd" in asm
    got = run_vm(executable, x)[0][0]
    want = reference(x[0].astype(np.float64))
    finite = np.isfinite(x[0])
    assert np.abs(got[finite] - want[finite]).max() <= 1e-6
    assert np.isnan(got[-3]) and got[-2] == at_inf and got[-1] == at_minus_inf


def test_exp_polynomial_is_within_a_few_ulp_over_float32s_range():
    """The sigmoid's exp (nan_semantics.exp_float32): its polynomial's fitted error is 9.5e-8 and float32
    rounding in its 15 instructions adds a few ulp (6e-8 each), so 3e-7 relative over the whole range where
    exp is a normal float32 (measured: 1.6e-7). Out of range: 1.2e-38 for -inf, +inf from 88.4 on, NaN kept."""
    from bndeploy.compile.nan_semantics import exp_float32

    x = te.placeholder((1 << 20,), "float32", name="x")
    y = te.compute(x.shape, lambda i: exp_float32(x[i]), name="exp")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    _, lanes = sch.split(sch.get_loops(sch.get_sblock("exp"))[0], [None, 8])
    sch.vectorize(lanes)
    built = tvm.compile(sch.mod["main"], target=resolve_target("x86-64-avx2").tvm_target())
    values = np.linspace(-87.0, 88.0, 1 << 20).astype(np.float32)
    values[:5] = [np.nan, np.inf, -np.inf, 88.5, -1e-30]
    out = tvm.runtime.tensor(np.empty_like(values))
    built(tvm.runtime.tensor(values), out)
    got, want = out.numpy(), np.exp(values.astype(np.float64))
    assert np.max(np.abs(got[5:] - want[5:]) / want[5:]) <= 3e-7
    assert np.isnan(got[0]) and got[1] == np.inf and 0 < got[2] < 2e-38 and got[3] == np.inf and got[4] == 1.0


def test_channels_last_pooling_reads_contiguous_channel_vectors():
    """GlobalAveragePool of an NHWC tensor (squeeze-excitation, classifier heads): channels in vector
    lanes, the 7x7 reduction outside them, instead of strided gathers along the reduced axes."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array((rng.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4), helper.make_node("GlobalAveragePool", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "gap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    scheduled = schedule_module(import_onnx(model), HOST)
    (pool,) = [f for gv, f in scheduled.functions.items() if "mean" in gv.name_hint]
    text = pool.script()
    assert "T.vectorized(" in text and "local" in text  # channel vectors accumulated in registers
    x = rng.standard_normal((2, 32, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(run_vm(build_cpu(import_onnx(model), HOST), x)[0], onnxruntime_run(model, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape, axes", [((2, 48, 28, 28), (0, 2, 3, 1)), ((2, 28, 28, 48), (0, 3, 1, 2)),
                                         ((1, 3, 224, 224), (0, 2, 3, 1))])
def test_layout_transposes_are_tiled_and_exact(shape, axes):
    """The NCHW <-> NHWC transposes at a network's edges run in tiles that reuse each cache line of the
    strided side (generic._tile_transpose); a stem's 3 channels leave too few for a tile and keep the plain
    vectorised loop. Either way the values are exactly the transpose."""
    from bndeploy.compile.schedules.generic import _tile_transpose

    x = te.placeholder(shape, "float32", name="x")
    y = topi.transpose(x, axes)
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    tiled = _tile_transpose(sch, block)
    assert tiled == (shape[1] != 3), sch.mod["main"].script()
    if tiled:
        assert {"parallel", "vectorized"} <= loop_kinds(sch.mod["main"])
    built = tvm.compile(sch.mod["main"] if tiled else te.create_prim_func([x, y]), target=HOST)
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = tvm.runtime.tensor(np.empty(np.transpose(data, axes).shape, np.float32))
    built(tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), np.transpose(data, axes))


def test_per_channel_vectors_are_computed_once_not_per_element():
    """A train-mode normalisation: rsqrt(var + eps) * gamma is one value per channel, broadcast over the
    tensor. Inlined into the elementwise loop it was evaluated per element (6-10x below memory speed on
    RegNetY); it must be a loop nest of its own, over the channels only."""
    shape = (4, 32, 16, 16)
    scheduled = schedule_module(bn_relax_module(shape, training=True)[0], HOST)
    normalise = [f for f in scheduled.functions.values()
                 if isinstance(f, tirx.PrimFunc) and "rsqrt" in f.script() and len(f.params[-1].shape) == 4]
    assert normalise, "no normalisation kernel found"
    for func in normalise:
        sch = s_tir.Schedule(func)
        with_rsqrt = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if "rsqrt" in sch.get(b).script()]
        assert with_rsqrt
        for block in with_rsqrt:
            written = [int(np.prod([int(d) for d in w.source.shape])) for w in sch.get(block).writes]
            assert max(written) == shape[1], (sch.get(block).name_hint, written)


@pytest.mark.parametrize("target", runnable_x86_targets())
def test_tiles_prefetching_the_next_weight_block_match_onnxruntime(target):
    """A 1x1 conv on a 7x7 map at batch 1 (7-10 tiles a channel block) prefetches the next block's weights
    (compile/schedules/weight_prefetch.py), the last block its own: the result is ONNX Runtime's, with a NaN
    and an Inf in the input where ORT puts them."""
    rng = np.random.default_rng(5)
    model = conv_onnx((1, 512, 7, 7), [(200, 1, 1, 0, 1, True)], rng)  # 200 channels: a partial last block
    x = rng.standard_normal((1, 512, 7, 7)).astype(np.float32)
    x[0, 5, 3, 3], x[0, 490, 6, 0] = np.nan, np.inf
    executable = build_cpu(import_onnx(model), resolve_target(target).tvm_target())
    assert "prefetcht1" in executable.mod.imports[0].inspect_source("asm")
    got, want = run_vm(executable, x)[0], onnxruntime_run(model, x)
    assert np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
