"""InterleaveGroupedInputs: a conv writes its output in the channel order the grouped conv after it reads.

A grouped conv whose groups are narrower than a vector computes several groups per vector (conv2d.py's
interleaved tile), and each of its tasks first copies its input rows with the groups' channels interleaved.
Where that input is made by a dense conv through per-channel elementwise ops only (RegNet's and ResNeXt's
1x1 conv -> BN -> ReLU -> grouped 3x3), the dense conv can write its output channels in the interleaved
order instead, for nothing: its weights' rows and the per-channel constants after it are permuted, and the
missing groups of a last, short vector become zero channels. The grouped conv then reads its input in place.

The rewrite keeps the Relax program's meaning: the grouped conv's input becomes `take(interleaved, positions,
axis=3)`, the original channel order, which `rewrite_to_kernels` recognises and drops, reading `interleaved`
in place (`ConvSpec.input_groups_interleaved`). A permuted tensor's variable is renamed and the position of
each of its ONNX channels recorded (kernel_map.py), so `check --locate` compares it in ONNX's order.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..kernel_map import PERMUTED_CHANNELS_ATTR, PERMUTED_NAME_PREFIX, onnx_tensor_of
from ..passes import bindings, use_counts
from .conv2d import in_place_groups_per_vector, interleaved_input_order, interleaved_input_positions
from .isa import VectorISA, isa_for_target
from .relax_rewrite import (CHANNEL_AXIS, bound_values, channel_vector, conv_spec, conv_stats_source, op_name,
                            rewrite_functions)

# Per-channel ops a permutation of the channels passes through: (op, whether a constant operand may be a
# per-channel vector, which is then permuted too; else only a scalar).
CHANNELWISE_OPS = {"relax.nn.relu": False, "relax.add": True, "relax.subtract": True, "relax.multiply": True,
                   "relax.maximum": True, "relax.minimum": True}
NHWC_CHANNELS = CHANNEL_AXIS["NHWC"]
INTERLEAVED_NAME = "interleaved_channels"


@tvm.transform.module_pass(opt_level=0, name="bndeploy.InterleaveGroupedInputs")
def interleave_grouped_inputs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Expects the module's constants folded (the per-channel constants it permutes)."""
    isa = isa_for_target(tvm.target.Target.current())
    return rewrite_functions(mod, lambda folded: _Interleaver(folded, isa), fold=False, attrs=_permuted_attrs)


def _permuted_attrs(rewriter: "_Interleaver") -> dict:
    return {PERMUTED_CHANNELS_ATTR: rewriter.permuted_tensors} if rewriter.permuted_tensors else {}


class _Chain:
    """A dense conv -> channelwise ops -> a grouped conv that reads the chain's end in interleaved order."""

    def __init__(self, producer: relax.Var, steps: list[relax.Var], order: np.ndarray, positions: np.ndarray):
        self.producer, self.steps = producer, steps  # the vars the chain binds, producer first
        self.order = order  # the original channel at each new position (>= channels: a zero channel)
        self.positions = positions  # each original channel's new position


def find_chains(func: relax.Function, isa: VectorISA) -> dict[relax.Call, _Chain]:
    """grouped conv call -> the chain that can feed it in interleaved order."""
    value_of = bound_values(func)
    uses = use_counts(func)
    statistics = {source.conv for b in bindings(func) if (source := conv_stats_source(b.value, value_of)) is not None}
    chains = {}
    for binding in bindings(func):
        call = binding.value
        if op_name(call) != "relax.nn.conv2d" or call in statistics:
            continue
        spec = conv_spec(call)
        per_vector = 1 if spec is None else in_place_groups_per_vector(spec, isa)
        if per_vector == 1:
            continue
        chain = _chain_into(call.args[0], value_of, uses, statistics, spec.in_channels)
        if chain is not None:
            producer, steps = chain
            chains[call] = _Chain(producer, steps, interleaved_input_order(spec, per_vector),
                                  interleaved_input_positions(spec, per_vector))
    return chains


