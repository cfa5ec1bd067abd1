"""TVM's TIR lowering for CPU kernels, with register tiles kept on the stack (and so in registers).

A register-tiled kernel holds its accumulators in a small "local" buffer allocated inside its parallel
loop. TVM 0.27's LowerTVMBuiltin keeps only small *global*-scope buffers as stack allocations; every
local one becomes a `TVMBackendAllocWorkspace` / `TVMBackendFreeWorkspace` pair around each tile, and
since the buffer then escapes into those calls LLVM must also store the accumulators to it (dead stores
it could not remove). Measured on the AVX2 code of a 1x1 conv 16->96 over 112x112 (AMD EPYC Zen 4):
0.31 -> 0.24 ms at batch 1, 3.0 -> 1.5 ms at batch 8; a 3x3 conv, whose tiles run far longer, did not
move. Marking such buffers `disable_lower_builtin` leaves them to LLVM as stack slots at the top of the
outlined parallel function, which it promotes to registers.

After vectorisation, a load whose lanes read constant offsets within a window no wider than the vector
(`x[base + lane % 2]`: the interleaved grouped conv's input, two groups' channels per broadcast; its copy's
`x[base + lane % 2 * 8 + lane // 2]`) becomes one load of the window and a shuffle (`window_loads`),
which LLVM emits as a broadcast (`vbroadcastsd`) or a load and a permute; left as it was, TVM's code
generator loads every lane on its own, and LLVM merged them only where it could prove the addresses
related (every pixel of one tile shape, none of another: 9 GFLOP/s).

The same lowering first inserts the prefetches schedules marked (`insert_prefetches`: the next weight
block's, schedules/weight_prefetch.py, and the next tile's residual and input, schedules/next_tile_prefetch.py) and narrows the indices of kernels with a loop-partition hint to int32
(`keep_loop_partition_hints`), without which TVM drops the hint and leaves a border test in every tile of
a depthwise or grouped conv's row.

Only x86 code is built this way: that is where it was timed. On ARM (no board here to time it) llvm-mca
saw both sides: most conv classes' hottest loops unchanged or slightly better (depthwise 3x3 s2 on 96
channels at 56x56: 76 -> 78-80% of the model's FMA peak), but without calls in the tile LLVM unrolls a
whole row of depthwise stride-2 tiles and spills addresses: Carmel's 74 -> 52%, and on Cortex-A76 the
1,96,112 layer of `bench --suite conv` 86 -> 59%. ARM keeps TVM's lowering until a board can decide.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds
from tvm.s_tir.pipeline import default_s_tir_pipeline
from tvm.tirx.compilation_pipeline import PIPELINE_MAP, register_tir_pipeline
from tvm.tirx.stmt import AllocBuffer, AttrStmt, For, IfThenElse, SeqStmt, While

from .tir_exprs import element_bytes

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
    return elements * element_bytes(buffer) <= MAX_STACK_TILE_BYTES


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


def _let_resolver(body):
    """expr -> the value a let-variable is bound to in `body` (CommonSubexprElim binds index parts), else expr."""
    values = {}
    tvm_ffi.structural_walk(body, ((tirx.LetStmt, tirx.Let), lambda let: values.__setitem__(let.var, let.value)))
    return lambda expr: values.get(expr, expr) if isinstance(expr, tirx.Var) else expr


_LANE_OPERATIONS = {tirx.Add: lambda x, y: x + y, tirx.Sub: lambda x, y: x - y, tirx.Mul: lambda x, y: x * y,
                    tirx.FloorDiv: lambda x, y: x // y, tirx.FloorMod: lambda x, y: x % y, tirx.Min: min, tirx.Max: max}


def _lane_constants(expr, lanes: int, resolve) -> list[int] | None:
    """The lanes of an integer vector expression built from constant ramps and broadcasts, or None."""
    expr = resolve(expr)
    if isinstance(expr, tirx.Ramp):
        base, stride = _constant(expr.base), _constant(expr.stride)
        return None if base is None or stride is None else [base + stride * lane for lane in range(lanes)]
    if isinstance(expr, tirx.Broadcast):
        value = _constant(resolve(expr.value))
        return None if value is None else [value] * lanes
    operation = _LANE_OPERATIONS.get(type(expr))
    if operation is None:
        return None
    a, b = _lane_constants(expr.a, lanes, resolve), _lane_constants(expr.b, lanes, resolve)
    return None if a is None or b is None else [operation(x, y) for x, y in zip(a, b)]


def _window_index(index, lanes: int, resolve) -> tuple[tirx.PrimExpr, list[int]] | None:
    """(scalar base, constant lane offsets from it) of a vector index that is a sum or difference of broadcast
    scalars and constant lane patterns (`broadcast(b) + ramp % broadcast(2)`), looking through let-variables
    with `resolve`; None for any other index."""
    scalars, offsets, pending = [], [0] * lanes, [(index, 1)]
    while pending:
        term, sign = pending.pop()
        term = resolve(term)
        if isinstance(term, (tirx.Add, tirx.Sub)):
            pending += [(term.a, sign), (term.b, sign if isinstance(term, tirx.Add) else -sign)]
            continue
        constant = _lane_constants(term, lanes, resolve)
        if constant is not None:
            offsets = [x + sign * y for x, y in zip(offsets, constant)]
        elif isinstance(term, tirx.Broadcast):
            scalars.append((term.value, sign))
        else:
            return None
    if not any(sign > 0 for _, sign in scalars):
        return None
    scalars.sort(key=lambda pair: -pair[1])  # a positive term first
    base = scalars[0][0]
    for scalar, sign in scalars[1:]:
        base = base + scalar if sign > 0 else base - scalar
    low = min(offsets)
    return base + low, [offset - low for offset in offsets]


def _constant(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


@tirx.transform.prim_func_pass(opt_level=0, name="bndeploy.WindowLoads")
def window_loads(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """A vector load whose lanes read constant offsets inside a window no wider than the vector (`x[b + lane
    % 2]`, `x[b + lane % 2 * 8 + lane // 2]`) -> one load of the window and a shuffle of its lanes."""
    resolve = _let_resolver(func.body)

    def rewrite(load):
        lanes = tvm.runtime.DataType(str(load.ty.dtype)).lanes
        if len(load.indices) != 1 or lanes < 2:
            return load
        window = _window_index(load.indices[0], lanes, resolve)
        if window is None or max(window[1]) >= lanes or window[1] == list(range(lanes)):
            return load
        base, offsets = window
        width = max(offsets) + 1
        short = tirx.BufferLoad(load.source, [tirx.Ramp(base, tirx.const(1, str(base.ty.dtype)), width)])
        # Shuffle picks lanes from its inputs' concatenation, which must have as many lanes as it picks
        copies = [short] * -(-lanes // width)
        return tirx.Shuffle(copies, [tirx.IntImm("int32", offset) for offset in offsets])

    body = tvm_ffi.structural_map(func.body, (TensorLoad, rewrite))
    return func if body.same_as(func.body) else func.with_body(body)


PARTITION_HINT = "pragma_loop_partition_hint"  # a loop annotation LoopPartition acts on (schedules set it)
INT32_INDEXABLE = 2**31 - 1


def _has_partition_hint(func: tirx.PrimFunc) -> bool:
    hinted = []
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: hinted.append(loop)
                                        if PARTITION_HINT in loop.annotations else None))
    return bool(hinted)


def _int32_indexable(func: tirx.PrimFunc) -> bool:
    """Static shapes of at most 2**31 - 1 elements (int32 flat indices; ForceNarrowIndexToInt32 checks
    each constant, not their products)."""
    for buffer in func.params:  # buffers (this TVM's PrimFunc parameters are buffer variables)
        if not all(isinstance(extent, tirx.IntImm) for extent in buffer.shape):
            return False
        if math.prod(int(extent) for extent in buffer.shape) > INT32_INDEXABLE:
            return False
    return True


@tirx.transform.prim_func_pass(opt_level=0, name="bndeploy.KeepLoopPartitionHints")
def keep_loop_partition_hints(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Index with int32 from the start a kernel whose loops carry a loop-partition hint.

    TVM 0.27's NarrowDataType, early in its lowering, gives each int64 loop a new int32 variable but leaves
    the `pragma_loop_partition_hint` attribute that LowerOpaqueBlock emitted on the old one, so LoopPartition
    never sees a hinted loop: the depthwise rows and the grouped convs' rows of tiles kept the border test in
    every tile. Relax legalises shapes as int64; narrowed before lowering, the loops keep their variables
    (AMD EPYC Zen 4, 2 threads, AVX2 code: depthwise 3x3 on 144 channels at 56x56 0.086 -> 0.060 ms)."""
    if not _has_partition_hint(func) or not _int32_indexable(func):
        return func
    try:
        return tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
    except tvm.error.InternalError:  # an int64 buffer or constant it refuses to narrow: TVM's way, unpartitioned
        return func


