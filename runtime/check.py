"""check(): run an artifact and compare every output with the torch and/or onnxruntime references."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bndeploy.compare import Comparison, Gate, compare
from bndeploy.errors import BndeployError
from bndeploy.layout import REFERENCE_FILE, SPEC, TORCH, reference_key
from bndeploy.runtime.artifact import Artifact
from bndeploy.runtime.inputs import cast_floats_to, generate_inputs, load_inputs_file
from bndeploy.runtime.remote import RpcEndpoint, open_artifact
from bndeploy.runtime.report import Report
from bndeploy.runtime.sources import ExportReferences, load_export_references, source_onnx_path
from bndeploy.runtime.specs import TensorSpec
from bndeploy.tolerance import ToleranceSpec, Tolerances, resolve_tolerances

REFERENCES = ("torch", "onnxruntime")
RECORDED_INPUTS = f"the export's recorded inputs ({REFERENCE_FILE})"

InputsSpec = Mapping[str, np.ndarray] | str | Path | None


def check(
    artifact_dir: str | Path,
    against: Sequence[str] = REFERENCES,
    tolerances: ToleranceSpec = None,
    inputs: InputsSpec = None,
    seed: int | None = None,
    device: str | None = None,
    remote: RpcEndpoint | None = None,
    gate: Gate = Gate(),
) -> Report:
    """Run the artifact once and compare each output with each reference in ``against``.

    References: "torch" = what PyTorch produced at export time (reference.npz; needs the export's own
    inputs, and no torch here); "onnxruntime" = the source ONNX run by ORT on the same inputs.
    ``inputs``: a dict of arrays, an .npz/.npy path, or None for the export's recorded inputs;
    ``seed`` generates inputs instead. ``tolerances``: None (documented defaults for the artifact's
    dtype and mode), one Tolerance for all outputs, a Tolerances, or {output: Tolerance | (atol, rtol)}.
    ``remote``: run on a device behind TVM RPC instead of here (references are still computed here).
    ``gate``: which error statistic decides pass/fail (bndeploy.compare.Gate; default: every element).
    """
    against = validate_against(against)
    artifact = open_artifact(artifact_dir, device, remote)
    feed, inputs_source, export = choose_inputs(artifact, inputs, seed)
    if "torch" in against and inputs_source != RECORDED_INPUTS:
        raise BndeployError(
            f"torch references exist only for the export's recorded inputs, not for inputs {inputs_source}; "
            "check those against onnxruntime only"
        )
    # The export's inputs are fp32; an fp16 artifact takes them rounded (ORT still gets the originals).
    actual = artifact.run(cast_floats_to(feed, artifact.inputs) if inputs_source == RECORDED_INPUTS else feed)
    outputs = outputs_with_roles(artifact, export)
    tols = resolve_tolerances(tolerances, artifact.dtype, artifact.mode, [o.name for o in outputs])
    report = Report(
        artifact=str(artifact.directory),
        device=artifact.device,
        target=artifact.target_name,
        mode=artifact.mode,
        dtype=artifact.dtype,
        inputs_source=inputs_source,
        against=against,
        outputs=outputs,
        gate=gate,
    )
    report.references = reference_versions(against, export)
    report.notes += nonfinite_notes(feed, actual) + train_dropout_notes(artifact)
    if "torch" in against:
        report.comparisons += compare_with_torch(artifact, outputs, actual, export, tols, gate)
        report.running_var_gaps = running_var_gaps(outputs, export)
        report.notes += running_var_note(artifact, report.running_var_gaps)
    if "onnxruntime" in against:
        comparisons, notes = compare_with_onnxruntime(artifact, outputs, actual, feed, tols, gate)
        report.comparisons += comparisons
        report.notes += notes
    return report


def nonfinite_notes(feed: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> list[str]:
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
    return [f"non-finite values: inputs {', '.join(inputs.values()) or 'none'}; outputs "
            f"{', '.join(outputs.values()) or 'none'} (a NaN must meet a NaN, an Inf the same Inf, in the reference)"]


def reference_versions(against: Sequence[str], export: ExportReferences | None) -> dict[str, dict]:
    """Which torch and onnxruntime the references come from, and how they were computed."""
    from bndeploy.onnxruntime_reference import HOW, onnxruntime_version

    versions = {}
    if "torch" in against and export is not None:
        recorded = (export.manifest.get("versions") or {}).get("torch") or "unknown"
        versions["torch"] = {"version": recorded, "how": f"outputs recorded at export time ({export.reference_path.name})"}
    if "onnxruntime" in against:
        versions["onnxruntime"] = {"version": onnxruntime_version() or "not installed", "how": HOW}
    return versions


def train_dropout_notes(artifact: Artifact) -> list[str]:
    """A train-mode artifact exported with dropout as identity says so in every report."""
    recorded = artifact.manifest.get("train_dropout")
    if artifact.mode != "train" or not recorded:
        return []
    return [f"dropout: exported as {recorded.get('mode', 'identity')} in train mode (--train-dropout "
            f"{recorded.get('mode', 'identity')}) for {', '.join(recorded.get('modules', [])) or 'every dropout'}; "
            "the references were computed the same way, so this artifact never drops activations"]


def validate_against(against: Sequence[str]) -> tuple[str, ...]:
    if isinstance(against, str):
        against = [a for a in against.split(",") if a]
    unknown = [a for a in against if a not in REFERENCES]
    if unknown or not against:
        raise BndeployError(f"unknown reference(s) {unknown or against!r}; choose from {', '.join(REFERENCES)}")
    return tuple(dict.fromkeys(against))


def choose_inputs(
    artifact: Artifact, inputs: InputsSpec = None, seed: int | None = None
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


def outputs_with_roles(artifact: Artifact, export: ExportReferences | None) -> list[TensorSpec]:
    """The artifact's outputs, with role/batchnorm/batch_count filled in from the export where missing."""
    known = {o.name: o for o in export.outputs()} if export is not None else {}
    merged = []
    for spec in artifact.outputs:
        source = known.get(spec.name)
        if source is not None:
            spec = dataclasses.replace(
                spec,
                role=spec.role or source.role,
                batchnorm=spec.batchnorm or source.batchnorm,
                batch_count=spec.batch_count or source.batch_count,
            )
        merged.append(spec)
    return merged


