"""Default CPU schedules for the kernels bndeploy does not hand-write (elementwise chains, reductions):
parallel outer loops, vectorised inner loops. TVM's own CPU pipeline leaves these serial and scalar."""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from .conv_schedule import NotAConvKernel, has_conv_block, schedule_conv

SCHEDULED_ATTR = "bndeploy.scheduled"
# On a block: computed once into its own buffer, never inlined into its consumers (an expensive gather that
# an inlined epilogue would evaluate once per reference, e.g. the many references of a polynomial tanh).
MATERIALIZE_ATTR = "bndeploy.materialize"
OPAQUE_PATTERN = 8  # relax OpPatternKind.kOpaque: FuseOps must not merge a scheduled kernel


def mark_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attrs({SCHEDULED_ATTR: True, "op_pattern": OPAQUE_PATTERN})

log = logging.getLogger(__name__)

VECTOR_WIDTHS = (16, 8, 4)
INNER_FUSE_LIMIT = 1 << 14  # trailing loops fused into the vectorised loop while their product stays below
MIN_PARALLEL_WORK = 1 << 12  # elements below which threads cost more than they save


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_producers(sch: s_tir.Schedule) -> None:
    """Inline every injective intermediate block, so one loop nest per output remains; a small block that the
    rest broadcasts (a per-channel vector) is computed once instead (see _broadcast_vector)."""
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        largest = max((_written_elements(sch, b) for b in blocks), default=0)
        for block in blocks:
            if _is_reduction(sch, block) or not sch.get_consumers(block) or MATERIALIZE_ATTR in sch.get(block).annotations:
                continue
            if _broadcast_vector(sch, block, largest):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except s_tir.ScheduleError:
                continue


# A block writing at most this share of the function's largest output is broadcast by its consumers; inlined,
# it would be recomputed for every element (a train-mode BatchNorm's rsqrt(var + eps) * gamma, per channel,
# evaluated per pixel: measured 6-10x below memory speed on RegNetY's normalisations).
BROADCAST_SHARE = 1 / 16


def _written_elements(sch: s_tir.Schedule, block) -> int:
    total = 0
    for region in sch.get(block).writes:
        count = 1
        for dim in region.source.shape:
            if not isinstance(dim, tirx.IntImm):
                return 0
            count *= int(dim)
        total += count
    return total


def _broadcast_vector(sch: s_tir.Schedule, block, largest: int) -> bool:
    """A block small enough next to the function's largest output that computing it once beats recomputing
    it per element of its broadcasting consumers."""
    written = _written_elements(sch, block)
    return 0 < written <= largest * BROADCAST_SHARE


def vectorize_and_parallelize(sch: s_tir.Schedule, loops: list) -> None:
    """Fuse trailing loops into one vectorised loop, the leading ones into one parallel loop."""
    extents = [_extent(sch, loop) for loop in loops]
    if not loops or any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    inner_count, inner_extent = 0, 1
    for e in reversed(extents):
        if inner_count and inner_extent * e > INNER_FUSE_LIMIT:
            break
        inner_extent *= e
        inner_count += 1
    outer = loops[: len(loops) - inner_count]
    inner = sch.fuse(*loops[len(loops) - inner_count :]) if inner_count > 1 else loops[-1]
    width = next((v for v in VECTOR_WIDTHS if inner_extent % v == 0), None)
    if width is not None:
        inner_rest, lanes = sch.split(inner, [None, width])
        sch.vectorize(lanes)
    else:
        inner_rest = inner
    if total < MIN_PARALLEL_WORK:
        return
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    elif width is None or inner_extent // width > 1:
        sch.parallel(inner_rest)


