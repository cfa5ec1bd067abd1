"""`bndeploy profile` and `bndeploy bench`: what they report is what the artifact does.

No test asserts an absolute time: the tests check that every kernel is accounted for, that the work
attributed to a kernel is the work of its operator, that the machine's bounds were measured, and that
the bench times the product's own path (the export and compile_model's artifact).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bndeploy.compile import CompileSettings, compile_model
from bndeploy.layout import ARTIFACT_MANIFEST, ONNX_FILE
from bndeploy.runtime.artifact import load_artifact
from bndeploy.runtime.check import choose_inputs
from bndeploy.runtime.profile import VM_BUILTIN_PREFIX, profile, spaced_rates


@pytest.fixture(scope="module")
def tiny_resnet_artifact(exported, tmp_path_factory):
    onnx_path = exported("tiny-resnet")["inference"] / ONNX_FILE
    (artifact,) = compile_model(onnx_path, ["cpu"], tmp_path_factory.mktemp("profile") / "a", CompileSettings())
    return artifact


def test_profile_accounts_for_every_kernel_with_its_work(tiny_resnet_artifact):
    result = profile(tiny_resnet_artifact, rounds=3)
    manifest = json.loads((tiny_resnet_artifact / ARTIFACT_MANIFEST).read_text())
    assert {k.name for k in result.kernels} == set(manifest["kernels"])
    assert all(k.calls >= 1 and 0 < k.best_ms <= k.ms for k in result.kernels)
    assert abs(sum(result.share(k) for k in result.kernels) - 1.0) < 1e-9
    assert abs(sum(result.class_shares().values()) - 1.0) < 1e-9
    convs = [k for k in result.kernels if k.kind == "conv"]
    assert convs and all(k.flops > 0 for k in convs)
    assert result.runs_per_round > 1, "a tiny artifact's round should average several runs"
    calls_in_one_run = _calls_in_one_run(tiny_resnet_artifact)
    for kernel in result.kernels:  # per run: the recorded per-call work times the calls
        assert kernel.calls == calls_in_one_run[kernel.name]
        cost = manifest["kernel_costs"][kernel.name]
        assert kernel.flops == cost["flops"] * kernel.calls and kernel.nbytes == cost["bytes"] * kernel.calls
    assert result.bounds.peak_gflops and result.bounds.peak_gflops > 0, "the artifact's FMA-peak kernel did not run"
    assert result.bounds.bandwidth_gbs > 0
    table = result.table()
    assert result.cpu in table and all(k.name in table for k in result.kernels[:15])



def test_the_fma_peak_is_not_timed_on_a_waking_thread_pool():
    """The first run of a kernel after a pause can wait for the thread pool's sleeping workers; timed, it
    put the FMA peak at half its rate and kernels at up to 180% of their bound. Here a run that waits
    50 ms when called after a pause stands for such a pool: the spaced samples must not see the wait (a
    timed run takes 2 ms; the bound leaves 23 ms for a loaded machine's scheduling delays)."""
    import time

    last_call = [0.0]

    def run():
        if time.perf_counter() - last_call[0] > 0.03:
            time.sleep(0.05)  # the workers wake
        time.sleep(0.002)  # the work
        last_call[0] = time.perf_counter()

    rates = spaced_rates(run, flops=1.0, samples=3, spacing_s=0.1)
    assert min(rates) > 1 / 0.025, "a timed run waited for the pool to wake"


def _calls_in_one_run(artifact_dir) -> dict[str, int]:
    artifact = load_artifact(artifact_dir)
    feeds, _, _ = choose_inputs(artifact, None, None)
    calls: dict[str, int] = {}

    def count(func, name, before_run, result, *args):
        if before_run and not name.startswith(VM_BUILTIN_PREFIX):
            calls[name] = calls.get(name, 0) + 1
        return 0

    with artifact.instrumented(count):
        artifact.run(feeds)
    return calls


def test_conv_kernel_work_is_the_convolutions_useful_flops(tmp_path):
    """One 3x3 conv 16->32 on 2x16x12x12: 2 * N * C_out * H_out * W_out * C_in * 9 FLOPs, not the FLOPs
    of the padded register tiles the kernel actually computes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((32, 16, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32, 12, 12])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    (artifact,) = compile_model(tmp_path / "m.onnx", ["cpu"], tmp_path / "a", CompileSettings())
    costs = json.loads((artifact / ARTIFACT_MANIFEST).read_text())["kernel_costs"]
    conv = [cost for name, cost in costs.items() if "conv2d" in name]
    assert [c["flops"] for c in conv] == [2 * 2 * 32 * 12 * 12 * 16 * 9]


def test_profile_command_prints_the_table_and_writes_json(tiny_resnet_artifact, tmp_path):
    result = subprocess.run([sys.executable, "-m", "bndeploy.cli", "profile", str(tiny_resnet_artifact), "--rounds", "2",
                             "--json", str(tmp_path / "p.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "% of bound" in result.stdout and "FMA peak" in result.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["kernels"] and set(data["class_shares"]) >= {"conv"}
    assert all("percent_of_bound" in k for k in data["kernels"])


@pytest.mark.slow
def test_bench_zoo_smoke_times_the_products_own_artifact(tmp_path):
    """ResNet-18 from torchvision's definition (64x64): exported, compiled by compile_model, timed beside
    ONNX Runtime and torch; the row has every peer and a ratio, and the artifact is compile_model's."""
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "bndeploy.cli", "bench", "--suite", "zoo-smoke", "--rounds", "1",
                             "--work", str(work), "--json", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "bndeploy/ORT" in result.stdout and "geomean" in result.stdout and "CPU:" in result.stdout
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["case"] == "resnet18" and set(row["ms"]) == {"bndeploy", "onnxruntime", "torch"}
    assert row["ratio"] == pytest.approx(row["ms"]["bndeploy"] / row["ms"]["onnxruntime"])
    manifests = list(work.glob(f"*/artifact/{ARTIFACT_MANIFEST}"))
    assert len(manifests) == 1 and (manifests[0].parent.parent / "export" / "inference" / ONNX_FILE).is_file()
    kernels = json.loads(manifests[0].read_text())["kernels"]
    assert any(k.startswith("fused_bndeploy_conv2d") for k in kernels)
    assert not any("conv2d" in k and "bndeploy" not in k for k in kernels), "a conv fell to TVM's generic path"


@pytest.mark.slow
def test_bench_predict_gives_llvm_mcas_figures_for_an_edge_cpu(tmp_path):
    """`bndeploy bench --predict` for a CPU no board here can time: compile_model's library (its assembly
    dumped by `--dump`) analysed by llvm-mca, labelled as a prediction; timing that target is refused."""
    import shutil

    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed (.ci/install-edge installs it)")
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "bndeploy.cli", "bench", "--suite", "quick", "--target", "cortex-a76",
                             "--predict", "--work", str(work), "--json", str(tmp_path / "p.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "PREDICTED by llvm-mca" in result.stdout
    assert list(work.glob("*/artifact/dump/library.s")), "the prediction did not read compile_model's assembly"
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    conv = [row for row in rows if "bndeploy_conv2d" in row["kernel"]]
    assert conv and all(row["model_cpu"] == "cortex-a76" for row in conv)
    assert conv[0]["fmas"] >= 4 and 0 < conv[0]["percent_of_peak"] <= 100

    refused = subprocess.run([sys.executable, "-m", "bndeploy.cli", "bench", "--suite", "quick", "--target", "cortex-a76"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--predict" in refused.stderr
