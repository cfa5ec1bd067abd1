"""`bndeploy debug reduce`: bisect a failing model down to the node that fails, resumably.

The check command is a small "runtime under test" (tests' CHECK_SCRIPT): it evaluates the candidate model
with numpy, with one op implemented wrongly (Add computes a - b), and compares with a correct evaluation.
Only a candidate containing the Add node can fail, whatever else it contains.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bndeploy.cli import main
from bndeploy.errors import EXIT_ERROR, BndeployError
from bndeploy.onnxruntime_reference import run_onnxruntime
from bndeploy.reduce import STATE_FILE, ReduceSettings, reduce_model

CHECK_SCRIPT = r'''
import sys
import numpy as np, onnx
from onnx import numpy_helper
model = onnx.load(sys.argv[1])
feed = dict(np.load(sys.argv[2]))
for arg in sys.argv[3:]:
    if arg.startswith("--count="):
        open(arg[len("--count="):], "a").write("run\n")
consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
OPS = {"Relu": lambda a: np.maximum(a, 0), "Neg": lambda a: -a, "Sigmoid": lambda a: 1 / (1 + np.exp(-a)),
       "Mul": lambda a, b: a * b, "Add": lambda a, b: a + b, "Tanh": np.tanh}
def run(buggy):
    values = {**consts, **feed}
    for node in model.graph.node:
        op = OPS[node.op_type]
        if buggy and node.op_type == "Add":
            op = lambda a, b: a - b
        values[node.output[0]] = op(*[values[t] for t in node.input])
    return [values[o.name] for o in model.graph.output]
bad = any(not np.allclose(a, b, atol=1e-6) for a, b in zip(run(True), run(False)))
print("MISMATCH" if bad else "match")
sys.exit(1 if bad and "--exit" in sys.argv else 0)
'''


def _chain_model(add_name: str | None = "the_add") -> onnx.ModelProto:
    """x -> Relu -> Mul(w) -> Tanh -> [Add(b)] -> Sigmoid -> Neg -> y, and a side branch x -> Neg -> Relu -> z."""
    w = numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "w")
    b = numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "b")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Neg", ["x"], ["side"], name="side_neg"),
        helper.make_node("Mul", ["r", "w"], ["m"], name="mul"),
        helper.make_node("Relu", ["side"], ["z"], name="side_relu"),
        helper.make_node("Tanh", ["m"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "b"], ["a"], name=add_name or ""),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
        helper.make_node("Neg", ["s"], ["y"], name="neg"),
    ]
    info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "chain", [info("x")], [info("y"), info("z")], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def chain(tmp_path) -> Path:
    onnx.save(_chain_model(), tmp_path / "model.onnx")
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    return tmp_path


def _check(folder: Path, *extra: str) -> str:
    return f"{sys.executable} {folder / 'check.py'} {{model}} {{inputs}} " + " ".join(extra)


def test_reduces_to_the_failing_node_with_the_data_it_saw(chain):
    result = reduce_model(chain / "model.onnx", chain / "out", ReduceSettings(_check(chain, "--exit")), seed=3)
    assert result.nodes == ["the_add"] and result.ops == ["Add"]
    assert result.inputs == ["t"] and result.outputs == ["a"]
    # The reduced model is fed the value its input had in the original model, and runs as written.
    reduced_inputs = dict(np.load(result.inputs_file))
    original = _values_of(chain / "model.onnx", result.inputs_file.parent, ["t", "a"], seed=3)
    np.testing.assert_array_equal(reduced_inputs["t"], original["t"])
    np.testing.assert_allclose(run_onnxruntime(result.model, reduced_inputs)["a"], original["a"], rtol=1e-6)
    assert not (chain / "out" / "candidate.onnx").exists()


def _values_of(model_path: Path, out: Path, tensors: list[str], seed: int) -> dict:
    from bndeploy.onnx_nodes import with_outputs_exposed
    from bndeploy.runtime.inputs import generate_inputs
    from bndeploy.runtime.specs import TensorSpec

    exposed, _ = with_outputs_exposed(onnx.load(model_path), tensors)
    feed = generate_inputs([TensorSpec("x", (2, 3), "float32")], seed)
    return run_onnxruntime(exposed.SerializeToString(), feed)


def test_regex_mode_and_cli(chain, capsys):
    code = main(["debug", "reduce", str(chain / "model.onnx"), "--check", _check(chain), "--fail-regex", "MISMATCH",
                 "--out", str(chain / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "reduced 8 nodes to 1: 'the_add' (Add)" in out
    assert onnx.load(chain / "out" / "reduced.onnx").graph.node[0].op_type == "Add"


def test_a_check_that_never_fails_is_reported_not_reduced(chain):
    with pytest.raises(BndeployError, match="never fails on the whole model"):
        reduce_model(chain / "model.onnx", chain / "out", ReduceSettings(_check(chain)))  # no --exit: always 0
    assert not (chain / "out" / "reduced.onnx").exists()


def test_interrupted_reduction_resumes(chain):
    counter = chain / "runs.txt"
    settings = ReduceSettings(_check(chain, "--exit", f"--count={counter}"))
    first = reduce_model(chain / "model.onnx", chain / "out", settings)
    runs = len(counter.read_text().splitlines())
    assert first.checks_run == runs >= 4
    # Interrupted after two checks: the state file then holds two verdicts; the rerun makes only the rest.
    state = json.loads((chain / "out" / STATE_FILE).read_text())
    state["verdicts"] = dict(list(state["verdicts"].items())[:2])
    del state["result"]
    (chain / "out" / STATE_FILE).write_text(json.dumps(state))
    counter.unlink()
    resumed = reduce_model(chain / "model.onnx", chain / "out", settings)
    assert resumed.nodes == first.nodes and resumed.checks_reused >= 2
    assert len(counter.read_text().splitlines()) == resumed.checks_run == runs - 2
    # Another command in the same folder is refused rather than mixed in.
    with pytest.raises(BndeployError, match="another reduction"):
        reduce_model(chain / "model.onnx", chain / "out", ReduceSettings(_check(chain, "--exit")))


def test_unnamed_nodes_get_deterministic_names(tmp_path, capsys):
    onnx.save(_chain_model(add_name=None), tmp_path / "model.onnx")
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    code = main(["debug", "reduce", str(tmp_path / "model.onnx"), "--check", _check(tmp_path, "--exit"),
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "'Add_5' (Add)" in out and "have no name" in out


def test_check_command_without_model_placeholder_is_refused(chain, capsys):
    assert main(["debug", "reduce", str(chain / "model.onnx"), "--check", "true", "--out", str(chain / "o")]) == EXIT_ERROR
    assert "{model}" in capsys.readouterr().err
