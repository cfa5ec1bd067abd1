"""`bndeploy debug reduce MODEL.onnx --check "COMMAND"`: the smallest subgraph that still fails a check.

As Polygraphy's `debug reduce` (bisect mode): the model's nodes are taken in topological order; first the
output side is cut (the graph ending at node k, for the smallest k that still fails), then the input side
(the ancestors of that node from position s on, for the largest s that still fails). A cut tensor becomes
a graph input fed with the value it had in the original model (computed once by ONNX Runtime with graph
optimizations off), so every candidate sees the same data as the full model did.

A candidate fails when the check command exits non-zero, or, with a regex, when the regex matches its
output. The command gets the candidate through the placeholders ``{model}`` and ``{inputs}`` (an .npz of
its inputs). Every check's verdict is written to a state file in the output folder as soon as it is
known (atomically), so an interrupted reduction resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.files import atomic_file, sha256_of

MODEL_PLACEHOLDER, INPUTS_PLACEHOLDER = "{model}", "{inputs}"
CANDIDATE_MODEL, CANDIDATE_INPUTS = "candidate.onnx", "candidate_inputs.npz"
REDUCED_MODEL, REDUCED_INPUTS = "reduced.onnx", "reduced_inputs.npz"
STATE_FILE = "reduce-state.json"
OUTPUT_LINES_SHOWN = 5


@dataclass(frozen=True)
class ReduceSettings:
    check: str  # shell command; {model} and {inputs} are replaced by the candidate's files
    fail_regex: str | None = None  # fails when this matches the command's output (else: a non-zero exit)
    timeout_s: float | None = None  # per check run
    force: bool = False  # discard a state file left by another reduction in the same folder

    def validate(self) -> None:
        if MODEL_PLACEHOLDER not in self.check:
            raise BndeployError(f"the check command must contain {MODEL_PLACEHOLDER} (where the candidate model goes), "
                                f"e.g. --check \"python my_check.py {MODEL_PLACEHOLDER} {INPUTS_PLACEHOLDER}\"")
        if self.fail_regex is not None:
            try:
                re.compile(self.fail_regex)
            except re.error as e:
                raise BndeployError(f"--fail-regex {self.fail_regex!r} is not a valid regular expression: {e}") from None


@dataclass
class ReduceResult:
    nodes: list[str]  # the reduced model's nodes, in graph order
    ops: list[str]
    inputs: list[str]
    outputs: list[str]
    model: Path
    inputs_file: Path
    original_nodes: int
    checks_run: int
    checks_reused: int
    last_failure_output: str = ""  # the end of what the check printed when the reduced model failed it
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        listed = ", ".join(f"{n!r} ({op})" for n, op in zip(self.nodes[:8], self.ops[:8]))
        more = f", ... ({len(self.nodes)} in all)" if len(self.nodes) > 8 else ""
        lines = [f"reduced {self.original_nodes} nodes to {len(self.nodes)}: {listed}{more}",
                 f"  inputs {', '.join(self.inputs)}; outputs {', '.join(self.outputs)}",
                 f"  wrote {self.model} and {self.inputs_file}",
                 f"  {self.checks_run} check run(s), {self.checks_reused} verdict(s) reused from {STATE_FILE}"]
        if self.last_failure_output:
            lines += ["  the check on it ended with (make sure this is the failure you are after):",
                      *(f"    {line}" for line in self.last_failure_output.splitlines())]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def reduce_model(model_path, out_dir, settings: ReduceSettings, inputs=None, seed: int | None = None,
                 say=lambda line: None) -> ReduceResult:
    settings.validate()
    model_path, out_dir = Path(model_path), Path(out_dir)
    graph = _Graph.load(model_path)
    feed = _model_inputs(graph.model, inputs, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _State.open(out_dir / STATE_FILE, _identity(model_path, settings, feed), settings.force)
    values = _all_values(graph.model, feed)
    checker = _Checker(graph, values, settings, out_dir, state, say)
    full = list(range(len(graph.nodes)))
    if not checker.fails(full, [o.name for o in graph.model.graph.output]):
        raise BndeployError(f"the check never fails on the whole model ({_failure_rule(settings)} not seen), so there "
                            "is nothing to reduce: check the command on the model by hand")
    end = checker.smallest_failing_end()
    keep = checker.largest_failing_start(end)
    result = checker.write_result(keep, graph.outputs_of(end))
    result.notes += graph.notes
    return result


def _failure_rule(settings: ReduceSettings) -> str:
    return f"output matching {settings.fail_regex!r}" if settings.fail_regex else "a non-zero exit code"


# --------------------------------------------------------------------------------------------------
# The graph and its values


class _Graph:
    def __init__(self, model, notes: list[str]) -> None:
        self.model, self.notes = model, notes
        self.nodes = list(model.graph.node)
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.producer = {t: i for i, n in enumerate(self.nodes) for t in n.output if t}

    @classmethod
    def load(cls, path: Path) -> "_Graph":
        from bndeploy.extras import require

        require("compile", "bndeploy debug reduce (reading the ONNX graph)")
        import onnx

        from bndeploy.onnx_nodes import check_topological_order, graph_nodes

        if not path.is_file():
            raise BndeployError(f"{path}: ONNX file not found")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf DecodeError, missing external data
            raise BndeployError(f"{path}: not a valid ONNX model ({e})") from None
        check_topological_order(model)
        named = graph_nodes(model.graph)
        for node, name in zip(model.graph.node, named.names):
            node.name = name  # the written subgraphs carry the same names the reports use
        return cls(model, named.unnamed_note())

    def outputs_of(self, index: int) -> list[str]:
        return [t for t in self.nodes[index].output if t]

    def ancestors(self, index: int) -> list[int]:
        """``index`` and every node it depends on, in graph order."""
        seen, todo = {index}, [index]
        while todo:
            for tensor in self.nodes[todo.pop()].input:
                producer = self.producer.get(tensor)
                if producer is not None and producer not in seen:
                    seen.add(producer)
                    todo.append(producer)
        return sorted(seen)

    def subgraph(self, indices: list[int], outputs: list[str], values: dict[str, np.ndarray]):
        """The model of ``indices`` (graph order) ending at ``outputs``; tensors read from outside become inputs."""
        import onnx
        from onnx import helper

        chosen = set(indices)
        inputs, seen = [], set()
        for i in indices:
            for tensor in self.nodes[i].input:
                if tensor and tensor not in seen and tensor not in self.initializers \
                        and self.producer.get(tensor) not in chosen:
                    seen.add(tensor)
                    inputs.append(tensor)
        used = {t for i in indices for t in self.nodes[i].input}
        graph = helper.make_graph(
            [self.nodes[i] for i in indices], f"{self.model.graph.name}_reduced",
            [_value_info(t, values[t]) for t in inputs], [_value_info(t, values[t]) for t in outputs],
            [init for name, init in self.initializers.items() if name in used])
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        onnx.checker.check_model(model)
        return model, inputs


def _value_info(name: str, value: np.ndarray):
    from onnx import helper

    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))


def _model_inputs(model, inputs, seed: int | None) -> dict[str, np.ndarray]:
    from onnx import helper

    from bndeploy.runtime.inputs import generate_inputs, load_inputs_file
    from bndeploy.runtime.specs import TensorSpec

    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, shape, helper.tensor_dtype_to_np_dtype(tensor.elem_type).name))
    if inputs is not None and seed is not None:
        raise BndeployError("give --inputs or --seed, not both")
    if inputs is not None:
        return load_inputs_file(inputs, specs)
    return generate_inputs(specs, 0 if seed is None else seed)


def _all_values(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of the original model on ``feed`` (ORT, graph as written)."""
    from bndeploy.onnx_nodes import with_outputs_exposed
    from bndeploy.onnxruntime_reference import run_onnxruntime

    tensors = [t for node in model.graph.node for t in node.output if t]
    exposed, untyped = with_outputs_exposed(model, tensors)
    values = run_onnxruntime(exposed.SerializeToString(), feed)
    values.update(feed)
    missing = [t for t in untyped if t not in values]
    if missing:
        raise BndeployError(f"ONNX shape inference gives no type for {', '.join(missing[:5])}, so ONNX Runtime cannot "
                            "expose them: add value_info for them to the model")
    return values


