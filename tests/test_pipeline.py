"""The main job end to end, and what a user's CI sees when an artifact or its source is corrupted."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bndeploy.cli import main as cli
from bndeploy.compile import CompileSettings, compile_model
from bndeploy.export.models import DEFAULT_PIPELINE_MODELS
from bndeploy.files import sha256_of, write_json
from bndeploy.pipeline import PipelineSettings, run_pipeline
from bndeploy.progress import PlainProgress
from bndeploy.runtime import load_artifact


@pytest.fixture(scope="module")
def conv_bn_artifact(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "conv-bn-inference"
    return compile_model(exported("conv-bn")["inference"] / "model.onnx", ["cpu"], out, CompileSettings())[0]


@pytest.mark.slow
def test_default_pipeline_passes(tmp_path, capsys):
    """`bndeploy pipeline` with no model: the README's first command."""
    assert cli(["pipeline", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    for name in DEFAULT_PIPELINE_MODELS:
        for mode in ("inference", "train"):
            assert any(line.split()[:4] == [name, mode, "cpu", line.split()[3]] and "pass" in line.split()
                       for line in table.splitlines()), f"{name}/{mode}/cpu not passed:\n{table}"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["exit_code"] == 0
    resnet_inference = next(r for r in summary["rows"] if r["model"] == "tiny-resnet" and r["mode"] == "inference"
                            and r["target"] == "cpu")
    assert resnet_inference["folded"] == "folded 9/9"
    resnet_train = next(r for r in summary["rows"] if r["model"] == "tiny-resnet" and r["mode"] == "train"
                        and r["target"] == "cpu")
    assert resnet_train["folded"] == "stats 9/9"  # every train-mode BN's statistics summed in its conv
    assert (tmp_path / "out" / "conv-bn" / "train" / "cpu-check.junit.xml").is_file()


def test_pipeline_rows_and_outputs(tmp_path):
    log = io.StringIO()
    result = run_pipeline(PipelineSettings(models=("seed-bn2d", "conv-bn"), targets=("cpu",), out=tmp_path / "o",
                                           timing_rounds=2), progress=PlainProgress(log))
    assert result.exit_code == 0
    lines = log.getvalue().splitlines()
    for model in ("seed-bn2d", "conv-bn"):
        assert f"{model}: export ..." in lines
        for mode in ("inference", "train"):
            for stage in ("compile for cpu", "check on cpu", "time on cpu"):
                assert f"{model}/{mode}: {stage} ..." in lines
                assert any(re.fullmatch(rf"{model}/{mode}: {stage} done in \d+\.\d s", line) for line in lines)
    assert re.fullmatch(r"pipeline: 2 model\(s\), inference/train, on cpu done in \d+\.\d s", lines[-1])
    assert [(r.model, r.mode, r.result) for r in result.rows] == [
        ("seed-bn2d", "inference", "pass"), ("seed-bn2d", "train", "pass"),
        ("conv-bn", "inference", "pass"), ("conv-bn", "train", "pass")]
    folded = {(r.model, r.mode): r.folded for r in result.rows}
    assert folded[("conv-bn", "inference")] == "folded 1/1" and folded[("conv-bn", "train")] == "stats 1/1"
    assert all(r.bndeploy_ms > 0 and r.onnxruntime_ms > 0 for r in result.rows)


def test_pipeline_refuses_foreign_output_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not the pipeline's")
    assert cli(["pipeline", "seed-bn2d", "--target", "cpu", "--out", str(tmp_path)]) == 2
    assert "was not made by bndeploy pipeline" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").exists()


def test_pipeline_reports_a_broken_model_and_goes_on(tmp_path):
    result = run_pipeline(PipelineSettings(models=("seed-bn2d",), targets=("cpu", "cuda-sm72"), out=tmp_path / "o",
                                           timing_rounds=1))
    assert result.exit_code == 2
    by_target = {(r.mode, r.target): r for r in result.rows}
    assert all(by_target[mode, "cpu"].result == "pass" for mode in ("inference", "train"))
    assert all("sm_72" in by_target[mode, "cuda-sm72"].detail for mode in ("inference", "train"))


def test_flipped_library_byte_is_refused(conv_bn_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(conv_bn_artifact, art)
    lib = art / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    assert cli(["check", str(art)]) == 2
    err = capsys.readouterr().err
    assert "model.so" in err and "sha256" in err


def test_changed_onnx_weight_before_compile_is_caught(exported, tmp_path, capsys):
    """A weight changed after export: compile refuses the mismatch with export.json; and if the manifest is
    "fixed" to match, the check against PyTorch's recorded outputs fails on the output, exit 1."""
    src = tmp_path / "export"
    shutil.copytree(exported("conv-bn")["inference"], src)
    model = onnx.load(src / "model.onnx")
    weight = next(i for i in model.graph.initializer if i.name == "conv.weight")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, src / "model.onnx")
    assert cli(["compile", str(src / "model.onnx"), "--target", "cpu", "--out", str(tmp_path / "a")]) == 2
    assert "export.json" in capsys.readouterr().err
    manifest = json.loads((src / "export.json").read_text())
    manifest["onnx"]["sha256"] = sha256_of(src / "model.onnx")
    write_json(src / "export.json", manifest)
    assert cli(["compile", str(src / "model.onnx"), "--target", "cpu", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert cli(["check", str(tmp_path / "a"), "--against", "torch"]) == 1
    assert "FAIL output vs torch" in capsys.readouterr().out


def test_cpu_outputs_are_not_overwritten_by_later_runs(conv_bn_artifact):
    """Outputs are handed over without a copy; a later run must not reuse their memory."""
    artifact = load_artifact(conv_bn_artifact)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    first = artifact.run({"x": x})["output"]
    kept = first.copy()
    for scale in (2.0, -3.0, 10.0):
        artifact.run({"x": x * scale})
    np.testing.assert_array_equal(first, kept)


def test_unaligned_and_strided_inputs(conv_bn_artifact):
    artifact = load_artifact(conv_bn_artifact)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = artifact.run({"x": x})["output"]
    raw = np.zeros(x.size + 1, np.float32)
    unaligned = raw[1:].reshape(x.shape)  # 4 bytes past an aligned start
    unaligned[...] = x
    strided = np.ascontiguousarray(np.swapaxes(x, 2, 3)).swapaxes(2, 3)  # same values, non-contiguous
    for variant in (unaligned, strided):
        np.testing.assert_array_equal(artifact.run({"x": variant})["output"], expected)
        assert np.array_equal(variant, x)  # inputs are never written


def test_pipeline_with_dropout_checks_inference_and_explains_train_mode(tmp_path):
    import torch
    from torch import nn

    from bndeploy.export import LoadedModel
    from bndeploy.export.models import seeded_normal

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.1))
    user = LoadedModel("drop", module, (seeded_normal((2, 3, 6, 6), 0),))
    result = run_pipeline(PipelineSettings(targets=("cpu",), out=tmp_path / "o", timing_rounds=1), user)
    assert result.exit_code == 2  # a requested mode was not written
    rows = {r.mode: r for r in result.rows}
    assert rows["inference"].result == "pass"
    assert rows["train"].result == "error" and "pass --train-dropout identity" in rows["train"].detail