@tirx.transform.prim_func_pass(opt_level=0, name="bndeploy.InsertPrefetches")
def insert_prefetches(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """The prefetches schedules marked: of the next channel block's weights (schedules/weight_prefetch.py)
    and of the next tile's residual and input (schedules/next_tile_prefetch.py)."""
    # imported here: compile.schedules imports this module
    from .schedules.next_tile_prefetch import insert_next_tile_prefetches
    from .schedules.weight_prefetch import insert_weight_prefetches

    return insert_next_tile_prefetches(insert_weight_prefetches(func))


def tir_pipeline_for(target: tvm.target.Target) -> str:
    """The TIR pipeline a CPU target's kernels are lowered with (see the module's docstring)."""
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    return CPU_TIR_PIPELINE if triple.startswith("x86_64") else "default"


def _cpu_tir_pipeline():
    lower, finalize_host, finalize_device = default_s_tir_pipeline()

    @tvm.transform.module_pass(opt_level=0, name="bndeploy.CPUTIRPipeline")
    def _lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return keep_tiles_on_stack(window_loads(lower(keep_loop_partition_hints(insert_prefetches(mod)))))

    return _lower, finalize_host, finalize_device


if CPU_TIR_PIPELINE not in PIPELINE_MAP:
    register_tir_pipeline(CPU_TIR_PIPELINE, _cpu_tir_pipeline)


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's build step (its default_build) with this lowering, so `bndeploy tune` measures every
    candidate as `bndeploy compile` builds it."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline_for(target))
