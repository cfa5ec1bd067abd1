"""CPU code generation: Relax module (after bndeploy's graph passes) -> scheduled TVM executable.

TVM's default CPU pipeline leaves every kernel serial and scalar (80-200x slower than ONNX Runtime on
a conv). build_cpu inserts two steps into it: before legalisation, conv2d chains and BatchNorm batch
statistics are routed to bndeploy's hand-scheduled kernels (compile/schedules/); after fusion, every
remaining kernel gets a parallel + vectorised schedule; tir_pipeline.py lowers the TIR (x86 register tiles
kept on the stack). No tuning is needed; a `bndeploy tune` database, when given, supplies the schedules it
measured faster.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from bndeploy.compile.kernel_map import KernelMapRecorder
from bndeploy.compile.nan_semantics import legalize_ops
from bndeploy.compile.schedules import (convert_to_channels_last, interleave_grouped_inputs, rewrite_to_kernels,
                                       schedule_cpu_kernels)
from bndeploy.compile.tir_pipeline import tir_pipeline_for


def fusion_passes(target: tvm.target.Target, kernel_map: KernelMapRecorder | None = None) -> list:
    """Relax module -> fused, unscheduled TIR kernels: channels-last, kernels routed, legalised, fused.
    ``kernel_map``: records which ONNX tensor each kernel writes (kernel_map.py), changing nothing."""
    fuse = [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if kernel_map is not None:
        fuse = [kernel_map.before_fusion(), fuse[0], kernel_map.after_fusion(), fuse[1], kernel_map.after_fuse_tir()]
    return (
        [convert_to_channels_last, relax.transform.FoldConstant(), interleave_grouped_inputs, rewrite_to_kernels]
        + cpu_generic.library_dispatch_passes(target)
        + [legalize_ops(cpu=True), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), *fuse]
    )


def scheduling_passes(target: tvm.target.Target, database=None, kernel_map: KernelMapRecorder | None = None) -> list:
    """Relax module -> scheduled TIR kernels (`database`: a `bndeploy tune` folder's database, or None)."""
    return fusion_passes(target, kernel_map) + [schedule_cpu_kernels(database)]


def cpu_pipeline(target: tvm.target.Target, database=None, kernel_map: KernelMapRecorder | None = None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="bndeploy.CPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                scheduling_passes(target, database, kernel_map)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
                + ([kernel_map.after_lowering()] if kernel_map is not None else [])
            )
            return seq(mod)

    return _pipeline


def schedule_module(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> tvm.IRModule:
    """The module as build_cpu schedules it, before VM lowering: for tests and IR dumps."""
    with target:
        return tvm.transform.Sequential(scheduling_passes(target, database))(mod)


def lower_cpu(mod: tvm.IRModule, target: tvm.target.Target, database=None,
              kernel_map: KernelMapRecorder | None = None) -> tvm.IRModule:
    """Relax module -> VM-ready module with scheduled kernels (the input of `build_lowered`)."""
    return cpu_pipeline(target, database, kernel_map)(mod)


def build_lowered(lowered: tvm.IRModule, target: tvm.target.Target) -> relax.Executable:
    return tvm.compile(lowered, target=target, relax_pipeline=None, tir_pipeline=tir_pipeline_for(target))


def build_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> relax.Executable:
    """Compile a Relax module for an llvm target with bndeploy's CPU schedules."""
    return build_lowered(lower_cpu(mod, target), target)
