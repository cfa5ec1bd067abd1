"""The kernel map: which ONNX tensor each compiled kernel writes, recorded at compile time for `check --locate`.

Kernel names alone are ambiguous (one fused kernel per group of ops, names shared between layers), so the
map is built from the Relax module itself, in these steps:

1. at import, every ONNX node's output is bound to a Relax variable named ``onnx:<tensor name>``
   (``onnx_names_on_vars``; the BatchNorm passes keep the name on the value that replaces a BN output);
2. just before FuseOps the named, legalised dataflow graph is kept (``KernelMapRecorder.before_fusion``);
3. after FuseOps every fused function's bindings are matched to the graph kept in step 2 by structure
   (same kernel, same arguments), so a fused kernel's outputs are the ONNX tensors its group ends with,
   and the named tensors inside it are recorded as having no boundary of their own; after FuseTIR the
   final kernel names are attached, and after VM lowering only the calls still made are kept (a kernel that
   only reshapes becomes a view), in the order the VM makes them (`check --locate` verifies that order).

A folded Conv+BatchNorm kernel therefore writes the BatchNorm's output, a fused epilogue its last op's.
Each output also records how its layout relates to the ONNX tensor (``axes``: kernel output =
onnx_tensor.transpose(axes); ``channel_positions``: where each channel went in a tensor stored with its
channels permuted, see PERMUTED_CHANNELS_ATTR), or why it cannot be compared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import onnx
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from .passes import bindings

ONNX_NAME_PREFIX = "onnx:"
# The layouts bndeploy's CPU pipeline gives a tensor: as in ONNX, or channels-last (ConvertLayout's NHWC).
CHANNELS_LAST = {4: (0, 2, 3, 1)}


# A pass that stores a tensor with its channels permuted (schedules/interleave_inputs.py) names its variable
# PERMUTED_NAME_PREFIX + the ONNX tensor's name and records where each ONNX channel went in the module
# attribute PERMUTED_CHANNELS_ATTR, {tensor: position of each channel}; the map records them with the tensor.
PERMUTED_NAME_PREFIX = "permuted:"
PERMUTED_CHANNELS_ATTR = "bndeploy.permuted_channels"


def onnx_tensor_of(var: relax.Var) -> str | None:
    return _name_after(var, ONNX_NAME_PREFIX)


def permuted_tensor_of(var: relax.Var) -> str | None:
    return _name_after(var, PERMUTED_NAME_PREFIX)


def _name_after(var: relax.Var, prefix: str) -> str | None:
    """The ONNX tensor a variable named `prefix` + tensor holds, else None."""
    name = var.name
    return name[len(prefix):] if name.startswith(prefix) else None


def permuted_channels(mod: tvm.IRModule) -> dict[str, list[int]]:
    recorded = (mod.attrs or {}).get(PERMUTED_CHANNELS_ATTR, {})
    return {str(tensor): [int(p) for p in positions] for tensor, positions in recorded.items()}


# --------------------------------------------------------------------------------------------------
# Step 1: names at import


@contextlib.contextmanager
def onnx_names_on_vars():
    """While active, TVM's ONNX importer binds each node's output to a variable named after its ONNX tensor.
    The caller holds the importer's patch lock."""
    from tvm.relax.frontend.onnx import onnx_frontend

    importer = onnx_frontend.ONNXGraphImporter
    parse, convert = importer._parse_value_proto, importer._convert_operator

    def parse_remembering_node(self, proto):
        if isinstance(proto, onnx.NodeProto):
            self._bndeploy_node = proto
        return parse(self, proto)

    def convert_naming_outputs(self, op_name, inputs, attr, opset):
        op = convert(self, op_name, inputs, attr, opset)
        node = getattr(self, "_bndeploy_node", None)
        return _named(self.bb, op, list(node.output)) if node is not None else op

    importer._parse_value_proto, importer._convert_operator = parse_remembering_node, convert_naming_outputs
    try:
        yield
    finally:
        importer._parse_value_proto, importer._convert_operator = parse, convert


