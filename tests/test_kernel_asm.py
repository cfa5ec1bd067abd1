"""The generated machine code of bndeploy's conv kernels, for every x86 class and the ARM edge CPUs.

For each conv class of real CNNs, compiled for each target (cross-compiled ones included: the assembly
is LLVM's, no board needed), every innermost loop that issues vector FMAs keeps its vector registers off
the stack (no accumulator, weight or input spilled and reloaded) and really is a register tile (several
vector FMAs per iteration). On the ARM targets the FMAs are NEON `fmla v.4s`.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bndeploy.compile.cpu import build_lowered, lower_cpu
from bndeploy.compile.kernel_asm import arch_of_triple, fma_loops
from bndeploy.compile.onnx_import import import_onnx
from bndeploy.compile.targets import resolve_target

TARGETS = ("x86-64-avx2", "x86-64-avx512", "cortex-a72", "cortex-a76", "cortex-a78ae", "carmel")

# name: (input NCHW, out channels, kernel, stride, groups)
CONV_CLASSES = {
    "3x3 s1": ((1, 64, 28, 28), 64, 3, 1, 1),
    "3x3 s2": ((1, 64, 28, 28), 128, 3, 2, 1),
    "1x1": ((1, 64, 14, 14), 128, 1, 1, 1),
    "7x7 s2 stem": ((1, 3, 56, 56), 32, 7, 2, 1),
    "depthwise 3x3 s1": ((1, 64, 28, 28), 64, 3, 1, 64),
    "depthwise 3x3 s2": ((1, 96, 56, 56), 96, 3, 2, 96),
    "depthwise 5x5 s2": ((1, 72, 14, 14), 72, 5, 2, 72),
    "grouped 8 per group": ((1, 64, 28, 28), 64, 3, 1, 8),
}


def conv_relu(x_shape, out_channels, kernel, stride, groups):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_channels, x_shape[1] // groups, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[kernel // 2] * 4, strides=[stride] * 2, group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def assembly(model, target_name: str) -> str:
    target = resolve_target(target_name).tvm_target()
    executable = build_lowered(lower_cpu(import_onnx(model), target), target)
    return executable.mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("case", sorted(CONV_CLASSES))
def test_conv_kernel_keeps_vector_registers_off_the_stack(case, target_name):
    spec = resolve_target(target_name)
    loops = fma_loops(assembly(conv_relu(*CONV_CLASSES[case]), target_name), arch_of_triple(spec.triple))
    inner = [loop for loop in loops if loop.innermost]
    assert inner, "no loop with vector FMAs: the conv is not vectorised"
    spilling = [loop for loop in inner if loop.vector_stack_accesses]
    assert not spilling, f"vector registers spilled to the stack inside the innermost FMA loops: {spilling}"
    # The hottest loop is a register tile: several vector FMAs per iteration of its own, its registers off
    # the stack. (In the depthwise kernels, branches around the zero border of an inlined padding leave
    # small FMA loops beside or inside it, so the tile loop need not be innermost.)
    tile = max(loops, key=lambda loop: loop.own_fmas)
    assert tile.own_fmas >= 4, f"no FMA loop is a register tile: {loops}"
    assert not tile.own_vector_stack_accesses, f"the register tile loop spills vector registers: {tile}"
