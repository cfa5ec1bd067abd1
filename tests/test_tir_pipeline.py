"""bndeploy's TIR lowering (compile/tir_pipeline.py): register tiles stay on the stack, so in registers.

The upstream behaviour it works around: TVM 0.27 lowers every "local" buffer allocated inside a parallel
loop to a TVMBackendAllocWorkspace/FreeWorkspace pair per iteration, one per register tile. The first
test fails when TVM stops doing that (then the workaround can go); the others check the workaround.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.tirx.stmt import AllocBuffer, AttrStmt, For, ForKind, IfThenElse, SeqStmt

from bndeploy.compile.schedules.conv2d import ConvSpec, choose_tiling, conv2d_compute, pack_weight
from bndeploy.compile.schedules.conv_schedule import schedule_conv
from bndeploy.compile.schedules.isa import isa_for_target
from bndeploy.compile.targets import resolve_target
from bndeploy.compile.tir_pipeline import (CPU_TIR_PIPELINE, MAX_STACK_TILE_BYTES, build_kernel, keep_tiles_on_stack,
                                           stack_tile_buffer, tir_pipeline_for)
from test_cpu_schedules import runnable_x86_targets

WORKSPACE_CALL = "__TVMBackendAllocWorkspace"
SPEC = ConvSpec(1, 12, 12, 16, 48, (1, 1))  # a 1x1 conv with a short reduction: the tile's set-up dominates


def conv_module(target: tvm.target.Target):
    tiling = choose_tiling(SPEC, isa_for_target(target))
    return tvm.IRModule({"main": schedule_conv(conv2d_compute(SPEC, tiling))}), tiling


def build(target_name: str, pipeline: str):
    target = resolve_target(target_name).tvm_target()
    mod, tiling = conv_module(target)
    return tvm.compile(mod, target=target, tir_pipeline=pipeline), tiling


def assembly(library) -> str:
    return library.mod.inspect_source("asm") if hasattr(library, "mod") else library.inspect_source("asm")


@pytest.mark.parametrize("target_name", ["x86-64-avx2", "x86-64-avx512", "cortex-a76"])
def test_upstream_lowers_a_register_tile_to_a_workspace_per_tile(target_name):
    library, _ = build(target_name, "default")
    assert WORKSPACE_CALL in assembly(library), "TVM keeps local tiles on the stack now: tir_pipeline.py can go"


@pytest.mark.parametrize("target_name", ["x86-64-avx2", "x86-64-avx512", "cortex-a76"])
def test_bndeploy_pipeline_keeps_the_tile_off_the_workspace(target_name):
    library, _ = build(target_name, CPU_TIR_PIPELINE)
    assert WORKSPACE_CALL not in assembly(library)


@pytest.mark.parametrize("target_name", runnable_x86_targets())
def test_both_pipelines_compute_the_same_conv(target_name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SPEC.input_shape).astype(np.float32)
    w = rng.standard_normal((SPEC.out_channels, SPEC.in_channels, 1, 1)).astype(np.float32)
    outputs = []
    for pipeline in ("default", CPU_TIR_PIPELINE):
        library, tiling = build(target_name, pipeline)
        args = [tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weight(w, SPEC, tiling)),
                tvm.runtime.tensor(np.zeros(SPEC.output_shape, np.float32))]
        library["main"](*args)
        outputs.append(args[2].numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[1], np.einsum("nhwc,oc->nhwo", x, w[:, :, 0, 0]), rtol=1e-5, atol=1e-5)


def statements(stmt):
    """Every statement nested in `stmt` (itself first), through sequences, loops, branches and attributes."""
    yield stmt
    if isinstance(stmt, SeqStmt):
        children = list(stmt.seq)
    elif isinstance(stmt, IfThenElse):
        children = [stmt.then_case] + ([stmt.else_case] if stmt.else_case is not None else [])
    elif isinstance(stmt, (For, AttrStmt)):
        children = [stmt.body]
    else:
        children = []
    for child in children:
        yield from statements(child)


def allocations(stmt) -> list[AllocBuffer]:
    return [s for s in statements(stmt) if isinstance(s, AllocBuffer)]


def parallel_loops(stmt) -> list[For]:
    return [s for s in statements(stmt) if isinstance(s, For) and s.kind == ForKind.PARALLEL]


def lower_without_builtins(mod: tvm.IRModule) -> tvm.IRModule:
    """The s_tir pipeline's steps up to flat buffers (what keep_tiles_on_stack sees)."""
    passes = [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
              s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
              s_tir.transform.CompactBufferAllocation(), s_tir.transform.StmtSimplify(),
              s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer()]
    return tvm.transform.Sequential(passes)(mod)


