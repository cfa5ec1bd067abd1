"""Turn torch's inference-mode ONNX export into bndeploy's spec-faithful BatchNormalization graph.

torch.onnx's exporters cannot be trusted with BatchNorm (see shared notes): the dynamo exporter drops
``training_mode`` in train mode and folds Conv+BN when its optimizer runs; the TorchScript exporter runs
the model while tracing (mutating running statistics) and hides the running-stat outputs. bndeploy
therefore always exports an *eval-mode copy* with the optimizer off, then rewrites every
BatchNormalization node itself from the torch module it came from: epsilon, momentum (ONNX keeps
``1 - torch momentum``), scale/bias for ``affine=False``, ``training_mode`` and, in train mode, the
updated running statistics as named graph outputs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from bndeploy.errors import UnsupportedModelError

OPSET = 20
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class BatchNormInfo:
    """What the ONNX node of one torch BatchNorm module must say."""

    module: str  # the module's qualified name in the model; "" for a bare BatchNorm layer
    num_features: int
    epsilon: float
    momentum_torch: float
    affine: bool
    cumulative: bool  # torch momentum=None: cumulative moving average, momentum_torch = 1/(batches+1)

    @property
    def momentum_onnx(self) -> float:
        """ONNX momentum is the fraction of the running statistic kept, stored as float32."""
        return float(np.float32(1.0 - self.momentum_torch))

    @property
    def label(self) -> str:
        """The node's name and the prefix of its tensors: the module name, or ``bn`` for a bare layer."""
        return self.module or "bn"

    def parameter(self, name: str) -> str:
        """The ONNX initializer name the exporter gives this module's parameter or buffer ``name``."""
        return f"{self.module}.{name}" if self.module else name

    def updated_name(self, stat: str) -> str:
        return f"{self.label}.{stat}_updated"


def batchnorm_infos(model: nn.Module) -> list[BatchNormInfo]:
    infos = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if not isinstance(m, _BN_TYPES):
            raise UnsupportedModelError(f"{name}: {type(m).__name__} is not supported (BatchNorm1d/2d/3d are)")
        if not m.track_running_stats:
            raise UnsupportedModelError(
                f"BatchNorm {name!r} has track_running_stats=False: it always normalises with batch "
                "statistics and has no running statistics, which ONNX BatchNormalization cannot express "
                "in inference mode; set track_running_stats=True to export it")
        cumulative = m.momentum is None
        momentum = 1.0 / (int(m.num_batches_tracked) + 1) if cumulative else float(m.momentum)
        infos.append(BatchNormInfo(name, m.num_features, float(m.eps), momentum, m.affine, cumulative))
    return infos


def torch_to_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                  dynamic_batch: bool) -> onnx.ModelProto:
    """Export an eval-mode model with the dynamo exporter, optimizer off (it would fold BatchNorm away)."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in example)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, example, dynamo=True, optimize=False, opset_version=OPSET,
                                        input_names=input_names, dynamic_shapes=dynamic_shapes, verbose=False)
    except Exception as e:  # torch.export raises many types; all mean "this model cannot be exported"
        raise UnsupportedModelError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        quiet.setLevel(level)
    return fold_constants(program.model_proto)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir
    import onnxscript.optimizer

    ir_model = onnx_ir.from_proto(model)
    onnxscript.optimizer.fold_constants(ir_model)
    return onnx_ir.to_proto(ir_model)


def rewrite_batchnorms(model: onnx.ModelProto, infos: list[BatchNormInfo], training: bool) -> onnx.ModelProto:
    """Set every BatchNormalization node from its torch module; add running-stat outputs in train mode."""
    graph = model.graph
    by_running_mean = {i.parameter("running_mean"): i for i in infos}
    seen = set()
    for node in (n for n in graph.node if n.op_type == "BatchNormalization"):
        info = by_running_mean.get(node.input[3])
        if info is None:
            raise UnsupportedModelError(f"BatchNormalization node {node.name!r} reads running mean "
                                        f"{node.input[3]!r}, which matches no BatchNorm module")
        seen.add(info.module)
        _set_affine_inputs(graph, node, info)
        _set_attributes(node, info, training)
        node.name = info.label
        if training:
            _expose_running_stats(graph, node, info)
    missing = [i.module for i in infos if i.module not in seen]
    if missing:
        raise UnsupportedModelError(f"BatchNorm modules {missing} did not export as BatchNormalization nodes")
    return model


def _set_affine_inputs(graph: onnx.GraphProto, node: onnx.NodeProto, info: BatchNormInfo) -> None:
    if info.affine:
        node.input[1], node.input[2] = info.parameter("weight"), info.parameter("bias")
        return
    ones = np.ones(info.num_features, np.float32)
    zeros = np.zeros(info.num_features, np.float32)
    node.input[1], node.input[2] = f"{info.label}.unit_scale", f"{info.label}.zero_bias"
    graph.initializer.extend([numpy_helper.from_array(ones, node.input[1]),
                              numpy_helper.from_array(zeros, node.input[2])])


def _set_attributes(node: onnx.NodeProto, info: BatchNormInfo, training: bool) -> None:
    del node.attribute[:]
    node.attribute.extend([
        helper.make_attribute("epsilon", info.epsilon),
        helper.make_attribute("momentum", info.momentum_onnx),
        helper.make_attribute("training_mode", int(training)),
    ])


def _expose_running_stats(graph: onnx.GraphProto, node: onnx.NodeProto, info: BatchNormInfo) -> None:
    names = [info.updated_name("running_mean"), info.updated_name("running_var")]
    del node.output[1:]
    node.output.extend(names)
    graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [info.num_features]) for n in names)


def drop_zero_conv_bias(model: onnx.ModelProto, parameters: set[str]) -> onnx.ModelProto:
    """Remove the all-zero bias the exporter invents for ``Conv(bias=False)``, so the ONNX says what torch said."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3):
        bias = inits.get(node.input[2])
        if bias is not None and bias.name not in parameters and not numpy_helper.to_array(bias).any():
            del node.input[2]
    return model


def rename_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Give the model's own outputs stable names (``output`` or ``output_<i>``); running stats keep theirs."""
    graph = model.graph
    renames = {}
    for out, new in zip(graph.output, names):
        renames[out.name] = new
        out.name = new
    for node in graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = renames.get(name, name)
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return model


def remove_dead_code(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used_inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_inits)
    return model


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove stack traces and per-node metadata: smaller files, byte-identical across runs."""
    model.ClearField("metadata_props")
    model.graph.ClearField("doc_string")
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.ClearField("doc_string")
        node.ClearField("metadata_props")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.initializer):
        value.ClearField("doc_string")
        value.ClearField("metadata_props")
    return model
