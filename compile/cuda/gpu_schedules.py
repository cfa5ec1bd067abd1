"""GPU schedules for the CUDA build: TVM's dlight rules plus bndeploy's cross-thread reduction rule, and the
check that no reduction is left to one thread (a BatchNorm statistic summed serially by one GPU thread)."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from bndeploy.compile.tir_exprs import block_nests, loops_driving
from bndeploy.errors import UnsupportedModelError

@dataclass(frozen=True)
class ReductionSchedule:
    """How one reduction block of a scheduled PrimFunc runs on the GPU."""

    function: str
    block: str
    reduction_extent: int  # values reduced per output element
    output_extent: int  # output elements of the block
    serial_per_thread: int  # reduction iterations one thread runs in sequence

    @property
    def narrow(self) -> bool:
        """Fewer outputs than values per output: parallelism has to come from the reduction axis."""
        return self.output_extent < self.reduction_extent

    @property
    def serial(self) -> bool:
        """One thread reduces every value of its output alone (no thread cooperation)."""
        return self.serial_per_thread >= self.reduction_extent


def _int_extent(expr) -> int:
    return int(expr) if isinstance(expr, int) else int(expr.value)


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def reduction_schedules(func: tirx.PrimFunc, name: str = "main") -> list[ReductionSchedule]:
    """Describe every reduction block of a scheduled (not yet lowered) PrimFunc."""
    summaries = (_summarize_reduction(name, realize, loops) for loops, realize in block_nests(func.body))
    return [summary for summary in summaries if summary is not None]


def _summarize_reduction(name: str, realize, loops: list) -> ReductionSchedule | None:
    block = realize.block
    bound = list(zip(block.iter_vars, realize.iter_values))
    reduce = [(iv, value) for iv, value in bound if iv.iter_type == tirx.IterVar.CommReduce]
    if not reduce:
        return None
    serial_loops = loops_driving([loop for loop in loops if loop.kind != tirx.ForKind.THREAD_BINDING],
                                 [value for _, value in reduce])
    return ReductionSchedule(
        function=name,
        block=block.name_hint,
        reduction_extent=_product(_int_extent(iv.dom.extent) for iv, _ in reduce),
        output_extent=_product(
            _int_extent(iv.dom.extent) for iv, _ in bound if iv.iter_type == tirx.IterVar.DataPar
        ),
        serial_per_thread=_product(_int_extent(loop.extent) for loop in serial_loops),
    )


def module_reduction_schedules(mod: tvm.IRModule) -> list[ReductionSchedule]:
    return [
        summary
        for gvar, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc)
        for summary in reduction_schedules(func, gvar.name_hint)
    ]


def serial_narrow_reductions(mod: tvm.IRModule) -> list[ReductionSchedule]:
    """Reductions that leave the GPU idle: few outputs, each reduced by one thread alone."""
    return [r for r in module_reduction_schedules(mod) if r.narrow and r.serial and r.reduction_extent > 1]


class CrossThreadReduction(GPUScheduleRule):
    """dlight rule for fused functions with a narrow reduction that dlight's own reduction rules skip.

    Such functions (a reduction fused with other blocks, as BatchNorm statistics get) otherwise fall to
    dlight's Fallback rule, which binds only the output elements to threads: for a per-channel mean
    over (N, H, W) that is C threads in one block each summing N*H*W values serially. Here every
    output element gets a thread block whose threads split the reduction and combine their partial
    results with warp shuffles and shared memory (TVM's cross-thread allreduce). Other blocks keep
    Fallback's mapping; each becomes its own kernel.
    """

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if not any(r.narrow for r in reduction_schedules(func)):
            return None
        max_threads = s_tir.dlight.base.max_threads_per_block(target)
        sch = s_tir.Schedule(func)
        infos = s_tir.dlight.analysis.normalize_prim_func(sch)
        if infos is None or any("O" in info.dom_kind() for info in infos):
            return None
        infos = s_tir.dlight.base.try_inline(sch, infos)
        serial_reductions = []
        for info in infos:
            block = info.block_rv
            if any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(block)):
                continue  # already placed inside a reduction's thread block
            s_loops = [loop for loop, kind in zip(sch.get_loops(block), info.dom_kind()) if kind == "S"]
            r_loops = [loop for loop, kind in zip(sch.get_loops(block), info.dom_kind()) if kind == "R"]
            if not s_loops:
                s_loops = [sch.add_unit_loop(block)]
            sch.reorder(*s_loops, *r_loops)
            if r_loops and _is_narrow(info):
                self._cross_thread(sch, block, s_loops, r_loops, max_threads)
            else:
                block_x, thread_x = sch.split(sch.fuse(*s_loops), factors=[None, max_threads])
                sch.bind(block_x, "blockIdx.x")
                sch.bind(thread_x, "threadIdx.x")
                if r_loops:
                    serial_reductions.append((block, r_loops[0]))
        for block, r_loop in serial_reductions:
            sch.decompose_reduction(block, r_loop)
        return sch

    @staticmethod
    def _cross_thread(sch, block, s_loops, r_loops, max_threads: int) -> None:
        block_x = sch.fuse(*s_loops)
        reduce = sch.fuse(*r_loops)
        threads = min(max_threads, _next_power_of_two(_int_extent(sch.get(reduce).extent)))
        _, thread_x = sch.split(reduce, factors=[None, max(threads, 32)])
        sch.bind(block_x, "blockIdx.x")
        sch.bind(thread_x, "threadIdx.x")
        _attach_pointwise_epilogues(sch, block, block_x)


def _is_narrow(info) -> bool:
    extents = [_int_extent(extent) for extent in info.dom()]
    spatial = _product(e for e, kind in zip(extents, info.dom_kind()) if kind == "S")
    reduction = _product(e for e, kind in zip(extents, info.dom_kind()) if kind == "R")
    return spatial < reduction


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _attach_pointwise_epilogues(sch, block, block_x) -> None:
    """Move a consumer computing one value per reduction output (e.g. sum -> mean) into its block.

    Larger consumers (a broadcast over N*C*H*W) stay separate kernels: placed here they would run
    serially inside one thread block.
    """
    produced = _product(_int_extent(iv.dom.extent) for iv in sch.get(block).iter_vars
                        if iv.iter_type == tirx.IterVar.DataPar)
    for consumer in sch.get_consumers(block):
        extent = _product(_int_extent(sch.get(loop).extent) for loop in sch.get_loops(consumer))
        if extent == produced:
            sch.reverse_compute_at(consumer, block_x)


class SkipNarrowReductions(GPUScheduleRule):
    """Wraps a dlight rule so that it leaves functions with a narrow reduction to CrossThreadReduction.

    dlight's Matmul rule gives each thread whole dot products: right for convolutions (many outputs,
    short reductions), serial for e.g. a 10-class classifier head over 4096 features.
    """

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        if isinstance(func, tirx.PrimFunc) and any(r.narrow for r in reduction_schedules(func)):
            return None
        return self.rule.apply(func, target, tunable)


def _schedule_rules():
    from .conv_stats import ConvStatisticsSchedule

    dl = s_tir.dlight
    return [
        ConvStatisticsSchedule(),  # only bndeploy's conv + statistics kernels (fuse_statistics.py)
        SkipNarrowReductions(dl.gpu.Matmul()),  # conv2d as implicit GEMM
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        CrossThreadReduction(),
        dl.gpu.Fallback(),
    ]


def schedule_passes(target: tvm.target.Target) -> list:
    """TVM's CUDA legalization passes (with bndeploy's NaN-preserving legalisations) and bndeploy's
    reduction rule added to the dlight rules."""
    from bndeploy.compile.nan_semantics import legalize_ops

    return [
        legalize_ops(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        s_tir.dlight.ApplyDefaultSchedule(*_schedule_rules()),
    ]


def schedule_for_cuda(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Route train-mode conv -> BN statistics to bndeploy's fused kernels, legalize, fuse and GPU-schedule a
    Relax module; returns Relax + scheduled TIR (not lowered)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    from .fuse_statistics import fuse_conv_statistics

    with target:
        passes = [fuse_conv_statistics] + cuda.library_dispatch_passes(target) + schedule_passes(target)
        scheduled = tvm.transform.Sequential(passes)(mod)
    require_parallel_reductions(scheduled)
    return scheduled


def require_parallel_reductions(scheduled: tvm.IRModule) -> None:
    serial = serial_narrow_reductions(scheduled)
    if serial:
        names = ", ".join(f"{r.function}/{r.block} ({r.reduction_extent} values per thread)" for r in serial)
        raise UnsupportedModelError(f"bndeploy could not parallelise these GPU reductions: {names}")


def lowering_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """What follows schedule_for_cuda: TVM's lowering of a scheduled module to a VM executable."""
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="BndeployCUDALowering")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            rest = cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)
            return tvm.transform.Sequential(rest)(mod)

    return pipeline
