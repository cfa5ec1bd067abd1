"""ONNX nodes as `check --locate` and `debug reduce` name them, and their tensors as ONNX Runtime exposes them.

A node without a name is called ``<OpType>_<index in graph order>`` (deterministic, so two runs and both
tools agree), and every report says how many were named that way. Intermediate tensors are exposed by
adding them to the graph's outputs, typed from ONNX shape inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from bndeploy.errors import BndeployError


@dataclass(frozen=True)
class GraphNodes:
    names: list[str]  # one per graph node, in graph (topological) order
    generated: int  # how many of them had no name in the model
    producer: dict[str, int]  # tensor name -> index of the node that writes it

    def unnamed_note(self) -> list[str]:
        if not self.generated:
            return []
        return [f"{self.generated} ONNX node(s) have no name; they are called <OpType>_<index in graph order> here "
                "(e.g. Conv_3), the same in every run"]


def graph_nodes(graph) -> GraphNodes:
    names, generated, taken = [], 0, {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        name = node.name
        if not name:
            generated += 1
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            taken.add(name)
        names.append(name)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    return GraphNodes(names, generated, producer)


def check_topological_order(model) -> None:
    """Refuse a graph whose nodes are not in topological order (the ONNX spec requires it)."""
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        missing = [t for t in node.input if t not in known]
        if missing:
            raise BndeployError(f"ONNX node {node.name or node.op_type!r} reads {missing[0]!r} before any node writes it: "
                                "the graph is not in topological order (as the ONNX spec requires)")
        known.update(node.output)


def with_outputs_exposed(model, tensors: list[str]):
    """A copy of ``model`` whose graph also outputs ``tensors`` (typed by shape inference); returns it and the
    tensors that could not be typed (left out)."""
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(exposed)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    present = {o.name for o in exposed.graph.output}
    untyped = []
    for tensor in tensors:
        if tensor in present:
            continue
        if tensor not in types or not types[tensor].tensor_type.elem_type:
            untyped.append(tensor)
            continue
        value = exposed.graph.output.add()
        value.name = tensor
        value.type.CopyFrom(types[tensor])
        present.add(tensor)
    return exposed, untyped