def _chain_into(data, value_of, uses: dict, statistics: set, channels: int):
    """(dense conv's var, channelwise ops' vars) whose last var is `data` and whose vars are used only along
    the chain, else None."""
    steps = []
    var = data
    while isinstance(var, relax.Var) and uses.get(var, 0) == 1:
        value = value_of(var)
        name = op_name(value)
        if name == "relax.nn.conv2d":
            spec = conv_spec(value)
            if spec is None or spec.groups != 1 or spec.out_channels != channels or value in statistics:
                return None
            return var, steps[::-1]
        operand = _chain_operand(value, channels)
        if operand is None:
            return None
        steps.append(var)
        var = operand
    return None


def _chain_operand(call, channels: int):
    """The tensor operand of a channelwise op whose other operand (if any) is a scalar or per-channel constant."""
    name = op_name(call)
    if name not in CHANNELWISE_OPS:
        return None
    if len(call.args) == 1:
        return call.args[0]
    tensors = [a for a in call.args if not isinstance(a, Constant)]
    constants = [a for a in call.args if isinstance(a, Constant)]
    if len(tensors) != 1 or len(constants) != 1:
        return None
    if channel_vector(constants[0], channels, NHWC_CHANNELS) is None:
        return None
    if not CHANNELWISE_OPS[name] and constants[0].value.numpy().size != 1:
        return None
    return tensors[0]


def _permuted(values: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    """`values` with its `axis` in `order`; positions past its size are zeros."""
    padded_shape = list(values.shape)
    padded_shape[axis] = int(order.max()) + 1
    padded = np.zeros(padded_shape, values.dtype)
    padded[tuple(slice(0, size) for size in values.shape)] = values
    return np.ascontiguousarray(np.take(padded, order, axis=axis))


@mutator
class _Interleaver(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, isa: VectorISA):
        super().__init__(mod)
        self._isa = isa
        self.permuted_tensors: dict[str, list[int]] = {}  # ONNX tensor -> position of each of its channels

    def rewrite(self, func: relax.Function) -> relax.Function:
        self._chains = find_chains(func, self._isa)
        self._chain_of = {var: chain for chain in self._chains.values() for var in [chain.producer, *chain.steps]}
        return self.visit_expr(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        chain = self._chain_of.get(binding.var)
        if chain is None:
            return super().visit_var_binding_(binding)
        tensor = onnx_tensor_of(binding.var)
        name = INTERLEAVED_NAME
        if tensor is not None:
            name = PERMUTED_NAME_PREFIX + tensor
            self.permuted_tensors[tensor] = [int(p) for p in chain.positions]
        self.set_var_remap(binding.var, self.builder_.emit(self._permute(binding.value, chain.order), name_hint=name))

    def visit_call_(self, call: relax.Call):
        chain = self._chains.get(call)
        if chain is None:
            return super().visit_call_(call)
        interleaved = self.visit_expr(call.args[0])
        positions = relax.const(chain.positions.astype("int64"))
        data = self.builder_.emit(relax.op.take(interleaved, positions, axis=NHWC_CHANNELS, mode="clip"))
        return relax.Call(call.op, [data, call.args[1]], call.attrs)

    def _permute(self, call: relax.Call, order: np.ndarray) -> relax.Call:
        """The chain's op with its output channels in `order`: a conv's weight rows, an op's per-channel
        constant."""
        if op_name(call) == "relax.nn.conv2d":
            weight = relax.const(_permuted(call.args[1].value.numpy(), order, axis=0))
            return relax.Call(call.op, [self.visit_expr(call.args[0]), weight], call.attrs)
        args = []
        for arg in call.args:
            if isinstance(arg, Constant) and arg.value.numpy().size > 1:
                value = arg.value.numpy()
                arg = relax.const(_permuted(value, order, axis=value.ndim - 1))
            args.append(self.visit_expr(arg))
        return relax.Call(call.op, args, call.attrs)
