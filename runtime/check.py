"""check(): run an artifact on one or many samples and compare every output with each reference runner.

Written once against ``Runner`` (runtime/runners.py): the references are runners (recorded torch outputs,
ONNX Runtime, a golden directory's outputs), the artifact is one (here or over RPC), and the samples
come from a ``SampleSource`` (runtime/samples.py). Samples are streamed: per sample every reference runs,
then the artifact, and the outputs are compared and dropped; per output and reference only the worst
sample's comparison is kept, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bndeploy.compare import Comparison, Gate, compare
from bndeploy.errors import BndeployError
from bndeploy.layout import REFERENCE_FILE
from bndeploy.runtime.artifact import Artifact
from bndeploy.runtime.golden import GOLDEN_PREFIX, Golden, GoldenWriter, golden_manifest
from bndeploy.runtime.inputs import cast_floats_to, generate_inputs, load_inputs_file, validate_inputs
from bndeploy.runtime.remote import RpcEndpoint, open_artifact
from bndeploy.runtime.report import Report
from bndeploy.runtime.runners import OnnxRuntimeRunner, RecordedTorchRunner, Runner
from bndeploy.runtime.samples import OneSample, Sample, SampleSource
from bndeploy.runtime.sources import ExportReferences, load_export_references, source_onnx_path
from bndeploy.runtime.specs import TensorSpec
from bndeploy.runtime.topk import TopKAgreement, check_threshold
from bndeploy.tolerance import ToleranceSpec, Tolerances, resolve_tolerances

REFERENCES = ("torch", "onnxruntime")
RECORDED_INPUTS = f"the export's recorded inputs ({REFERENCE_FILE})"
# How many samples' non-finite values a report describes one by one.
LISTED_NONFINITE_SAMPLES = 5

InputsSpec = Mapping[str, np.ndarray] | str | Path | SampleSource | None


@dataclass(frozen=True)
class GoldenOutput:
    """``check(save_golden=...)``: where to write the golden, and whether to replace one already there."""

    directory: str | Path
    replace: bool = False


def check(
    artifact_dir: str | Path,
    against: Sequence[str] = REFERENCES,
    tolerances: ToleranceSpec = None,
    inputs: InputsSpec = None,
    seed: int | None = None,
    device: str | None = None,
    remote: RpcEndpoint | None = None,
    top_k_agreement: float | None = None,
    save_golden: GoldenOutput | str | Path | None = None,
    gate: Gate = Gate(),
) -> Report:
    """Run the artifact on the samples and compare each output with each reference in ``against``.

    References: "torch" = what PyTorch produced at export time (reference.npz; answers only for the
    export's own inputs, and needs no torch here); "onnxruntime" = the source ONNX run by ORT on the same
    inputs; "golden:DIR" = the outputs a golden directory recorded (its own inputs are the samples).
    ``inputs``: a dict of arrays, an .npz/.npy path, a SampleSource (``InputsDir``, ``DataLoader``) for many
    samples, or None for the export's recorded inputs; ``seed`` generates inputs instead.
    ``tolerances``: None (documented defaults for the artifact's dtype and mode), one Tolerance for all
    outputs, a Tolerances, or {output: Tolerance | (atol, rtol)}. ``top_k_agreement``: gate classifier
    outputs on top-1/top-5 agreement over all samples. ``save_golden``: write the inputs and reference
    outputs to a golden directory when the check passes. ``remote``: run on a device behind TVM RPC
    instead of here (references are still computed here). ``gate``: which error statistic decides
    pass/fail (bndeploy.compare.Gate; default: every element within tolerance).
    """
    choices = parse_against(against)
    golden_output = GoldenOutput(save_golden) if isinstance(save_golden, (str, Path)) else save_golden
    golden = open_golden(choices)
    if golden is not None and golden_output is not None:
        raise BndeployError("--save-golden records torch/onnxruntime outputs; a golden cannot be saved from another golden")
    artifact = open_artifact(artifact_dir, device, remote)
    samples, export = choose_samples(artifact, inputs, seed, golden)
    outputs = outputs_with_roles(artifact, export.outputs() if export else golden.outputs if golden else [])
    golden_notes = golden.refuse_if_foreign(artifact, outputs) if golden else []
    runners = reference_runners(choices, artifact, outputs, export, golden)
    tols = resolve_tolerances(tolerances, artifact.dtype, artifact.mode, [o.name for o in outputs])
    report = new_report(artifact, samples, runners, outputs, gate)
    report.notes += golden_notes
    run = CheckRun(artifact, runners, outputs, tols, samples.many, top_k_agreement, gate)
    writer = GoldenWriter(golden_output.directory, golden_output.replace) if golden_output else None
    run_samples(run, samples, writer)
    run.finish(report)
    report.notes += samples.notes()
    if writer is not None:
        finish_golden(writer, report, artifact, outputs, runners, run)
    return report


def new_report(artifact: Artifact, samples: SampleSource, runners: list[Runner], outputs: list[TensorSpec],
               gate: Gate) -> Report:
    report = Report(
        artifact=str(artifact.directory),
        device=artifact.device,
        target=artifact.target_name,
        mode=artifact.mode,
        dtype=artifact.dtype,
        inputs_source=samples.description,
        against=tuple(runner.name for runner in runners),
        outputs=outputs,
        gate=gate,
    )
    report.references = {runner.name: runner.provenance() for runner in runners}
    report.notes += train_dropout_notes(artifact)
    return report


def run_samples(run: "CheckRun", samples: SampleSource, writer: GoldenWriter | None) -> None:
    """Every sample through the check, one at a time; on any error the golden being written is removed."""
    try:
        for sample in samples:
            run.add(sample, writer)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise


class CheckRun:
    """The comparisons of one check, sample by sample: per (reference, output) the worst sample's
    comparison and counts; top-k agreement counts; the samples that could not be used."""

    def __init__(self, artifact: Artifact, runners: list[Runner], outputs: list[TensorSpec], tols: Tolerances,
                 many: bool, top_k: float | None, gate: Gate = Gate()) -> None:
        self.artifact, self.runners, self.outputs, self.tols, self.many = artifact, runners, outputs, tols, many
        self.gate = gate
        self.skip_notes = [note for r in runners if (note := r.skip_note([s for s in outputs if r.skip_reason(s)]))]
        self.pairs = [(r, spec) for r in runners for spec in outputs if r.skip_reason(spec) is None]
        self.tallies = {(r.name, spec.name): Tally() for r, spec in self.pairs}
        classifiers = check_threshold(top_k, outputs) if top_k is not None else []
        self.top_k = [TopKAgreement(spec.name, r.name, top_k) for r, spec in self.pairs if spec in classifiers]
        self.samples, self.errors, self.nonfinite, self.more_nonfinite = 0, [], [], 0
        self.keys: dict[str, dict[str, str]] = {r.name: {} for r in runners}

    def add(self, sample: Sample, writer: GoldenWriter | None = None) -> None:
        if sample.error is not None:
            self.errors.append(_named(sample.name, sample.error))
            return
        # The export's inputs are fp32; an fp16 artifact takes them rounded (the references get the originals).
        feed = cast_floats_to(sample.feed, self.artifact.inputs) if sample.cast_floats else sample.feed
        try:
            validate_inputs(feed, self.artifact.inputs)
        except BndeployError as e:
            if not self.many:
                raise
            self.errors.append(_named(sample.name, str(e)))
            return
        # References first: a reference that cannot answer for these inputs stops the check before the artifact runs.
        expected = {runner.name: runner.run(sample.feed) for runner in self.runners}
        actual = self.artifact.run(feed)
        self._compare(sample.name, actual, expected)
        self._note_nonfinite(nonfinite_notes(sample.feed, actual, sample.name if self.many else None))
        if writer is not None:
            writer.add(sample.name, sample.feed, self._compared(expected))
        self.samples += 1

    def _note_nonfinite(self, notes: list[str]) -> None:
        if len(self.nonfinite) < LISTED_NONFINITE_SAMPLES:
            self.nonfinite += notes
        else:
            self.more_nonfinite += len(notes)

    def _compare(self, sample: str, actual: dict, expected: dict) -> None:
        for runner, spec in self.pairs:
            values = expected[runner.name]
            if spec.name not in values:
                raise BndeployError(f"{runner.name} gave no output {spec.name!r} (it gave {', '.join(values)})")
            key = runner.reference_key(spec)
            self.keys[runner.name][spec.name] = key
            comparison = compare(actual[spec.name], values[spec.name], self.tols.for_output(spec.name), spec.name,
                                 runner.name, key, self.gate)
            self.tallies[(runner.name, spec.name)].add(sample, comparison)
        for agreement in self.top_k:
            agreement.add(actual[agreement.output], expected[agreement.reference][agreement.output])

    def _compared(self, expected: dict) -> dict[str, dict[str, np.ndarray]]:
        """Per reference, the expected arrays the comparisons used."""
        kept: dict[str, dict[str, np.ndarray]] = {r.name: {} for r in self.runners}
        for runner, spec in self.pairs:
            kept[runner.name][spec.name] = expected[runner.name][spec.name]
        return kept

    def finish(self, report: Report) -> None:
        for runner, spec in self.pairs:
            tally = self.tallies[(runner.name, spec.name)]
            if tally.worst is None:
                continue
            if self.samples > 1:
                tally.worst.reference_key += f" @ {tally.worst_sample}"
                report.sample_results.append(tally.to_dict(spec.name, runner.name))
            report.comparisons.append(tally.worst)
        report.samples = self.samples
        report.sample_errors += self.errors
        report.top_k += self.top_k
        report.notes += self._nonfinite_summary() + self.skip_notes
        report.notes += [note for runner in self.runners for note in runner.notes()]
        report.running_var_gaps = [gap for runner in self.runners for gap in runner.running_var_gaps()]

    def _nonfinite_summary(self) -> list[str]:
        more = [f"non-finite values in {self.more_nonfinite} more sample(s)"] if self.more_nonfinite else []
        return self.nonfinite + more


@dataclass
class Tally:
    """One output against one reference over every sample: the worst sample's comparison and counts."""

    samples: int = 0
    failing: int = 0
    worst: Comparison | None = None
    worst_sample: str = ""

    def add(self, sample: str, comparison: Comparison) -> None:
        self.samples += 1
        self.failing += not comparison.passed
        if self.worst is None or _badness(comparison) > _badness(self.worst):
            self.worst, self.worst_sample = comparison, sample

    def to_dict(self, output: str, reference: str) -> dict:
        return {"output": output, "reference": reference, "samples": self.samples, "failing": self.failing,
                "worst_sample": self.worst_sample,
                "worst_max_abs_error": self.worst.max_abs_error if self.worst is not None else None}


def _badness(c: Comparison) -> tuple:
    return (not c.passed, c.problem is not None, c.mismatches, c.max_abs_error)


def _named(sample: str, message: str) -> str:
    return message if message.startswith(f"{sample}:") else f"{sample}: {message}"


def finish_golden(writer: GoldenWriter, report: Report, artifact: Artifact, outputs: list[TensorSpec],
                  runners: list[Runner], run: CheckRun) -> None:
    """Write the golden when every sample passed; otherwise leave nothing and say why."""
    if not report.passed or run.samples == 0:
        writer.discard()
        report.notes.append(f"golden not written to {writer.directory}: only a passing check's outputs are approved")
        return
    manifest = golden_manifest(artifact, outputs, runners, run.keys, report.inputs_source)
    report.notes.append(f"golden written to {writer.commit(manifest)}: {run.samples} sample(s), "
                        f"outputs of {', '.join(r.name for r in runners)}")


def parse_against(against: Sequence[str] | str) -> tuple[str, ...]:
    """The references asked for: "torch", "onnxruntime", "golden:DIR" (at most one golden)."""
    if isinstance(against, str):
        against = [a for a in against.split(",") if a]
    unknown = [a for a in against if a not in REFERENCES and not a.startswith(GOLDEN_PREFIX)]
    if unknown or not against:
        raise BndeployError(
            f"unknown reference(s) {unknown or against!r}; choose from {', '.join(REFERENCES)}, {GOLDEN_PREFIX}DIR"
        )
    if sum(a.startswith(GOLDEN_PREFIX) for a in against) > 1:
        raise BndeployError("check against one golden directory at a time")
    return tuple(dict.fromkeys(against))


def reference_names(against: Sequence[str] | str) -> list[str]:
    """The names the references asked for will have in the report (a golden: one per reference it recorded)."""
    return [name for choice in parse_against(against)
            for name in ([r.name for r in Golden(choice[len(GOLDEN_PREFIX):]).runners()]
                         if choice.startswith(GOLDEN_PREFIX) else [choice])]


def open_golden(choices: Sequence[str]) -> Golden | None:
    for choice in choices:
        if choice.startswith(GOLDEN_PREFIX):
            return Golden(choice[len(GOLDEN_PREFIX):])
    return None


def reference_runners(choices: Sequence[str], artifact: Artifact, outputs: list[TensorSpec],
                      export: ExportReferences | None, golden: Golden | None) -> list[Runner]:
    """One runner per reference asked for, in the order asked (a golden: one per reference it recorded)."""
    runners: list[Runner] = []
    for choice in choices:
        if choice == "torch":
            export = export or load_export_references(artifact.manifest, artifact.directory)
            runners.append(RecordedTorchRunner(export, outputs, artifact.running_var))
        elif choice == "onnxruntime":
            runners.append(OnnxRuntimeRunner(source_onnx_path(artifact.manifest, artifact.directory), artifact.running_var))
        else:
            runners += golden.runners()
    return runners


def choose_samples(artifact: Artifact, inputs: InputsSpec = None, seed: int | None = None,
                   golden: Golden | None = None) -> tuple[SampleSource, ExportReferences | None]:
    """The samples to run on and the export when it was read for them."""
    if golden is not None:
        if inputs is not None or seed is not None:
            raise BndeployError("a golden directory brings its own inputs: drop --inputs/--inputs-dir/--data-loader/--seed")
        return golden.samples(), None
    if isinstance(inputs, SampleSource):
        if seed is not None:
            raise BndeployError("give inputs or a seed, not both")
        return inputs.bind(artifact.inputs), None
    feed, description, export = choose_inputs(artifact, inputs, seed)
    return OneSample(feed, description, cast_floats=description == RECORDED_INPUTS), export


def choose_inputs(
    artifact: Artifact, inputs: Mapping[str, np.ndarray] | str | Path | None = None, seed: int | None = None
) -> tuple[dict[str, np.ndarray], str, ExportReferences | None]:
    """The inputs to run with, where they came from (in words), and the export when it was read."""
    if inputs is not None and seed is not None:
        raise BndeployError("give inputs or a seed, not both")
    if isinstance(inputs, (str, Path)):
        return load_inputs_file(inputs, artifact.inputs), f"from {inputs}", None
    if inputs is not None:
        return dict(inputs), "given by the caller", None
    if seed is not None:
        return generate_inputs(artifact.inputs, seed), f"generated from seed {seed}", None
    export = load_export_references(artifact.manifest, artifact.directory)
    return export.inputs(), RECORDED_INPUTS, export


def nonfinite_notes(feed: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], sample: str | None = None) -> list[str]:
    """Say where NaN/Inf entered and came out: they propagate, and are compared position by position."""
    def counts(arrays):
        found = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                found[name] = f"{name} ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} Inf)"
        return found

    inputs, outputs = counts(feed), counts(actual)
    if not inputs and not outputs:
        return []
    where = f" in sample {sample}" if sample is not None else ""
    return [f"non-finite values{where}: inputs {', '.join(inputs.values()) or 'none'}; outputs "
            f"{', '.join(outputs.values()) or 'none'} (a NaN must meet a NaN, an Inf the same Inf, in the reference)"]


def train_dropout_notes(artifact: Artifact) -> list[str]:
    """A train-mode artifact exported with dropout as identity says so in every report."""
    recorded = artifact.manifest.get("train_dropout")
    if artifact.mode != "train" or not recorded:
        return []
    return [f"dropout: exported as {recorded.get('mode', 'identity')} in train mode (--train-dropout "
            f"{recorded.get('mode', 'identity')}) for {', '.join(recorded.get('modules', [])) or 'every dropout'}; "
            "the references were computed the same way, so this artifact never drops activations"]


def outputs_with_roles(artifact: Artifact, known: list[TensorSpec]) -> list[TensorSpec]:
    """The artifact's outputs, with role/batchnorm/batch_count filled in from ``known`` (the export's or a
    golden's outputs) where missing."""
    by_name = {o.name: o for o in known}
    merged = []
    for spec in artifact.outputs:
        source = by_name.get(spec.name)
        if source is not None:
            spec = dataclasses.replace(
                spec,
                role=spec.role or source.role,
                batchnorm=spec.batchnorm or source.batchnorm,
                batch_count=spec.batch_count or source.batch_count,
            )
        merged.append(spec)
    return merged
