"""Runners: every source of outputs behind one small interface (Polygraphy's shape).

A ``Runner`` takes a feed (input name -> array) and returns its outputs by name. The compiled artifact
(``Artifact``, here or over RPC as ``RemoteArtifact``), ONNX Runtime on the source ONNX, the torch outputs
recorded at export time and a golden directory (``bndeploy.runtime.golden``) are all runners, so
``check`` (and --locate, timing, goldens) are written once against this interface.

Beside ``run``, a runner says how it serves as a check's reference: the key a comparison names
(``reference_key``), an output it does not answer for and why (``skip_reason``), notes a report must
carry (``notes``), and what it was computed with (``provenance``). ``intermediates`` is optional
(``supports_intermediates``): ONNX Runtime exposes every node output; the others say they cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.extras import MissingDependencyError, missing_message
from bndeploy.layout import REFERENCE_FILE, SPEC, TORCH, reference_key
from bndeploy.runtime.sources import ExportReferences
from bndeploy.runtime.specs import TensorSpec

Feed = Mapping[str, np.ndarray]

TORCH_ONLY_RECORDED = (
    f"torch references exist only for the export's recorded inputs ({REFERENCE_FILE}), not for other inputs; "
    "check those against onnxruntime only (--against onnxruntime)"
)

# How many intermediate tensors ONNX Runtime hands back per run: bounds the memory of ``intermediates``.
INTERMEDIATES_PER_RUN = 64


class IntermediatesUnsupported(BndeployError):
    """A runner cannot expose the tensors between its inputs and outputs."""


class Runner:
    """A source of outputs. Subclasses set ``name`` and implement ``run``; the rest has defaults."""

    name: str = "runner"
    supports_intermediates: bool = False

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """The outputs for ``feed``, by output name."""
        raise NotImplementedError

    def intermediates(self, feed: Feed, names: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(tensor name, value) for every intermediate tensor (or ``names``), in topological order,
        a bounded number held at once."""
        raise IntermediatesUnsupported(f"{self.name} cannot expose intermediate tensors")

    def provenance(self) -> dict[str, str]:
        """{"version": ..., "how": ...}: what the outputs are computed with, for the report."""
        return {"version": "unknown", "how": self.name}

    def reference_key(self, spec: TensorSpec) -> str:
        """Where a comparison's expected values came from, e.g. "torch/y" (default: the runner's name)."""
        return self.name

    def skip_reason(self, spec: TensorSpec) -> str | None:
        """Why this runner gives no reference for ``spec``, or None when it does."""
        return None

    def skip_note(self, skipped: Sequence[TensorSpec]) -> str | None:
        """One report line for every output this runner skips (they share a reason), or None."""
        if not skipped:
            return None
        first = skipped[0].name
        names = first if len(skipped) == 1 else f"{first} and {len(skipped) - 1} more {skipped[0].role or 'output'}s"
        return f"{names} vs {self.name}: skipped; {self.skip_reason(skipped[0])}"

    def notes(self) -> list[str]:
        """What a report must say when this runner is a reference (once per check)."""
        return []

    def running_var_gaps(self) -> list[dict]:
        """Per BatchNorm, the gap between torch's and the ONNX spec's running_var (recorded torch only)."""
        return []