# --------------------------------------------------------------------------------------------------
# Checks and their state


def _identity(model_path: Path, settings: ReduceSettings, feed: dict[str, np.ndarray]) -> dict:
    digest = hashlib.sha256()
    for name in sorted(feed):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return {"model_sha256": sha256_of(model_path), "check": settings.check, "fail_regex": settings.fail_regex,
            "inputs_sha256": digest.hexdigest()}


class _State:
    """Verdicts by candidate, saved after each check so a rerun resumes."""

    def __init__(self, path: Path, identity: dict, verdicts: dict[str, bool]) -> None:
        self.path, self.identity, self.verdicts = path, identity, verdicts

    @classmethod
    def open(cls, path: Path, identity: dict, force: bool) -> "_State":
        if not path.is_file() or force:
            return cls(path, identity, {})
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BndeployError(f"{path} cannot be read ({e}); pass --force to start the reduction over") from None
        if saved.get("identity") != identity:
            differs = [k for k in identity if (saved.get("identity") or {}).get(k) != identity[k]]
            raise BndeployError(f"{path} belongs to another reduction ({', '.join(differs)} differ); use another --out, "
                                "or --force to start over")
        return cls(path, identity, dict(saved.get("verdicts") or {}))

    def save(self, result: dict | None = None) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"kind": "reduce-state", "identity": self.identity, "verdicts": self.verdicts,
                                       **({"result": result} if result else {})}, indent=1) + "\n")


