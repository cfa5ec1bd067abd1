"""`bndeploy check --locate`: the kernel map recorded at compile time, and the first diverging ONNX node.

Faults are injected into one compiled kernel the honest way (tests/locate_faults.py): one BatchNorm's bias
is changed in a copy of the ONNX model, that copy is compiled, and the artifact is pointed back at the
original model; every other kernel is the same, so exactly one kernel's output is wrong and --locate must
name its node.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bndeploy.cli import main
from bndeploy.errors import EXIT_ERROR, BndeployError
from bndeploy.onnx_nodes import graph_nodes
from bndeploy.runtime.locate import COMPARED, INSIDE, LocateSettings, locate
from locate_faults import BODY_BN, SHORTCUT_BN, compile_cpu, with_faulty_batchnorm


@pytest.fixture(scope="module")
def tiny(exported, tmp_path_factory):
    return exported("tiny-resnet")


@pytest.fixture(scope="module")
def clean_artifact(tiny, tmp_path_factory) -> Path:
    return compile_cpu(tiny["inference"] / "model.onnx", tmp_path_factory.mktemp("locate") / "clean")


def test_kernel_map_records_where_each_kernel_ends(clean_artifact):
    manifest = json.loads((clean_artifact / "artifact.json").read_text())
    kernel_map = manifest["kernel_map"]
    assert [e["kernel"] for e in kernel_map] == [k for k in manifest["kernels"] if k in {e["kernel"] for e in kernel_map}]
    model = onnx.load(manifest["source"]["onnx"])
    names = {n.name: n for n in model.graph.node}
    by_tensor = {o["tensor"]: (e, o) for e in kernel_map for o in e["outputs"] if o["tensor"]}
    # A folded Conv+BN with no epilogue is compared at the BatchNorm's output, in channels-last layout.
    entry, output = by_tensor[names[SHORTCUT_BN].output[0]]
    assert "conv2d" in entry["kernel"] and output["axes"] == [0, 2, 3, 1]
    # A fused Conv+BN+ReLU kernel writes the ReLU's output; the BN is inside it.
    body_bn_out = names[BODY_BN].output[0]
    fused = next(e for e in kernel_map if body_bn_out in e["inside"])
    relu = next(n for n in model.graph.node if n.op_type == "Relu" and body_bn_out in n.input)
    assert [o["tensor"] for o in fused["outputs"]] == [relu.output[0]]


def test_clean_artifact_has_no_divergence(clean_artifact):
    location = locate(clean_artifact)
    compared = [n for n in location.nodes if n.status == COMPARED]
    assert location.first_failure is None and len(compared) >= 10
    assert all(c.passed for n in compared for c in n.comparisons)
    assert "no compared node leaves tolerance" in location.summary()


def test_fault_in_one_kernel_is_located_at_its_node(tiny, tmp_path):
    artifact = with_faulty_batchnorm(tiny["inference"], SHORTCUT_BN, tmp_path)
    location = locate(artifact)
    failure = location.first_failure
    assert failure is not None and failure.name == SHORTCUT_BN and failure.status == COMPARED
    assert failure.worst().max_abs_error == pytest.approx(0.5, abs=1e-3)
    assert failure.worst().bad_channels() == [0]
    # Every compared node before it passes; its Conv (folded) is named as the only other candidate.
    assert all(not n.failed for n in location.nodes if n.index < failure.index)
    assert [n.op for n in location.inside_kernel(failure)] == ["Conv"]
    # Windows of one tensor at a time give the same answer with many ORT runs (bounded memory).
    windowed = locate(artifact, settings=LocateSettings(window_bytes=1))
    assert windowed.first_failure.name == SHORTCUT_BN and windowed.ort_runs > 5


def test_fault_inside_a_fused_kernel_is_not_guessed(tiny, tmp_path):
    artifact = with_faulty_batchnorm(tiny["inference"], BODY_BN, tmp_path)
    location = locate(artifact)
    failure = location.first_failure
    assert failure.op == "Relu"
    assert BODY_BN in [n.name for n in location.inside_kernel(failure)]
    assert next(n for n in location.nodes if n.name == BODY_BN).status == INSIDE
    assert "cannot be narrowed further" in location.summary()


def test_train_mode_locates_with_batch_statistics(tiny, tmp_path):
    location = locate(with_faulty_batchnorm(tiny["train"], SHORTCUT_BN, tmp_path))
    assert location.mode == "train"
    # Train mode keeps conv outputs as boundaries (the batch statistics read them), and they all agree with ORT's
    # train-mode graph up to the faulty BatchNorm, which is normalised by batch statistics in both.
    assert any(n.status == COMPARED and n.op == "Conv" for n in location.nodes)
    failure = location.first_failure
    assert SHORTCUT_BN in [n.name for n in location.inside_kernel(failure)] + [failure.name]
    assert all(not n.failed for n in location.nodes if n.index < failure.index)
    assert sum(not n.failed for n in location.nodes if n.status == COMPARED and n.index < failure.index) >= 5


def test_artifact_without_kernel_map_says_recompile(clean_artifact, tmp_path):
    copy = Path(shutil.copytree(clean_artifact, tmp_path / "old"))
    manifest = json.loads((copy / "artifact.json").read_text())
    del manifest["kernel_map"]
    (copy / "artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(BndeployError, match="no kernel map.*re-compile"):
        locate(copy)


def test_locate_over_rpc_says_why_not(clean_artifact, capsys):
    assert main(["check", str(clean_artifact), "--locate", "--rpc-server", "127.0.0.1:9"]) == EXIT_ERROR
    assert "cannot run over RPC" in capsys.readouterr().err


def test_cli_prints_the_location(clean_artifact, capsys):
    assert main(["check", str(clean_artifact), "--locate", "--against", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "locate:" in out and "no compared node leaves tolerance" in out


def test_unnamed_nodes_are_named_deterministically(exported, tmp_path):
    model = onnx.load(exported("conv-bias-bn-relu")["inference"] / "model.onnx")
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, tmp_path / "model.onnx")
    names = graph_nodes(model.graph).names
    assert names == [f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
    location = locate(compile_cpu(tmp_path / "model.onnx", tmp_path / "artifact"), seed=0)
    assert [n.name for n in location.nodes] == names
    assert any("have no name" in note for note in location.notes)
    assert np.isfinite([c.max_abs_error for n in location.nodes for c in n.comparisons]).all()


class _PointwiseThenGrouped(torch.nn.Module):
    """1x1 conv + BN + ReLU feeding a grouped 3x3 + BN + ReLU, 13 groups of 4 channels: the 1x1 stores its output
    with its channels permuted for the grouped conv (on AVX2 and AVX-512 hosts alike), padded to whole vectors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pointwise = torch.nn.Sequential(torch.nn.Conv2d(52, 52, 1, bias=False), torch.nn.BatchNorm2d(52), torch.nn.ReLU())
        self.grouped = torch.nn.Sequential(torch.nn.Conv2d(52, 52, 3, padding=1, groups=13, bias=False),
                                           torch.nn.BatchNorm2d(52), torch.nn.ReLU())
        for bn in (self.pointwise[1], self.grouped[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        return self.grouped(self.pointwise(x))


@pytest.fixture(scope="module")
def permuting(tmp_path_factory):
    from bndeploy.export import ExportSettings, export
    from bndeploy.export.loader import LoadedModel

    model = LoadedModel("pointwise-grouped", _PointwiseThenGrouped(), (torch.randn(1, 52, 20, 20),))
    return export(model, tmp_path_factory.mktemp("permuted") / "export", ExportSettings(modes=("inference",)))["inference"]


def test_a_tensor_stored_permuted_is_compared_in_onnx_order(permuting, tmp_path):
    """The 1x1 conv's output is stored with its channels permuted (compile/schedules/interleave_inputs.py): the
    kernel map records each channel's position, locate compares it in ONNX's order, and a fault in its channel 0
    is found in channel 0."""
    clean = compile_cpu(permuting / "model.onnx", tmp_path / "clean")
    kernel_map = json.loads((clean / "artifact.json").read_text())["kernel_map"]
    permuted = [o for e in kernel_map for o in e["outputs"] if "channel_positions" in o]
    assert len(permuted) == 1 and sorted(permuted[0]["channel_positions"]) != list(range(52))
    location = locate(clean)
    node = next(n for n in location.nodes if any(c.output == permuted[0]["tensor"] for c in n.comparisons))
    assert node.status == COMPARED and location.first_failure is None
    pointwise_bn = next(n.name for n in onnx.load(permuting / "model.onnx").graph.node if n.op_type == "BatchNormalization")
    failure = locate(with_faulty_batchnorm(permuting, pointwise_bn, tmp_path / "faulty")).first_failure
    assert failure is not None and failure.index == node.index and failure.worst().bad_channels() == [0]
