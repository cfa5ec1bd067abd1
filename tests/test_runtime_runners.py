"""References as runners, goldens, many samples (arrays, images, a data loader) and top-k agreement."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import (  # noqa: F401 (fixtures)
    bad_channel, inference, root, train, BAD_CHANNEL, RUNNING_VAR, SHAPE, case, edit_manifest)

import bndeploy.onnxruntime_reference as ort_reference
from bndeploy.cli import main
from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.files import sha256_of
from bndeploy.layout import GOLDEN_MANIFEST, read_golden_manifest
from bndeploy.onnxruntime_reference import run_onnxruntime
from bndeploy.runtime import check, load_artifact
from bndeploy.runtime import runners as runners_module
from bndeploy.runtime.golden import Golden
from bndeploy.runtime.images import ImagePreprocessing
from bndeploy.runtime.runners import (IntermediatesUnsupported, OnnxRuntimeRunner, RecordedTorchRunner, Runner,
                                      node_outputs)
from bndeploy.runtime.samples import DataLoader, InputsDir
from bndeploy.runtime.sources import load_export_references
from bndeploy.runtime.topk import TopKAgreement

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_SHAPE = (2, 3, 32, 32)  # conv-classes: every conv class -> BN -> ReLU, then a Linear head (10 classes)
FAULTY_CLASS = 3



@pytest.fixture(scope="module")
def classifier(exported, tmp_path_factory) -> Path:
    from bndeploy.compile import compile_model

    export_dir = exported("conv-classes")["inference"]
    (artifact,) = compile_model(export_dir / "model.onnx", ["cpu"], tmp_path_factory.mktemp("classifier") / "art")
    return artifact


@pytest.fixture(scope="module")
def faulty_classifier(exported, tmp_path_factory) -> Path:
    """conv-classes compiled with a large bias on one class, its manifest naming the true model as source."""
    import onnx
    from onnx import numpy_helper

    from bndeploy.compile import compile_model

    source = exported("conv-classes")["inference"] / "model.onnx"
    model = onnx.load(source)
    (bias,) = [init for init in model.graph.initializer if init.name == "head.2.bias"]
    values = numpy_helper.to_array(bias).copy()
    values[FAULTY_CLASS] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    folder = tmp_path_factory.mktemp("faulty")
    onnx.save(model, folder / "model.onnx")
    (artifact,) = compile_model(folder / "model.onnx", ["cpu"], folder / "art")
    edit_manifest(artifact, source={"onnx": str(source), "onnx_sha256": sha256_of(source)})
    return artifact


def classifier_samples(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"sample{i}.npz", x=rng.standard_normal(CLASSIFIER_SHAPE).astype(np.float32))
    return folder


def recorded_x(built) -> np.ndarray:
    with np.load(built.export_dir / "reference.npz") as data:
        return data["input/x"]


# --------------------------------------------------------------------------------------------------
# Runners


def test_every_source_of_outputs_is_a_runner(train):
    artifact = load_artifact(train.artifact_dir)
    export = load_export_references(artifact.manifest, artifact.directory)
    feed = export.inputs()
    torch = RecordedTorchRunner(export, artifact.outputs, artifact.running_var)
    ort = OnnxRuntimeRunner(train.export_dir / "model.onnx", artifact.running_var)
    for runner in (artifact, torch, ort):
        assert isinstance(runner, Runner)
        assert sorted(runner.run(feed)) == sorted(o.name for o in artifact.outputs), runner.name
    np.testing.assert_array_equal(ort.run(feed)["y"], run_onnxruntime(train.export_dir / "model.onnx", feed)["y"])
    # running_var: the ONNX-spec artifact is compared with spec/, the recorded torch value is torch's own.
    (var_spec,) = [o for o in artifact.outputs if o.name == RUNNING_VAR]
    assert torch.reference_key(var_spec) == f"spec/{RUNNING_VAR}"
    np.testing.assert_array_equal(torch.run(feed)[RUNNING_VAR], export.at(f"spec/{RUNNING_VAR}"))
    assert RecordedTorchRunner(export, artifact.outputs, "torch").reference_key(var_spec) == f"torch/{RUNNING_VAR}"
    assert "unbiased" in OnnxRuntimeRunner(train.export_dir / "model.onnx", "torch").skip_reason(var_spec)
    assert ort.skip_reason(var_spec) is None


def test_recorded_torch_outputs_answer_only_for_the_recorded_inputs(inference):
    artifact = load_artifact(inference.artifact_dir)
    export = load_export_references(artifact.manifest, artifact.directory)
    torch = RecordedTorchRunner(export, artifact.outputs, artifact.running_var)
    assert torch.run({"x": recorded_x(inference).copy()})["y"].shape == SHAPE
    changed = recorded_x(inference).copy()
    changed[0, 0, 0, 0] += 1e-3
    with pytest.raises(BndeployError, match=r"torch references exist only for the export's recorded inputs"):
        torch.run({"x": changed})
    # a file holding exactly the recorded inputs is answered (the check is on values, not on where they came from)
    np.save(Path(inference.artifact_dir).parent / "same.npy", recorded_x(inference))
    report = check(inference.artifact_dir, inputs=Path(inference.artifact_dir).parent / "same.npy")
    assert report.passed and [c.reference for c in report.comparisons] == ["torch", "onnxruntime"]


def test_onnxruntime_exposes_every_node_output_in_bounded_runs(classifier, exported, monkeypatch):
    import onnx

    model_path = exported("conv-classes")["inference"] / "model.onnx"
    runner = OnnxRuntimeRunner(model_path)
    feed = {"x": np.random.default_rng(3).standard_normal(CLASSIFIER_SHAPE).astype(np.float32)}
    calls = []
    original = ort_reference.run_session

    def counting_run_session(session, inputs, where, names=None):
        calls.append(len(names or []))
        return original(session, inputs, where, names)

    monkeypatch.setattr(ort_reference, "run_session", counting_run_session)
    monkeypatch.setattr(runners_module, "INTERMEDIATES_PER_RUN", 5)
    seen = list(runner.intermediates(feed))
    names = node_outputs(onnx.load(model_path))
    assert [name for name, _ in seen] == names and len(names) > 20
    assert max(calls) <= 5 and sum(calls) == len(names)
    values = dict(seen)
    relus = [n.output[0] for n in onnx.load(model_path).graph.node if n.op_type == "Relu"]
    assert relus and all(values[r].min() >= 0 for r in relus)
    np.testing.assert_array_equal(values[names[-1]], runner.run(feed)["output"])
    with pytest.raises(IntermediatesUnsupported, match="artifact cannot expose intermediate tensors"):
        next(load_artifact(classifier).intermediates(feed))


# --------------------------------------------------------------------------------------------------
# Goldens


def test_golden_records_provenance_and_checks_against_it(train, tmp_path):
    golden_dir = tmp_path / "golden"
    report = check(train.artifact_dir, save_golden=golden_dir)
    assert report.passed and f"golden written to {golden_dir}" in report.summary()
    manifest = read_golden_manifest(golden_dir)
    artifact_manifest = train.manifest()
    assert manifest["kind"] == "golden" and manifest["mode"] == "train" and manifest["running_var"] == "onnx"
    assert manifest["artifact"]["library_sha256"] == artifact_manifest["library"]["sha256"]
    assert manifest["source"]["onnx_sha256"] == sha256_of(train.export_dir / "model.onnx")
    assert [o["name"] for o in manifest["outputs"]] == [o["name"] for o in artifact_manifest["outputs"]]
    assert manifest["inputs"] == artifact_manifest["inputs"]
    assert manifest["references"]["torch"]["keys"][RUNNING_VAR] == f"spec/{RUNNING_VAR}"
    assert set(manifest["references"]) == {"torch", "onnxruntime"} and manifest["versions"]["tvm"]
    assert manifest["created"] and len(manifest["samples"]) == 1

    again = check(train.artifact_dir, against=[f"golden:{golden_dir}"])
    assert again.passed, again.summary()
    keys = {(c.output, c.reference): c.reference_key for c in again.comparisons}
    assert keys[(RUNNING_VAR, "golden/torch")] == f"golden:spec/{RUNNING_VAR}"
    assert len(keys) == 6 and again.inputs_source.startswith(f"recorded in the golden {golden_dir}")


def test_golden_catches_a_broken_artifact_of_the_same_model(inference, bad_channel, tmp_path):
    golden_dir = tmp_path / "golden"
    assert check(inference.artifact_dir, against=("onnxruntime",), save_golden=golden_dir).passed
    report = check(bad_channel.artifact_dir, against=[f"golden:{golden_dir}"])
    assert not report.passed and report.exit_code == 1
    (failure,) = report.failures
    assert failure.reference == "golden/onnxruntime" and failure.bad_channels() == [BAD_CHANNEL]


def test_golden_check_needs_neither_torch_nor_onnx(train, tmp_path):
    golden_dir = tmp_path / "golden"
    assert check(train.artifact_dir, save_golden=golden_dir).passed
    blocked = ("torch", "onnx", "onnxruntime", "onnxscript")
    script = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from bndeploy.cli import main; "
              f"sys.exit(main(['check', {str(train.artifact_dir)!r}, '--against', 'golden:{golden_dir}']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: PASS" in done.stdout
    assert re.search(rf"^{re.escape(RUNNING_VAR)}\s+golden/torch\s.*PASS$", done.stdout, re.M), done.stdout


def test_golden_from_another_model_is_refused_naming_what_differs(inference, train, classifier, tmp_path, capsys):
    golden_dir = tmp_path / "golden"
    assert check(inference.artifact_dir, save_golden=golden_dir).passed
    with pytest.raises(ArtifactError, match="is a golden of another model") as info:
        check(classifier, against=[f"golden:{golden_dir}"])
    assert "input 'x': shape [5, 3, 2, 2] in the golden, [2, 3, 32, 32] in the artifact" in str(info.value)
    assert "outputs: 1 only in the golden (y); 1 only in the artifact (output)" in str(info.value)
    with pytest.raises(ArtifactError) as info:
        check(train.artifact_dir, against=[f"golden:{golden_dir}"])
    assert "2 only in the artifact (bn.running_mean_updated, bn.running_var_updated)" in str(info.value)
    assert "mode: the golden's is inference, the artifact's train" in str(info.value)
    assert main(["check", str(classifier), "--against", f"golden:{golden_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a golden of another model" in err


def test_golden_written_only_for_a_passing_check_and_never_half(inference, bad_channel, tmp_path, capsys):
    golden_dir = tmp_path / "golden"
    assert main(["check", str(bad_channel.artifact_dir), "--save-golden", str(golden_dir)]) == 1
    assert "golden not written" in capsys.readouterr().out
    assert not golden_dir.exists() and list(tmp_path.iterdir()) == []
    assert main(["check", str(inference.artifact_dir), "--save-golden", str(golden_dir)]) == 0
    first = read_golden_manifest(golden_dir)["created"]
    assert main(["check", str(inference.artifact_dir), "--save-golden", str(golden_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["check", str(inference.artifact_dir), "--save-golden", str(golden_dir), "--force"]) == 0
    assert read_golden_manifest(golden_dir)["created"] >= first and sorted(p.name for p in tmp_path.iterdir()) == ["golden"]


def test_golden_answers_only_for_its_samples_and_refuses_tampering(inference, tmp_path):
    golden_dir = tmp_path / "golden"
    assert check(inference.artifact_dir, save_golden=golden_dir).passed
    (runner, *_) = Golden(golden_dir).runners()
    with pytest.raises(BndeployError, match="holds no outputs for these inputs"):
        runner.run({"x": recorded_x(inference) + 1})
    with pytest.raises(BndeployError, match="a golden directory brings its own inputs"):
        check(inference.artifact_dir, against=[f"golden:{golden_dir}"], seed=0)
    (sample,) = (golden_dir / "samples").iterdir()
    with np.load(sample) as data:
        arrays = dict(data)
    arrays["torch/y"] = arrays["torch/y"] + 1
    np.savez(sample, **arrays)
    with pytest.raises(ArtifactError, match=r"changed since it was saved"):
        check(inference.artifact_dir, against=[f"golden:{golden_dir}"])
    (golden_dir / GOLDEN_MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="golden.json: manifest not found"):
        check(inference.artifact_dir, against=[f"golden:{golden_dir}"])


# --------------------------------------------------------------------------------------------------
# Many samples: a directory of arrays, a data loader, images


def write_scaled_samples(folder: Path, x: np.ndarray) -> Path:
    folder.mkdir()
    for name, scale in (("a_small.npz", 0.1), ("b_large.npz", 10.0), ("c_plain.npz", 1.0)):
        np.savez(folder / name, x=(x * scale).astype(np.float32))
    return folder


def test_inputs_dir_compares_each_sample_and_names_the_worst(inference, bad_channel, tmp_path):
    samples = write_scaled_samples(tmp_path / "samples", recorded_x(inference))
    report = check(inference.artifact_dir, against=("onnxruntime",), inputs=InputsDir(samples))
    assert report.passed and report.samples == 3 and report.exit_code == 0
    report = check(bad_channel.artifact_dir, against=("onnxruntime",), inputs=InputsDir(samples))
    (result,) = report.sample_results
    # the broken scale's error grows with |x - mean|: the sample scaled by 10 is the worst
    assert (result["samples"], result["failing"], result["worst_sample"]) == (3, 3, "b_large.npz")
    (failure,) = report.failures
    assert failure.reference_key == "onnxruntime @ b_large.npz" and failure.bad_channels() == [BAD_CHANNEL]
    assert "y vs onnxruntime: 3 of 3 samples fail; worst b_large.npz" in report.summary()


def test_a_bad_file_is_named_and_nothing_else_is_lost(inference, tmp_path, capsys):
    samples = write_scaled_samples(tmp_path / "samples", recorded_x(inference))
    np.savez(samples / "d_dtype.npz", x=recorded_x(inference).astype(np.float64))
    np.save(samples / "e_shape.npy", recorded_x(inference)[:, :2])
    (samples / "f_broken.npz").write_bytes(b"not a zip")
    (samples / "README.txt").write_text("ignored")
    json_path, junit_path = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(["check", str(inference.artifact_dir), "--against", "onnxruntime", "--inputs-dir", str(samples),
                 "--json", str(json_path), "--junit", str(junit_path)])
    out = capsys.readouterr().out
    assert code == 2
    assert "ERROR sample d_dtype.npz: inputs do not match the artifact: 'x' is float64, expected float32" in out
    assert "ERROR sample e_shape.npy: inputs do not match the artifact: 'x' has shape [5, 2, 2, 2]" in out
    assert "ERROR sample f_broken.npz: cannot read inputs file" in out
    assert "ignored 1 file(s)" in out and "README.txt" in out
    assert "samples: 3 compared" in out and "y vs onnxruntime: 0 of 3 samples fail" in out
    data = json.loads(json_path.read_text())
    assert data["samples"] == 3 and len(data["sample_errors"]) == 3 and data["comparisons"][0]["passed"]
    suite = ET.parse(junit_path).getroot().find("testsuite")
    assert suite.get("errors") == "3" and suite.get("tests") == "4"
    assert [e.get("message").split(":")[0] for e in suite.iter("error")] == ["d_dtype.npz", "e_shape.npy", "f_broken.npz"]


def test_data_loader_feeds_are_streamed_and_checked(inference, tmp_path, capsys):
    x = recorded_x(inference)
    alive: list[weakref.ref] = []

    def loader():
        for i in range(4):
            gc.collect()
            # the check holds the previous sample at most, never the ones before it
            assert all(ref() is None for ref in alive[:-1]), f"sample {len(alive) - 2} still held"
            feed = {"x": (x * (i + 1)).astype(np.float32)}
            alive.append(weakref.ref(feed["x"]))
            yield feed

    report = check(inference.artifact_dir, against=("onnxruntime",), inputs=DataLoader(loader))
    assert report.passed and report.samples == 4 and report.sample_results[0]["samples"] == 4

    (tmp_path / "feeds.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        f"    x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "    yield {'x': x}\n"
        "    yield {'x': x[:, :2]}\n"
        "    yield {'x': x * 2}\n"
        "    raise RuntimeError('camera disconnected')\n")
    np.save(tmp_path / "x.npy", x)
    code = main(["check", str(inference.artifact_dir), "--against", "onnxruntime",
                 "--data-loader", f"{tmp_path / 'feeds.py'}:feeds"])
    out = capsys.readouterr().out
    assert code == 2 and "samples: 2 compared" in out
    assert "ERROR sample feeds[1]: inputs do not match the artifact: 'x' has shape [5, 2, 2, 2]" in out
    assert "raised RuntimeError: camera disconnected" in out
    assert main(["check", str(inference.artifact_dir), "--data-loader", f"{tmp_path / 'feeds.py'}:nothing"]) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(7)
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_images_are_preprocessed_as_stated_and_batched(classifier, tmp_path, capsys):
    from PIL import Image

    paths = write_images(tmp_path / "images", [(48, 40), (40, 44), (36, 36), (64, 40), (40, 40)])
    (tmp_path / "images" / "img9.png").write_bytes(b"\x89PNG broken")
    spec = "resize=36,crop=32,mean=0.5/0.4/0.3,std=0.2/0.25/0.3,layout=nchw"
    source = InputsDir(tmp_path / "images", spec).bind(load_artifact(classifier).inputs)
    samples = list(source)
    first = samples[0].feed["x"]
    # the same steps by hand: the shorter side to 36 (bilinear), the center 32x32, /255, mean/std, CHW
    image = Image.open(paths[0]).convert("RGB").resize((43, 36), Image.Resampling.BILINEAR)
    left, top = (43 - 32) // 2, (36 - 32) // 2
    pixels = np.asarray(image.crop((left, top, left + 32, top + 32)), np.float32) / 255
    by_hand = ((pixels - [0.5, 0.4, 0.3]) / np.array([0.2, 0.25, 0.3], np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(first[0], by_hand, rtol=1e-6, atol=1e-6)
    assert first.shape == CLASSIFIER_SHAPE and first.dtype == np.float32

    code = main(["check", str(classifier), "--against", "onnxruntime", "--inputs-dir", str(tmp_path / "images"),
                 "--preprocess", spec])
    out = capsys.readouterr().out
    assert code == 2  # the broken image
    assert ("6 image(s) preprocessed: RGB, resize shorter side to 36 (bilinear), center crop 32x32, /255, "
            "mean 0.5/0.4/0.3, std 0.2/0.25/0.3, NCHW") in out
    assert "samples: 2 compared" in out and "ERROR sample img9.png: not a readable image" in out
    assert "not checked: the last 1 image(s) (img4.png) do not fill a batch of 2 (the artifact's batch size)" in out
    assert "RGB, resize shorter side to 256 (bilinear), center crop 224x224" in ImagePreprocessing.parse("imagenet").describe()
    assert main(["check", str(classifier), "--inputs-dir", str(tmp_path / "images")]) == 2
    assert "say how to turn them into inputs with --preprocess" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Top-k agreement


def test_top_k_counts_rows_whose_top1_and_top5_agree():
    reference = np.tile(np.arange(10, dtype=np.float32), (4, 1))  # class 9 first, then 8, 7, 6, 5
    actual = reference.copy()
    actual[1, [9, 8]] = actual[1, [8, 9]]  # top-1 differs, top-5 set the same
    actual[2, 0] = 100  # top-1 and top-5 both differ
    actual[3, 5], actual[3, 4] = 4, 5  # 4 enters the top-5 instead of 5: only top-5 differs
    agreement = TopKAgreement("logits", "onnxruntime", threshold=0.5)
    agreement.add(actual, reference)
    assert (agreement.rows, agreement.top1, agreement.topk) == (4, 2, 2)
    assert agreement.passed
    agreement.threshold = 0.75
    assert not agreement.passed and "top-1 2/4 (50.00%), top-5 2/4 (50.00%); gate 0.75: FAIL" in agreement.line()


def test_top_k_agreement_gates_a_classifier(classifier, faulty_classifier, inference, tmp_path, capsys):
    samples = classifier_samples(tmp_path / "samples", 4)
    report = check(classifier, against=("onnxruntime",), inputs=InputsDir(samples), top_k_agreement=0.99)
    (agreement,) = report.top_k
    assert report.passed and (agreement.rows, agreement.top1, agreement.topk) == (8, 8, 8)

    junit = tmp_path / "r.xml"
    code = main(["check", str(faulty_classifier), "--against", "onnxruntime", "--inputs-dir", str(samples),
                 "--top-k-agreement", "0.99", "--atol", "1000", "--junit", str(junit)])
    out = capsys.readouterr().out
    assert code == 1  # every element within the huge atol: the top-k gate alone fails it
    assert "output  onnxruntime" in out and "PASS" in out.split("output  onnxruntime")[1].splitlines()[0]
    assert "top-k agreement output vs onnxruntime over 8 rows" in out and "gate 0.99: FAIL" in out
    assert "result: FAIL (0 of 1 comparisons, 1 of 1 top-k gates)" in out
    (case_element,) = [c for c in ET.parse(junit).getroot().iter("testcase") if c.get("name") == "top-k output"]
    assert case_element.find("failure") is not None

    with pytest.raises(BndeployError, match=r"--top-k-agreement needs a classifier output \(2-D logits"):
        check(inference.artifact_dir, top_k_agreement=0.99)
    with pytest.raises(BndeployError, match="give a fraction in"):
        check(classifier, against=("onnxruntime",), seed=0, top_k_agreement=99)


def test_conflicting_sample_options_are_refused(inference, tmp_path, capsys):
    folder = write_scaled_samples(tmp_path / "samples", recorded_x(inference))
    artifact = str(inference.artifact_dir)
    assert main(["check", artifact, "--inputs", str(folder / "a_small.npz"), "--inputs-dir", str(folder)]) == 2
    assert "give one of --inputs, --inputs-dir" in capsys.readouterr().err
    assert main(["check", artifact, "--preprocess", "imagenet"]) == 2
    assert "--preprocess describes the images of an --inputs-dir" in capsys.readouterr().err
    assert main(["check", artifact, "--inputs-dir", str(tmp_path / "missing")]) == 2
    assert main(["check", artifact, "--inputs-dir", str(folder), "--preprocess", "resize=big"]) == 2
    assert "--preprocess: bad value in 'resize=big'" in capsys.readouterr().err
    # torch answers only for the recorded inputs: many samples are checked against onnxruntime
    assert main(["check", artifact, "--inputs-dir", str(folder)]) == 2
    assert "torch references exist only for the export's recorded inputs" in capsys.readouterr().err
    with pytest.raises(BndeployError, match="one golden directory at a time"):
        check(artifact, against=["golden:a", "golden:b"])