class _Checker:
    def __init__(self, graph: _Graph, values, settings: ReduceSettings, out_dir: Path, state: _State, say) -> None:
        self.graph, self.values, self.settings, self.out_dir, self.state, self.say = graph, values, settings, out_dir, state, say
        self.runs = self.reused = 0
        self.failure_outputs: dict[str, str] = {}  # candidate -> the end of what the check printed when it failed

    @staticmethod
    def _key(indices: list[int], outputs: list[str]) -> str:
        return hashlib.sha256(json.dumps([indices, outputs]).encode()).hexdigest()[:32]

    def fails(self, indices: list[int], outputs: list[str]) -> bool:
        key = self._key(indices, outputs)
        if key in self.state.verdicts:
            self.reused += 1
            return self.state.verdicts[key]
        model, inputs = self.graph.subgraph(indices, outputs, self.values)
        self._write(model, {t: self.values[t] for t in inputs}, self.out_dir / CANDIDATE_MODEL,
                    self.out_dir / CANDIDATE_INPUTS)
        failed, output = self._run_check()
        self.runs += 1
        if failed:
            self.failure_outputs[key] = "\n".join(output.strip().splitlines()[-OUTPUT_LINES_SHOWN:])
        self.state.verdicts[key] = failed
        self.state.save()
        self.say(f"  {len(indices)} node(s) ending at {self.graph.nodes[indices[-1]].name!r}: "
                 f"{'fails' if failed else 'passes'}")
        return failed

    def _run_check(self) -> tuple[bool, str]:
        command = self.settings.check.replace(MODEL_PLACEHOLDER, str(self.out_dir / CANDIDATE_MODEL)).replace(
            INPUTS_PLACEHOLDER, str(self.out_dir / CANDIDATE_INPUTS))
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise BndeployError(f"the check command ran past {self.settings.timeout_s} s: {command}") from None
        output = done.stdout + done.stderr
        if self.settings.fail_regex is None:
            return done.returncode != 0, output
        return re.search(self.settings.fail_regex, output) is not None, output

    def smallest_failing_end(self) -> int:
        """The earliest node k such that the graph ending at k (its ancestors) still fails."""
        ends = [self.graph.producer[o.name] for o in self.graph.model.graph.output if o.name in self.graph.producer]
        failing = [k for k in sorted(set(ends)) if self._fails_ending_at(k)]
        if not failing:
            raise BndeployError("the whole model fails the check but no single output's graph does (the check needs "
                                "several outputs together), so it cannot be reduced by bisection")
        low, high = 0, failing[0]
        while low < high:
            middle = (low + high) // 2
            if self._fails_ending_at(middle):
                high = middle
            else:
                low = middle + 1
        return high

    def _fails_ending_at(self, k: int) -> bool:
        return self.fails(self.graph.ancestors(k), self.graph.outputs_of(k))

    def largest_failing_start(self, end: int) -> list[int]:
        """The shortest tail of ``end``'s ancestors (graph order) that still fails, cut inputs fed recorded values."""
        ancestors = self.graph.ancestors(end)
        outputs = self.graph.outputs_of(end)
        low, high = 0, len(ancestors) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self.fails(ancestors[middle:], outputs):
                low = middle
            else:
                high = middle - 1
        return ancestors[low:]

    def write_result(self, indices: list[int], outputs: list[str]) -> ReduceResult:
        model, inputs = self.graph.subgraph(indices, outputs, self.values)
        model_path, inputs_path = self.out_dir / REDUCED_MODEL, self.out_dir / REDUCED_INPUTS
        self._write(model, {t: self.values[t] for t in inputs}, model_path, inputs_path)
        for leftover in (CANDIDATE_MODEL, CANDIDATE_INPUTS):
            (self.out_dir / leftover).unlink(missing_ok=True)
        nodes = [self.graph.nodes[i] for i in indices]
        result = ReduceResult([n.name for n in nodes], [n.op_type for n in nodes], inputs, outputs, model_path,
                              inputs_path, len(self.graph.nodes), self.runs, self.reused, self._final_output(indices, outputs))
        self.state.save({"nodes": result.nodes, "inputs": inputs, "outputs": outputs})
        return result

    def _final_output(self, indices: list[int], outputs: list[str]) -> str:
        """What the check printed on the reduced model (unknown when its verdict came from the state file)."""
        return self.failure_outputs.get(self._key(indices, outputs), "")

    @staticmethod
    def _write(model, arrays: dict[str, np.ndarray], model_path: Path, inputs_path: Path) -> None:
        import onnx

        with atomic_file(model_path) as tmp:
            onnx.save(model, str(tmp))
        with atomic_file(inputs_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


# --------------------------------------------------------------------------------------------------
# CLI


def register(sub: argparse._SubParsersAction) -> None:
    debug = sub.add_parser("debug", help="debugging tools for a model that fails a check")
    tools = debug.add_subparsers(dest="tool", metavar="TOOL", required=True)
    p = tools.add_parser("reduce", help="bisect an ONNX model to the smallest subgraph that still fails a check command",
                         description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="the ONNX model")
    p.add_argument("--check", required=True, help=f"shell command run on each candidate; {MODEL_PLACEHOLDER} and "
                   f"{INPUTS_PLACEHOLDER} (an .npz keyed by input name) are replaced by its files")
    p.add_argument("--fail-regex", help="a candidate fails when this regex matches the command's output "
                   "(default: when the command exits non-zero)")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {REDUCED_MODEL}, {REDUCED_INPUTS} and the "
                   f"resumable state ({STATE_FILE})")
    p.add_argument("--inputs", type=Path, help=".npz keyed by input name (default: generated from --seed)")
    p.add_argument("--seed", type=int, help="generate the model's inputs from this seed (default 0)")
    p.add_argument("--timeout", type=float, help="seconds each check may run")
    p.add_argument("--force", action="store_true", help=f"start over, discarding a {STATE_FILE} in --out")
    p.set_defaults(func=reduce_command)


def reduce_command(args) -> int:
    settings = ReduceSettings(args.check, args.fail_regex, args.timeout, args.force)
    result = reduce_model(args.model, args.out, settings, inputs=args.inputs, seed=args.seed, say=print)
    print(result.summary())
    return 0
