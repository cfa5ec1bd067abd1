"""Interrupted and racing compiles: an artifact directory is complete or absent, never half-written.

`bndeploy compile` runs as a real subprocess (python -m bndeploy.cli) and gets SIGINT or SIGTERM
while it builds; two compiles race for the same output directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bndeploy.files import sha256_of

# Three targets: the compile spends a few seconds in the build loop after the first progress line.
TARGETS = ["cpu", "x86-64-avx2", "x86-64-avx512"]


def compile_command(onnx_path: Path, out: Path, targets=TARGETS) -> list[str]:
    command = [sys.executable, "-m", "bndeploy.cli", "compile", str(onnx_path), "--out", str(out)]
    for target in targets:
        command += ["--target", target]
    return command


def assert_complete(artifact_dir: Path) -> None:
    """An artifact directory that exists is whole: manifest readable, library hash as recorded."""
    manifest = json.loads((artifact_dir / "artifact.json").read_text())
    assert manifest["kind"] == "artifact"
    assert sha256_of(artifact_dir / manifest["library"]["file"]) == manifest["library"]["sha256"]
    assert sorted(p.name for p in artifact_dir.iterdir()) == ["artifact.json", "model.so"]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def conv_bn_train(exported) -> Path:
    return exported("conv-bn")["train"] / "model.onnx"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_build_leaves_no_partial_directory(conv_bn_train, tmp_path, sig):
    out = tmp_path / "artifacts"
    proc = subprocess.Popen(compile_command(conv_bn_train, out), stderr=subprocess.PIPE, text=True)
    # Wait for the first "building" progress line: the build (and its temporary directory) has begun.
    for line in proc.stderr:
        if "building for target" in line:
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert proc.returncode == 128 + sig, err  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    assert "bndeploy compile: interrupted; nothing was left half-written" in err
    assert leftovers(tmp_path) == []
    finished = [out / t for t in TARGETS if (out / t).exists()] if out.exists() else []
    assert len(finished) < len(TARGETS)
    for artifact_dir in finished:
        assert_complete(artifact_dir)
    expected = {p.name for p in finished}
    assert {p.name for p in out.iterdir()} == expected if out.exists() else True


def test_parallel_compiles_to_the_same_directory_one_wins_whole(conv_bn_train, tmp_path):
    out = tmp_path / "artifact"
    procs = [subprocess.Popen(compile_command(conv_bn_train, out, ["cpu"]), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert (f"bndeploy compile: error: {out} was created by another process while this one worked; nothing written"
            in loser or f"bndeploy compile: error: {out} already exists; pass --force to replace it" in loser), loser
    assert_complete(out)
    assert leftovers(tmp_path) == []