def test_only_the_register_tile_is_annotated():
    target = resolve_target("x86-64-avx512").tvm_target()
    mod, tiling = conv_module(target)
    before = allocations(lower_without_builtins(mod)["main"].body)
    after = allocations(keep_tiles_on_stack(lower_without_builtins(mod))["main"].body)
    (tile,) = [a for a in after if a.buffer.scope() == "local"]
    assert tile.annotations["disable_lower_builtin"]
    assert [int(d) for d in tile.buffer.shape] == [tiling.pixel_block * tiling.channel_block]
    assert len(before) == len(after)


def test_a_large_or_global_buffer_is_no_stack_tile():
    def alloc(shape, scope):
        buffer = tirx.decl_buffer(shape, "float32", scope=scope)
        return AllocBuffer(buffer)

    assert stack_tile_buffer(alloc((MAX_STACK_TILE_BYTES // 4,), "local"))
    assert not stack_tile_buffer(alloc((MAX_STACK_TILE_BYTES // 4 + 1,), "local"))
    assert not stack_tile_buffer(alloc((16,), "global"))


def test_x86_targets_are_lowered_with_it_and_arm_ones_are_not():
    """Only where it was timed (the module's docstring says what llvm-mca saw on ARM)."""
    pipelines = {name: tir_pipeline_for(resolve_target(name).tvm_target())
                 for name in ("cpu", "x86-64-avx2", "x86-64-avx512", "cortex-a76", "carmel", "armv7")}
    assert pipelines == {"cpu": CPU_TIR_PIPELINE, "x86-64-avx2": CPU_TIR_PIPELINE, "x86-64-avx512": CPU_TIR_PIPELINE,
                         "cortex-a76": "default", "carmel": "default", "armv7": "default"}


# --------------------------------------------------------------------------------------------------
# Loop-partition hints: TVM 0.27's NarrowDataType gives int64 loops new int32 variables but leaves the
# `pragma_loop_partition_hint` attribute on the old ones, so LoopPartition never splits a hinted loop.


def _lowered_to_loop_partition(func: tirx.PrimFunc, target: tvm.target.Target, keep_hints: bool) -> tirx.PrimFunc:
    """The first passes of TVM's default TIR lowering, in its order, through LoopPartition."""
    from bndeploy.compile.tir_pipeline import keep_loop_partition_hints

    mod = tvm.IRModule({"main": func.with_attr("target", target)})
    if keep_hints:
        mod = keep_loop_partition_hints(mod)
    passes = [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
              s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
              s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(),
              s_tir.transform.StmtSimplify(), s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
              tirx.transform.NarrowDataType(32), s_tir.transform.LoopPartition()]
    with target:
        return tvm.ir.transform.Sequential(passes)(mod)["main"]


def _tile_bodies(func: tirx.PrimFunc) -> int:
    """Copies of the conv's reduction over the kernel rows: one per part of a partitioned row of tiles."""
    found = []
    tvm_ffi.structural_walk(func.body, (For, lambda loop: found.append(loop) if loop.loop_var.name.startswith("rkh") else None))
    return len(found)


ROW_OF_TILES = {  # spec, target: a conv whose rows of tiles carry the partition hint
    "depthwise": (ConvSpec(1, 28, 28, 64, 64, (3, 3), padding=(1, 1, 1, 1), groups=64), "x86-64-avx2"),
    "grouped": (ConvSpec(1, 28, 28, 104, 104, (3, 3), padding=(1, 1, 1, 1), groups=13), "x86-64-avx2"),
}


def _scheduled(case: str):
    spec, target_name = ROW_OF_TILES[case]
    target = resolve_target(target_name).tvm_target()
    with target:
        return schedule_conv(conv2d_compute(spec, choose_tiling(spec, isa_for_target(target)))), target


@pytest.mark.parametrize("case", sorted(ROW_OF_TILES))
def test_upstream_narrowing_drops_the_loop_partition_hint(case):
    func, target = _scheduled(case)
    assert "pragma_loop_partition_hint" in func.script()
    assert _tile_bodies(_lowered_to_loop_partition(func, target, keep_hints=False)) == 1, \
        "TVM partitions hinted int64 loops now: keep_loop_partition_hints can go"


@pytest.mark.parametrize("case", sorted(ROW_OF_TILES))
def test_narrowed_first_the_row_of_tiles_is_partitioned(case):
    """Border tiles apart from the branch-free inner ones."""
    func, target = _scheduled(case)
    assert _tile_bodies(_lowered_to_loop_partition(func, target, keep_hints=True)) >= 2


def _assert_left_unnarrowed(*tensors: te.Tensor) -> None:
    """The kernel of `tensors` (its output last), its loop hinted: ForceNarrowIndexToInt32 refuses it, and
    keep_loop_partition_hints hands it back unchanged (TVM's way)."""
    from bndeploy.compile.tir_pipeline import keep_loop_partition_hints

    sch = s_tir.Schedule(te.create_prim_func(list(tensors)))
    sch.annotate(sch.get_loops(sch.get_sblock(tensors[-1].op.name))[0], "pragma_loop_partition_hint", 1)
    mod = tvm.IRModule({"main": sch.mod["main"]})
    with pytest.raises(tvm.error.InternalError):
        tirx.transform.ForceNarrowIndexToInt32()(mod)
    assert keep_loop_partition_hints(mod)["main"].same_as(mod["main"])


def test_a_kernel_with_64_bit_integer_buffers_is_not_narrowed():
    """ForceNarrowIndexToInt32 rejects int64 buffers (ONNX indices are int64): such kernels keep TVM's way."""
    indices = te.placeholder((16,), "int64", name="indices")
    out = te.compute((16,), lambda i: indices[i] + tirx.const(1, "int64"), name="out")
    _assert_left_unnarrowed(indices, out)


def test_a_kernel_with_a_constant_beyond_int32_is_not_narrowed():
    """ForceNarrowIndexToInt32 refuses an int64 constant beyond int32: such a kernel keeps TVM's way."""
    data = te.placeholder((16,), "float32", name="data")
    index = te.placeholder((16,), "int32", name="index")
    wide = lambda value: tirx.Cast("int64", value)  # noqa: E731
    out = te.compute((16,), lambda i: tirx.Select(wide(index[i]) * tirx.const(2**40, "int64") < wide(index[0]),
                                                  data[i], data[0]), name="out")
    _assert_left_unnarrowed(data, index, out)


def test_a_grouped_convs_padding_buffer_is_each_tasks_own():
    """Grouped convs whose tiles cross row ends (AVX2: 128 channels in 8 groups, stride 2, 6-pixel tiles)
    pad inside each parallel task: TVM places the padding buffer in the task and sizes it for one group,
    so no two cores write the same buffer (two chunks of a group pad an overlapping row)."""
    target = resolve_target("x86-64-avx2").tvm_target()
    spec = ConvSpec(1, 28, 28, 128, 128, (3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=8)
    with target:
        func = schedule_conv(conv2d_compute(spec, choose_tiling(spec, isa_for_target(target))))
    lowered = lower_without_builtins(tvm.IRModule({"main": func}))["main"]
    (task,) = parallel_loops(lowered.body)
    (pad,) = [a.buffer for a in allocations(task.body) if a.buffer.name == "pad"]
    assert int(pad.shape[0]) <= 30 * 30 * 16  # one group's 16 channels, not the 30 x 30 x 128 input


@pytest.mark.parametrize("name, read, window_instruction", [
    ("repeating pair", lambda a, i, j: a[i, j % 2], "vbroadcastsd"),  # two groups' inputs, one broadcast
    ("interleaving copy", lambda a, i, j: a[i, j % 2 * 4 + j // 2], "vperm"),  # one load, one permute
    ("pairs from the end", lambda a, i, j: a[i, 7 - j // 2], "vperm"),  # a difference: base minus lane pattern
])
def test_window_loads_read_a_vector_of_nearby_lanes_with_one_load(name, read, window_instruction):
    """`window_loads`: a vector load whose lanes read constant offsets within the vector's width is one load
    of the window and a shuffle, not a load per lane; the values are the same."""
    target = resolve_target("x86-64-avx2").tvm_target()
    a = te.placeholder((64, 8), "float32", name="a")
    b = te.compute((64, 8), lambda i, j: read(a, i, j) * tirx.const(2.0, "float32"), name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    sch.vectorize(sch.get_loops(sch.get_sblock("b"))[1])
    lib = build_kernel(tvm.IRModule({"main": sch.mod["main"]}), target)
    asm = lib.inspect_source("asm")
    assert window_instruction in asm and not re.search(r"\b(vinsertps|vpextrd|vgatherdps)\b", asm)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((64, 8), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    columns = np.arange(8)
    picked = {"repeating pair": columns % 2, "interleaving copy": columns % 2 * 4 + columns // 2,
              "pairs from the end": 7 - columns // 2}[name]
    want = 2 * x[:, picked]
    np.testing.assert_array_equal(out.numpy(), want)
