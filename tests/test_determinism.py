"""Determinism: the same input gives bit-identical outputs (runs and processes); the same model gives a
byte-identical export and the same compiled library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bndeploy.compile import compile_model
from bndeploy.export import ExportSettings, export, load_model
from bndeploy.files import sha256_of
from bndeploy.runtime import load_artifact

RUN_IN_CHILD = """
import sys, numpy as np
from bndeploy.runtime import load_artifact
x = np.load(sys.argv[2])
artifact = load_artifact(sys.argv[1])
outputs = artifact.run({artifact.inputs[0].name: x})
np.savez(sys.argv[3], **outputs)
"""


@pytest.fixture(scope="module")
def train_artifact(exported, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    return compile_model(exported("conv-bn")["train"] / "model.onnx", ["cpu"], root / "artifact")[0]


def _input() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32) * 3 + 1e3


def test_same_input_bit_identical_across_runs_and_processes(train_artifact, tmp_path):
    x = _input()
    artifact = load_artifact(train_artifact)
    feed = {artifact.inputs[0].name: x}
    first = artifact.run(feed)
    for _ in range(3):  # parallel reductions must not reorder between runs
        again = artifact.run(feed)
        assert all(np.array_equal(first[k], again[k]) and first[k].tobytes() == again[k].tobytes() for k in first)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", RUN_IN_CHILD, str(train_artifact), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npz")], check=True, capture_output=True)
    with np.load(tmp_path / "y.npz") as child:
        assert sorted(child.files) == sorted(first)
        for name in first:
            assert child[name].tobytes() == first[name].tobytes(), name


def test_export_is_byte_identical_in_both_modes(exported, tmp_path):
    again = export(load_model("conv-bias-bn-relu"), tmp_path / "again", ExportSettings())
    for mode, folder in exported("conv-bias-bn-relu").items():
        for name in ("model.onnx", "reference.npz"):
            assert sha256_of(folder / name) == sha256_of(again[mode] / name), f"{mode}/{name}"


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_recompile_gives_the_same_library(exported, tmp_path, mode):
    onnx_path = exported("conv-bn")[mode] / "model.onnx"
    first = compile_model(onnx_path, ["cpu"], tmp_path / "a")[0]
    second = compile_model(onnx_path, ["cpu"], tmp_path / "b")[0]
    assert (first / "model.so").read_bytes() == (second / "model.so").read_bytes()