def _is_computed_tensor(expr) -> bool:
    """A tensor some op computes (not a constant, and not a variable an op handed through unchanged)."""
    return (isinstance(expr, relax.Expr) and not isinstance(expr, (Constant, relax.Var, relax.Tuple))
            and isinstance(expr.ty, relax.TensorType))


def _named(bb: relax.BlockBuilder, op, outputs: list[str]):
    def name(index: int) -> str | None:
        return ONNX_NAME_PREFIX + outputs[index] if index < len(outputs) and outputs[index] else None

    def bound(field, index: int):
        if not name(index):
            return field
        if _is_computed_tensor(field):
            return bb.emit(field, name_hint=name(index))
        # A converter that unpacked a tuple itself (BatchNormalization): the item is re-bound under its name
        # (free, and the unnamed binding is left unused); a variable bound to a computation is never re-bound.
        value = bb.lookup_binding(field) if isinstance(field, relax.Var) else None
        return bb.emit(value, name_hint=name(index)) if isinstance(value, relax.TupleGetItem) else field

    if isinstance(op, relax.Tuple):
        return relax.Tuple([bound(f, i) for i, f in enumerate(op.fields)])
    if isinstance(op, relax.Expr) and not isinstance(op, Constant) and isinstance(op.ty, relax.TupleType):
        whole = op if isinstance(op, relax.Var) else bb.emit(op)
        return relax.Tuple([bb.emit(relax.TupleGetItem(whole, i), name_hint=name(i) or "")
                            for i in range(len(op.ty.fields))])
    return bound(op, 0) if isinstance(op, relax.Expr) and isinstance(op.ty, relax.TensorType) else op


def onnx_shapes(mod: tvm.IRModule, graph_outputs: list[str]) -> dict[str, list[int]]:
    """The ONNX layout of every named tensor, read right after import (before any layout pass)."""
    shapes = {}
    returned = returned_tensors(mod, graph_outputs)
    for binding in _main_bindings(mod):
        tensor = onnx_tensor_of(binding.var) or returned.get(binding.var)
        shape = _static_shape(binding.var)
        if tensor is not None and shape is not None:
            shapes[tensor] = shape
    return shapes


def returned_tensors(mod: tvm.IRModule, graph_outputs: list[str]) -> dict:
    """main's returned variables -> the ONNX graph outputs they are (the importer binds those to its own names)."""
    body = mod["main"].body.body
    returned = list(body.fields) if isinstance(body, relax.Tuple) else [body]
    return {var: name for var, name in zip(returned, graph_outputs) if isinstance(var, relax.Var)}


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3: the recorder (module passes that change nothing)


@dataclass
class KernelMapRecorder:
    onnx_shapes: dict[str, list[int]] = field(default_factory=dict)
    graph_outputs: list[str] = field(default_factory=list)
    _before: tvm.IRModule | None = None
    _calls: list[dict] = field(default_factory=list)  # one per kernel call of main, after FuseOps
    entries: list[dict] | None = None  # the kernel map, once FuseTIR has named the kernels

    def before_fusion(self):
        @tvm.transform.module_pass(opt_level=0, name="bndeploy.KernelMapBeforeFusion")
        def keep(mod, _ctx):
            self._before, self.entries = mod, None
            return mod

        return keep

    def after_fusion(self):
        @tvm.transform.module_pass(opt_level=0, name="bndeploy.KernelMapAfterFusion")
        def match(mod, _ctx):
            self._calls = (_match_groups(self._before, mod, self.onnx_shapes, self.graph_outputs)
                           if self._before is not None else [])
            return mod

        return match

    def after_fuse_tir(self):
        @tvm.transform.module_pass(opt_level=0, name="bndeploy.KernelMapAfterFuseTIR")
        def name_kernels(mod, _ctx):
            self.entries = _with_kernel_names(self._calls, mod)
            self._before = None
            return mod

        return name_kernels

    def after_lowering(self):
        """Keep only the kernel calls the VM still makes (a kernel that only reshapes becomes a view)."""
        @tvm.transform.module_pass(opt_level=0, name="bndeploy.KernelMapAfterLowering")
        def keep_calls_made(mod, _ctx):
            if self.entries is not None:
                self.entries = _calls_made(self.entries, _final_kernel_calls(mod))
            return mod

        return keep_calls_made


