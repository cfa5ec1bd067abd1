"""The work each compiled kernel does, recorded in artifact.json for `bndeploy profile`.

flops: useful floating-point operations per call (a conv kernel's are counted from its shape, not from
its padded register tiles, so "% of peak" is honest); other kernels use TVM's estimate of the loop
nest. bytes: the size of every tensor the kernel reads or writes once (its parameters), the least
traffic it can cause, which bounds a memory-bound kernel.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import s_tir, tirx

from .schedules.conv2d import CONV_FLOPS_ATTR
from .tir_exprs import element_bytes

log = logging.getLogger(__name__)


def kernel_costs(mod: tvm.IRModule) -> dict[str, dict[str, int]]:
    """{kernel name: {"flops": ..., "bytes": ...}} for every PrimFunc of a scheduled module."""
    return {gv.name_hint: {"flops": _flops(func), "bytes": _parameter_bytes(func)}
            for gv, func in mod.functions.items() if isinstance(func, tirx.PrimFunc)}


def _parameter_bytes(func: tirx.PrimFunc) -> int:
    total = 0
    for param in func.params:
        buffer = param.ty
        if not isinstance(buffer, tirx.buffer.BufferType):
            continue
        try:
            elements = int(np.prod([int(d) for d in buffer.shape]))
        except TypeError:  # a symbolic dimension
            continue
        total += elements * element_bytes(buffer)
    return total


def _flops(func: tirx.PrimFunc) -> int:
    conv = _annotated_conv_flops(func)
    if conv is not None:
        return conv
    try:
        return int(s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": func})))
    except (tvm.error.TVMError, TypeError, ValueError) as err:  # loop nests TVM cannot estimate
        log.info("bndeploy: no FLOP estimate for a kernel (%s)", str(err).splitlines()[-1][:200])
        return 0


def _annotated_conv_flops(func: tirx.PrimFunc) -> int | None:
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (s_tir.ScheduleError, tvm.error.TVMError, ValueError):
        return None
    for block in blocks:
        annotations = sch.get(block).annotations
        if CONV_FLOPS_ATTR in annotations:
            return int(annotations[CONV_FLOPS_ATTR])
    return None