def torch_reference_key(artifact: Artifact, spec: TensorSpec) -> str:
    """running_var follows the ONNX spec (spec/) unless the artifact implements torch's update."""
    prefix = SPEC if spec.role == "running_var" and artifact.running_var == "onnx" else TORCH
    return reference_key(prefix, spec.name)


def compare_with_torch(artifact, outputs, actual, export: ExportReferences, tols: Tolerances,
                       gate: Gate = Gate()) -> list[Comparison]:
    comparisons = []
    for spec in outputs:
        key = torch_reference_key(artifact, spec)
        expected = export.at(key)
        comparisons.append(compare(actual[spec.name], expected, tols.for_output(spec.name), spec.name, "torch", key, gate))
    return comparisons


def running_var_gaps(outputs, export: ExportReferences) -> list[dict]:
    """Per BatchNorm, how far torch's unbiased running_var is from the ONNX spec's population one."""
    gaps = []
    for spec in outputs:
        if spec.role != "running_var" or not (export.has(TORCH, spec.name) and export.has(SPEC, spec.name)):
            continue
        gap = np.max(np.abs(export.get(TORCH, spec.name).astype(np.float64) - export.get(SPEC, spec.name)))
        gaps.append({"output": spec.name, "batch_count": spec.batch_count, "max_gap": float(gap)})
    return gaps


def running_var_note(artifact, gaps: list[dict]) -> list[str]:
    """The population-vs-unbiased difference, stated with its size (a range over BatchNorms): expected, not a failure."""
    if not gaps:
        return []
    counts = sorted({g["batch_count"] for g in gaps if g["batch_count"] is not None})
    n = "unknown" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    low, high = min(g["max_gap"] for g in gaps), max(g["max_gap"] for g in gaps)
    size = f"max {high:.3g}" if len(gaps) == 1 else f"max {low:.3g} to {high:.3g} over {len(gaps)} BatchNorms"
    follows = "the ONNX spec" if artifact.running_var == "onnx" else "PyTorch"
    prefix = SPEC if artifact.running_var == "onnx" else TORCH
    compared = gaps[0]["output"] if len(gaps) == 1 else "<name>"
    return [
        f"running_var: ONNX uses the population variance, PyTorch the unbiased one (n/(n-1), n={n}): "
        f"torch's own value differs from the ONNX spec by {size} "
        f"[the artifact follows {follows}, so it is compared against {reference_key(prefix, compared)}]"
    ]


def compare_with_onnxruntime(artifact, outputs, actual, feed, tols: Tolerances,
                             gate: Gate = Gate()) -> tuple[list[Comparison], list[str]]:
    from bndeploy.onnxruntime_reference import run_onnxruntime

    expected = run_onnxruntime(source_onnx_path(artifact.manifest, artifact.directory), feed)
    comparisons, skipped = [], []
    for spec in outputs:
        if spec.role == "running_var" and artifact.running_var == "torch":
            skipped.append(spec.name)
            continue
        if spec.name not in expected:
            raise BndeployError(f"the source ONNX model has no output {spec.name!r} (it has {', '.join(expected)})")
        comparisons.append(
            compare(actual[spec.name], expected[spec.name], tols.for_output(spec.name), spec.name, "onnxruntime",
                    "onnxruntime", gate)
        )
    return comparisons, skipped_running_var_note(skipped)


def skipped_running_var_note(skipped: list[str]) -> list[str]:
    if not skipped:
        return []
    names = skipped[0] if len(skipped) == 1 else f"{skipped[0]} and {len(skipped) - 1} more running_var outputs"
    return [f"{names} vs onnxruntime: skipped; onnxruntime follows the ONNX spec (population variance) "
            "while this artifact implements PyTorch's unbiased update, so it is compared against torch only"]