def _main_bindings(mod: tvm.IRModule):
    return bindings(mod["main"])


def _static_shape(expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _kernel_call(value):
    """(kernel GlobalVar, argument list) of a call_tir-style binding, else None."""
    if isinstance(value, relax.Call) and getattr(value.op, "name", "") in ("relax.call_tir", "relax.call_tir_inplace"):
        args = value.args[1]
        return value.args[0], list(args.fields) if isinstance(args, relax.Tuple) else [args]
    return None


def _key(value, translate):
    """What a binding computes, in terms of the pre-fusion graph: equal keys, equal values."""
    call = _kernel_call(value)
    if call is not None:
        prim, args = call
        return ("call", prim.name_hint, tuple(translate(a) for a in args))
    if isinstance(value, relax.TupleGetItem):
        return ("item", translate(value.tuple_value), int(value.index))
    return None


def _pre_fusion_index(before: tvm.IRModule) -> dict:
    index = {}
    for binding in _main_bindings(before):
        key = _key(binding.value, lambda a: a)
        if key is not None:
            index.setdefault(key, binding.var)
    return index


def _match_groups(before: tvm.IRModule, after: tvm.IRModule, onnx_shapes: dict, graph_outputs: list[str]) -> list[dict]:
    """One record per kernel call in ``after``'s main: the pre-fusion variables it ends with and contains."""
    index = _pre_fusion_index(before)
    names = returned_tensors(before, graph_outputs)
    positions = permuted_channels(before)
    tensor_of = lambda var: onnx_tensor_of(var) or names.get(var) or permuted_tensor_of(var)  # noqa: E731
    record_of = lambda pre: _output_record(pre, onnx_shapes, tensor_of, positions)  # noqa: E731
    to_pre: dict = {}
    translate = lambda expr: to_pre.get(expr, expr)  # noqa: E731
    calls = []
    for binding in _main_bindings(after):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) \
                and isinstance(after[value.op], relax.Function):
            outputs, inside = _match_fused(after[value.op], [translate(a) for a in value.args], index)
            calls.append(_call_record(binding.var, outputs, inside, record_of, tensor_of))
            if len(outputs) == 1:
                to_pre[binding.var] = outputs[0] if outputs[0] is not None else binding.var
        elif _kernel_call(value) is not None:
            pre = index.get(_key(value, translate))
            calls.append(_call_record(binding.var, _kernel_outputs(binding.var, pre, index), [], record_of, tensor_of))
            if pre is not None:
                to_pre[binding.var] = pre
        else:
            key = _key(value, translate)
            if key is not None and key in index:
                to_pre[binding.var] = index[key]
    return calls


def _kernel_outputs(var, pre, index: dict) -> list:
    """The pre-fusion variables a kernel call writes: itself, or for a kernel with several outputs (a conv that
    also sums batch statistics) the variables bound to each item of its result."""
    if pre is None or not isinstance(var.ty, relax.TupleType):
        return [pre]
    return [index.get(("item", pre, i)) for i in range(len(var.ty.fields))]