class RecordedTorchRunner(Runner):
    """What PyTorch produced at export time (reference.npz): answers only for the recorded inputs.

    running_var: an artifact following the ONNX spec (population variance) is compared with ``spec/``,
    one implementing PyTorch's unbiased update with ``torch/`` (see shared notes on BN semantics).
    """

    name = "torch"

    def __init__(self, export: ExportReferences, outputs: list[TensorSpec], running_var: str) -> None:
        self.export = export
        self.outputs = outputs
        self.running_var = running_var

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        if not same_arrays(feed, self.export.inputs()):
            raise BndeployError(TORCH_ONLY_RECORDED)
        return {spec.name: self.export.at(self.reference_key(spec)) for spec in self.outputs}

    def reference_key(self, spec: TensorSpec) -> str:
        prefix = SPEC if spec.role == "running_var" and self.running_var == "onnx" else TORCH
        return reference_key(prefix, spec.name)

    def provenance(self) -> dict[str, str]:
        recorded = (self.export.manifest.get("versions") or {}).get("torch") or "unknown"
        return {"version": recorded, "how": f"outputs recorded at export time ({self.export.reference_path.name})"}

    def running_var_gaps(self) -> list[dict]:
        """Per BatchNorm, how far torch's unbiased running_var is from the ONNX spec's population one."""
        gaps, export = [], self.export
        for spec in self.outputs:
            if spec.role != "running_var" or not (export.has(TORCH, spec.name) and export.has(SPEC, spec.name)):
                continue
            gap = np.max(np.abs(export.get(TORCH, spec.name).astype(np.float64) - export.get(SPEC, spec.name)))
            gaps.append({"output": spec.name, "batch_count": spec.batch_count, "max_gap": float(gap)})
        return gaps

    def notes(self) -> list[str]:
        """The population-vs-unbiased difference, stated with its size (a range over BatchNorms): expected,
        not a failure."""
        gaps = self.running_var_gaps()
        if not gaps:
            return []
        counts = sorted({g["batch_count"] for g in gaps if g["batch_count"] is not None})
        n = "unknown" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        low, high = min(g["max_gap"] for g in gaps), max(g["max_gap"] for g in gaps)
        size = f"max {high:.3g}" if len(gaps) == 1 else f"max {low:.3g} to {high:.3g} over {len(gaps)} BatchNorms"
        follows = "the ONNX spec" if self.running_var == "onnx" else "PyTorch"
        prefix = SPEC if self.running_var == "onnx" else TORCH
        compared = gaps[0]["output"] if len(gaps) == 1 else "<name>"
        return [
            f"running_var: ONNX uses the population variance, PyTorch the unbiased one (n/(n-1), n={n}): "
            f"torch's own value differs from the ONNX spec by {size} "
            f"[the artifact follows {follows}, so it is compared against {reference_key(prefix, compared)}]"
        ]


class OnnxRuntimeRunner(Runner):
    """The source ONNX run by ONNX Runtime with graph optimizations disabled (the graph as written).

    ``running_var``: the artifact's mode; ORT follows the ONNX spec, so an artifact implementing
    PyTorch's unbiased update has no onnxruntime reference for its running_var outputs.
    """

    name = "onnxruntime"
    supports_intermediates = True

    def __init__(self, onnx_path: str | Path, running_var: str = "onnx") -> None:
        from bndeploy.onnxruntime_reference import reference_session

        self.onnx_path = Path(onnx_path)
        self.running_var = running_var
        self.session = reference_session(self.onnx_path)  # fails here, before anything runs, without ORT

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        from bndeploy.onnxruntime_reference import run_session

        return run_session(self.session, feed, str(self.onnx_path))

    def intermediates(self, feed: Feed, names: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Every node output (or ``names``) in the graph's (topological) order, INTERMEDIATES_PER_RUN per
        ORT run so memory stays bounded; optimizations stay disabled, so each tensor is the graph's own."""
        from bndeploy.onnxruntime_reference import reference_session, run_session

        model = _load_onnx(self.onnx_path)
        wanted = list(names) if names is not None else node_outputs(model)
        present = {o.name for o in model.graph.output}
        for name in wanted:
            if name not in present:
                model.graph.output.append(_value_info(name))
        session = reference_session(model.SerializeToString())
        for start in range(0, len(wanted), INTERMEDIATES_PER_RUN):
            chunk = wanted[start:start + INTERMEDIATES_PER_RUN]
            yield from run_session(session, feed, str(self.onnx_path), chunk).items()

    def skip_reason(self, spec: TensorSpec) -> str | None:
        if spec.role == "running_var" and self.running_var == "torch":
            return ("onnxruntime follows the ONNX spec (population variance) while this artifact implements "
                    "PyTorch's unbiased update, so it is compared against torch only")
        return None

    def provenance(self) -> dict[str, str]:
        from bndeploy.onnxruntime_reference import HOW, onnxruntime_version

        return {"version": onnxruntime_version() or "not installed", "how": HOW}


def node_outputs(model) -> list[str]:
    """Every tensor a node of ``model`` produces, in node order (ONNX keeps nodes topologically sorted)."""
    return [name for node in model.graph.node for name in node.output if name]


def same_arrays(feed: Feed, recorded: Feed) -> bool:
    """The same names, and arrays equal in dtype, shape and every value (NaN equal to NaN)."""
    if set(feed) != set(recorded):
        return False
    for name, expected in recorded.items():
        given = np.asarray(feed[name])
        if given.dtype != expected.dtype or given.shape != expected.shape:
            return False
        nan_aware = np.issubdtype(given.dtype, np.floating)
        if not np.array_equal(given, expected, equal_nan=nan_aware):
            return False
    return True


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(
            missing_message("compile", "onnxruntime's intermediate tensors (reading the ONNX graph)", ["onnx"])
        ) from None
    return onnx.load(str(path))


def _value_info(name: str):
    import onnx

    return onnx.ValueInfoProto(name=name)  # no type: ORT infers it