def schedule_injective(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    _inline_producers(sch)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not _tile_transpose(sch, block):
            vectorize_and_parallelize(sch, sch.get_loops(block))
    return sch.mod["main"]


# Elements per side of a transpose tile (the largest that divides the axis): at 16, 16 cache lines read and
# 16 written, all in L1; the written side is one vector.
TRANSPOSE_TILES = (16, 8, 4)


def _tile_transpose(sch: s_tir.Schedule, block) -> bool:
    """A layout change (NCHW <-> NHWC at a network's edges): the output's contiguous axis is strided in the
    input. Vectorising the output's last loop alone reads one float per cache line of the input and moves on;
    tiles (input-contiguous axis x output-contiguous axis, TRANSPOSE_TILES) reuse every cache line they
    touch. Returns whether the block was scheduled so."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if len(loops) != len(stmt.iter_vars) or len(loops) < 2:
        return False
    iter_vars = [iv.var for iv in stmt.iter_vars]
    reads = [r for r in stmt.reads if len(r.region) > 1]
    if len(reads) != 1 or not isinstance(reads[0].region[-1].min, tirx.Var):
        return False
    contiguous_in = next((i for i, v in enumerate(iter_vars) if v.same_as(reads[0].region[-1].min)), None)
    last = len(loops) - 1
    extents = [_extent(sch, loop) for loop in loops]
    if contiguous_in is None or contiguous_in == last or any(e is None for e in extents):
        return False
    read_tile = next((t for t in TRANSPOSE_TILES if extents[contiguous_in] % t == 0), None)
    write_tile = next((t for t in TRANSPOSE_TILES if extents[last] % t == 0), None)
    if read_tile is None or write_tile is None:
        return False
    read_outer, read_inner = sch.split(loops[contiguous_in], [None, read_tile])
    write_outer, write_inner = sch.split(loops[last], [None, write_tile])
    others = [loop for i, loop in enumerate(loops) if i not in (contiguous_in, last)]
    sch.reorder(*others, read_outer, write_outer, read_inner, write_inner)
    sch.vectorize(write_inner)
    sch.parallel(sch.fuse(*others, read_outer))
    return True


def schedule_reduction(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Each reduction: spatial loops parallel; the innermost reduction loop split into vector lanes of
    partial sums (rfactor), summed at the end. Its epilogue (e.g. the division of a mean) follows it."""
    sch = s_tir.Schedule(func)
    _inline_producers(sch)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if _is_reduction(sch, block):
            _schedule_one_reduction(sch, block)
        elif not sch.get_producers(block):
            vectorize_and_parallelize(sch, sch.get_loops(block))
        else:
            try:
                sch.reverse_compute_inline(block)
            except s_tir.ScheduleError:
                vectorize_and_parallelize(sch, sch.get_loops(block))
    return sch.mod["main"]


def _schedule_one_reduction(sch: s_tir.Schedule, block) -> None:
    iter_types = [iv.iter_type for iv in sch.get(block).iter_vars]
    loops = sch.get_loops(block)
    if len(loops) != len(iter_types) or iter_types != sorted(iter_types):
        return  # not (spatial..., reduction...): leave TVM's default
    n_spatial = iter_types.count(tirx.IterVar.DataPar)
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    if spatial and _reads_spatial_innermost(sch, block, n_spatial):
        _schedule_channels_last_reduction(sch, block, spatial, reduction)
        return
    last = _extent(sch, reduction[-1])
    width = next((v for v in VECTOR_WIDTHS if last and last % v == 0 and last > v), None)
    if width is not None:
        _, lanes = sch.split(reduction[-1], [None, width])
        partial = sch.rfactor(lanes, factor_axis=len(spatial))
        _vectorize_partial(sch, partial, n_spatial)
    if spatial:
        total = 1
        for loop in spatial:
            total *= _extent(sch, loop) or 1
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if total > 1:
            sch.parallel(fused)


def _reads_spatial_innermost(sch: s_tir.Schedule, block, n_spatial: int) -> bool:
    """Whether the reduced input's contiguous (last) axis is indexed by the block's innermost spatial axis:
    a channels-last pooling (mean or max over H, W of NHWC) reads its channels contiguously."""
    stmt = sch.get(block)
    innermost = stmt.iter_vars[n_spatial - 1].var
    for region in stmt.reads:
        last = region.region[-1].min
        if isinstance(last, tirx.Var) and last.same_as(innermost) and len(region.region) > 1:
            return True
    return False


def _schedule_channels_last_reduction(sch: s_tir.Schedule, block, spatial, reduction) -> None:
    """Vectors along the contiguous spatial axis, the reduction loops outside them, the vector of
    accumulators in registers: one contiguous vector load per reduced element."""
    extent = _extent(sch, spatial[-1]) or 1
    width = next((v for v in VECTOR_WIDTHS if extent % v == 0), None)
    if width is None:
        return
    outer, lanes = sch.split(spatial[-1], [None, width])
    sch.reorder(*spatial[:-1], outer, *reduction, lanes)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, outer)
    sch.vectorize(sch.get_loops(accumulators)[-1])
    sch.vectorize(lanes)
    work = 1
    for loop in spatial[:-1] + [outer]:
        work *= _extent(sch, loop) or 1
    if work > 1:
        sch.parallel(sch.fuse(*spatial[:-1], outer) if spatial[:-1] else outer)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _vectorize_partial(sch: s_tir.Schedule, partial, n_spatial: int) -> None:
    """The rfactor block's loops are (spatial..., lane, reductions...): move the lane innermost."""
    loops = sch.get_loops(partial)
    lane = loops[n_spatial]
    sch.reorder(*loops[:n_spatial], *loops[n_spatial + 1 :], lane)
    sch.vectorize(lane)
    sch.decompose_reduction(partial, loops[n_spatial + 1])
    init = sch.get_sblock(sch.get(partial).name_hint + "_init")
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    if func.attrs is not None and SCHEDULED_ATTR in func.attrs:
        return func
    if has_conv_block(func):
        try:
            return schedule_conv(func).with_attr(SCHEDULED_ATTR, True)
        except (NotAConvKernel, s_tir.ScheduleError) as err:
            log.warning("bndeploy: conv kernel left to the generic schedule (%s)", str(err).splitlines()[-1][:200])
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    has_reduction = any(_is_reduction(sch, b) for b in blocks)
    scheduler = schedule_reduction if has_reduction else schedule_injective
    try:
        return scheduler(func).with_attr(SCHEDULED_ATTR, True)
    except (s_tir.ScheduleError, tvm.error.InternalError, RuntimeError) as err:  # TVM raises these for unschedulable kernels
        log.info("bndeploy: default schedule kept for a kernel (%s)", str(err).splitlines()[-1][:200])
        return func


TUNED_ATTR = "bndeploy.tuned"  # the kernel's schedule comes from a `bndeploy tune` database


def schedule_cpu_kernels(database=None) -> tvm.transform.Pass:
    """Schedules every kernel: the tuned schedule where `database` (a `bndeploy tune` folder's MetaSchedule
    database) has one for this exact kernel and target, else bndeploy's own."""

    @tvm.transform.module_pass(opt_level=0, name="bndeploy.ScheduleCPUKernels")
    def schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                tuned = _tuned_schedule(func, database, target) if database is not None else None
                updates[gv] = tuned if tuned is not None else schedule_func(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return schedule


def _tuned_schedule(func: tirx.PrimFunc, database, target) -> tirx.PrimFunc | None:
    if func.attrs is not None and SCHEDULED_ATTR in func.attrs:
        return None
    sch = database.query_schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target, "main")
    if sch is None:
        return None
    tuned = sch.mod["main"].without_attr("global_symbol")
    return tuned.with_attrs({SCHEDULED_ATTR: True, TUNED_ATTR: True})