def _match_fused(func: relax.Function, args: list, index: dict) -> tuple[list, list]:
    """The pre-fusion variables a fused function returns, and the ones bound inside it."""
    to_pre = dict(zip(func.params, args))
    translate = lambda expr: to_pre.get(expr, expr)  # noqa: E731
    inside = []
    for binding in bindings(func):
        pre = index.get(_key(binding.value, translate))
        if pre is not None:
            to_pre[binding.var] = pre
            inside.append(pre)
    body = func.body.body
    returned = list(body.fields) if isinstance(body, relax.Tuple) else [body]
    outputs = [to_pre.get(r) for r in returned]
    return outputs, [v for v in inside if not any(v.same_as(o) for o in outputs if o is not None)]


def _call_record(var, outputs: list, inside: list, record_of, tensor_of) -> dict:
    return {
        "var": var,
        "outputs": [record_of(pre) for pre in outputs],
        "inside": [t for t in (tensor_of(v) for v in inside) if t is not None],
    }


def _output_record(pre, onnx_shapes: dict, tensor_of, permuted: dict[str, list[int]]) -> dict:
    """The tensor a kernel output holds and its layout: kernel output == onnx_tensor.transpose(axes), the
    channels (last axis) at `channel_positions` where a pass permuted them."""
    tensor = tensor_of(pre) if pre is not None else None
    if tensor is None:
        return {"tensor": None}
    shape = _static_shape(pre)
    positions = permuted.get(tensor) if permuted_tensor_of(pre) else None
    layout_shape = shape[:-1] + [len(positions)] if positions and shape else shape
    axes, why = layout_axes(onnx_shapes.get(tensor), layout_shape)
    record = {"tensor": tensor, "shape": shape, "axes": axes}
    if positions:
        record["channel_positions"] = positions
    if why:
        record["not_comparable"] = why
    return record


def layout_axes(onnx_shape: list[int] | None, shape: list[int] | None) -> tuple[list[int] | None, str | None]:
    """``axes`` with kernel output == onnx_tensor.transpose(axes), or None and why not."""
    if onnx_shape is None or shape is None:
        return None, "its shape is not static"
    identity = list(range(len(onnx_shape)))
    fits = [axes for axes in (identity, list(CHANNELS_LAST.get(len(onnx_shape), identity)))
            if len(shape) == len(onnx_shape) and [onnx_shape[a] for a in axes] == shape]
    distinct = {tuple(a for a in axes if onnx_shape[a] != 1) for axes in fits}
    if not fits:
        return None, (f"the kernel writes shape {shape}, the ONNX tensor has {onnx_shape} "
                      "(no known layout maps one to the other)")
    if len(distinct) > 1:
        return None, f"shape {shape} reads as both NCHW and NHWC (equal channel and spatial sizes)"
    return fits[0], None


def _with_kernel_names(calls: list[dict], mod: tvm.IRModule) -> list[dict] | None:
    """Attach each kernel's final name (after FuseTIR) to its record, in the order main calls them."""
    by_var = {c["var"]: c for c in calls}
    entries = []
    for binding in _main_bindings(mod):
        call = _kernel_call(binding.value)
        if call is None:
            continue
        record = by_var.get(binding.var)
        if record is None:  # a kernel FuseOps did not produce: the map would be wrong, so there is none
            return None
        entries.append({"kernel": call[0].name_hint, "outputs": record["outputs"], "inside": record["inside"]})
    return entries


def _final_kernel_calls(mod: tvm.IRModule) -> list[str]:
    """The kernels main calls after VM lowering, in order (DPS calls of PrimFuncs)."""
    names = []
    for binding in _main_bindings(mod):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) \
                and isinstance(mod[value.op], tvm.tirx.PrimFunc):
            names.append(value.op.name_hint)
    return names


def _calls_made(entries: list[dict], calls: list[str]) -> list[dict] | None:
    """The entries whose kernels are still called, matched in order; None when the calls do not follow them."""
    kept, position = [], 0
    for name in calls:
        while position < len(entries) and entries[position]["kernel"] != name:
            position += 1
        if position == len(entries):
            return None
        kept.append(entries[position])
        position += 1
    return kept
