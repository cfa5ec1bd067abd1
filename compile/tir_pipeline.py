"""TVM's TIR lowering for CPU kernels, with register tiles kept on the stack (and so in registers).

A register-tiled kernel holds its accumulators in a small "local" buffer allocated inside its parallel
loop. TVM 0.27's LowerTVMBuiltin keeps only small *global*-scope buffers as stack allocations; every
local one becomes a `TVMBackendAllocWorkspace` / `TVMBackendFreeWorkspace` pair around each tile, and
since the buffer then escapes into those calls LLVM must also store the accumulators to it (dead stores
it could not remove). Measured on the AVX2 code of a 1x1 conv 16->96 over 112x112 (AMD EPYC Zen 4):
0.31 -> 0.24 ms at batch 1, 3.0 -> 1.5 ms at batch 8; a 3x3 conv, whose tiles run far longer, did not
move. Marking such buffers `disable_lower_builtin` leaves them to LLVM as stack slots at the top of the
outlined parallel function, which it promotes to registers.

Only x86 code is built this way: that is where it was timed. On ARM (no board here to time it) llvm-mca
saw both sides: most conv classes' hottest loops unchanged or slightly better (depthwise 3x3 s2 on 96
channels at 56x56: 76 -> 78-80% of the model's FMA peak), but without calls in the tile LLVM unrolls a
whole row of depthwise stride-2 tiles and spills addresses: Carmel's 74 -> 52%, and on Cortex-A76 the
1,96,112 layer of `bench --suite conv` 86 -> 59%. ARM keeps TVM's lowering until a board can decide.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir.pipeline import default_s_tir_pipeline
from tvm.tirx.compilation_pipeline import PIPELINE_MAP, register_tir_pipeline
from tvm.tirx.stmt import AllocBuffer, AttrStmt, For, IfThenElse, SeqStmt, While

CPU_TIR_PIPELINE = "bndeploy-cpu"
# Bytes: the largest register tile is 32 vector registers of 64 bytes; a local buffer far beyond that is
# not a tile and stays where TVM puts it (a stack frame per parallel task must stay small).
MAX_STACK_TILE_BYTES = 8192
_KEEP_ON_STACK = "disable_lower_builtin"  # LowerTVMBuiltin's annotation (transform::kDisableLowerTVMBuiltin)


def stack_tile_buffer(alloc: AllocBuffer) -> bool:
    """A local buffer of constant size up to MAX_STACK_TILE_BYTES."""
    buffer = alloc.buffer
    if buffer.scope() != "local" or not all(isinstance(extent, tirx.IntImm) for extent in buffer.shape):
        return False
    elements = 1
    for extent in buffer.shape:
        elements *= int(extent)
    return elements * tvm.runtime.DataType(buffer.dtype).bits // 8 <= MAX_STACK_TILE_BYTES


def _keep_tiles_on_stack(stmt):
    """`stmt` with every stack_tile_buffer annotated; statements that hold no nested ones are returned
    unchanged (the same object)."""
    if isinstance(stmt, SeqStmt):
        seq = [_keep_tiles_on_stack(s) for s in stmt.seq]
        return stmt if all(new.same_as(old) for new, old in zip(seq, stmt.seq)) else SeqStmt(seq, stmt.span)
    if isinstance(stmt, For):
        body = _keep_tiles_on_stack(stmt.body)
        return stmt if body.same_as(stmt.body) else For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                                                        stmt.thread_binding, stmt.annotations, stmt.step, stmt.span)
    if isinstance(stmt, IfThenElse):
        then_case = _keep_tiles_on_stack(stmt.then_case)
        else_case = None if stmt.else_case is None else _keep_tiles_on_stack(stmt.else_case)
        if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
            return stmt
        return IfThenElse(stmt.condition, then_case, else_case, stmt.span)
    if isinstance(stmt, (AttrStmt, While)):
        body = _keep_tiles_on_stack(stmt.body)
        if body.same_as(stmt.body):
            return stmt
        if isinstance(stmt, While):
            return While(stmt.condition, body, stmt.span)
        return AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
    if isinstance(stmt, AllocBuffer) and stack_tile_buffer(stmt):
        return AllocBuffer(stmt.buffer, annotations={**stmt.annotations, _KEEP_ON_STACK: tirx.IntImm("int32", 1)})
    return stmt


@tirx.transform.prim_func_pass(opt_level=0, name="bndeploy.KeepTilesOnStack")
def keep_tiles_on_stack(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    body = _keep_tiles_on_stack(func.body)
    return func if body.same_as(func.body) else func.with_body(body)


def tir_pipeline_for(target: tvm.target.Target) -> str:
    """The TIR pipeline a CPU target's kernels are lowered with (see the module's docstring)."""
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    return CPU_TIR_PIPELINE if triple.startswith("x86_64") else "default"


def _cpu_tir_pipeline():
    lower, finalize_host, finalize_device = default_s_tir_pipeline()

    @tvm.transform.module_pass(opt_level=0, name="bndeploy.CPUTIRPipeline")
    def _lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return keep_tiles_on_stack(lower(mod))

    return _lower, finalize_host, finalize_device


if CPU_TIR_PIPELINE not in PIPELINE_MAP:
    register_tir_pipeline(CPU_TIR_PIPELINE, _cpu_tir_pipeline)


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's build step (its default_build) with this lowering, so `bndeploy tune` measures every
    candidate as `bndeploy compile` builds it."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline_for(target))
