"""Golden directories: a passing check's inputs and reference outputs, with their provenance, so a later
artifact is compared with them where neither torch nor onnx is installed (a CI runner, a board).

``GoldenWriter`` writes one (``check --save-golden DIR``), a sample at a time, atomically, and only
when the check passed. ``Golden`` reads one (``--against golden:DIR``): its samples are the check's
inputs, and each reference it recorded becomes a ``GoldenRunner`` named ``golden/<reference>`` that
answers only for those inputs. A golden from another model (other input/output names, shapes or dtypes,
another mode) is refused, naming what differs. The format is owned by ``bndeploy.layout``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from bndeploy import __version__
from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.files import atomic_directory, sha256_of
from bndeploy.layout import (GOLDEN_KIND, GOLDEN_MANIFEST, GOLDEN_SAMPLES_DIR, INPUT, golden_sample_file, manifest_header,
                             read_arrays, read_golden_manifest, strip_prefix, write_golden_sample, write_manifest)
from bndeploy.runtime.runners import Feed, Runner
from bndeploy.runtime.samples import Sample, SampleSource
from bndeploy.runtime.specs import TensorSpec, specs_from_manifest

GOLDEN_PREFIX = "golden:"


def feed_digest(feed: Feed) -> str:
    """sha256 over every input's name, dtype, shape and bytes: how a golden finds a sample's outputs."""
    digest = hashlib.sha256()
    for name in sorted(feed):
        array = np.ascontiguousarray(feed[name])
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Golden:
    """A golden directory, its manifest read and checked; samples are read one at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise BndeployError(f"golden directory {self.directory} not found")
        self.manifest = read_golden_manifest(self.directory)
        where = str(self.directory / GOLDEN_MANIFEST)
        self.inputs = specs_from_manifest(self.manifest, "inputs", where)
        self.outputs = specs_from_manifest(self.manifest, "outputs", where)
        self.entries: list[dict] = list(self.manifest.get("samples") or [])
        if not self.entries:
            raise ArtifactError(f"{where} lists no samples")

    @property
    def references(self) -> dict[str, dict]:
        return self.manifest.get("references") or {}

    def runners(self) -> list["GoldenRunner"]:
        return [GoldenRunner(self, reference) for reference in self.references]

    def samples(self) -> "GoldenSamples":
        return GoldenSamples(self)

    def arrays(self, entry: dict) -> dict[str, np.ndarray]:
        """One sample file's arrays, verified against the sha256 golden.json records."""
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ArtifactError(f"golden sample {path} is gone (listed in {GOLDEN_MANIFEST}); save the golden again")
        if sha256_of(path) != entry.get("sha256"):
            raise ArtifactError(f"golden sample {path} changed since it was saved (sha256 differs from {GOLDEN_MANIFEST})")
        return read_arrays(path)

    def refuse_if_foreign(self, artifact, outputs: list[TensorSpec]) -> list[str]:
        """Raise naming every difference when this golden was saved from another model; else the notes
        a report should carry (another precision, another source ONNX)."""
        differences = foreign_differences(self, artifact, outputs)
        if differences:
            raise ArtifactError(
                f"{self.directory} is a golden of another model: {'; '.join(differences)}. "
                "Save a golden from this model with bndeploy check ARTIFACT --save-golden DIR"
            )
        return golden_notes(self, artifact)


class GoldenSamples(SampleSource):
    """The golden's inputs, one sample at a time; fp32 inputs are rounded for an fp16 artifact."""

    def __init__(self, golden: Golden) -> None:
        self.golden = golden
        self.many = len(golden.entries) > 1
        self.description = (f"recorded in the golden {golden.directory} ({len(golden.entries)} sample(s); originally "
                            f"{golden.manifest.get('inputs_source', 'unknown')})")

    def __iter__(self) -> Iterator[Sample]:
        for entry in self.golden.entries:
            arrays = self.golden.arrays(entry)
            yield Sample(entry.get("name", entry["file"]), strip_prefix(arrays, INPUT), cast_floats=True)


class GoldenRunner(Runner):
    """One reference's outputs recorded in a golden: answers only for the golden's own inputs."""

    def __init__(self, golden: Golden, reference: str) -> None:
        self.golden = golden
        self.reference = reference
        self.name = f"golden/{reference}"
        self.keys: dict[str, str] = dict(golden.references[reference].get("keys") or {})
        self._by_digest = {entry.get("inputs_digest"): entry for entry in golden.entries}
        self._last: tuple[str, dict] | None = None  # the sample read last (every runner asks for the same one)

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        digest = feed_digest(feed)
        entry = self._by_digest.get(digest)
        if entry is None:
            raise BndeployError(
                f"the golden {self.golden.directory} holds no outputs for these inputs: it answers only for its "
                f"{len(self.golden.entries)} recorded sample(s) (--against golden:DIR checks with exactly those)"
            )
        if self._last is None or self._last[0] != digest:
            self._last = (digest, self.golden.arrays(entry))
        return strip_prefix(self._last[1], self.reference)

    def reference_key(self, spec: TensorSpec) -> str:
        return f"{GOLDEN_PREFIX}{self.keys.get(spec.name, self.reference + '/' + spec.name)}"

    def skip_reason(self, spec: TensorSpec) -> str | None:
        if spec.name in self.keys:
            return None
        return f"{spec.name} vs {self.name}: skipped; the golden recorded no {self.reference} output for it"

    def provenance(self) -> dict[str, str]:
        recorded = self.golden.references[self.reference]
        saved = self.golden.manifest.get("created", "?")
        return {"version": str(recorded.get("version", "unknown")),
                "how": f"{recorded.get('how', self.reference)}; recorded in the golden {self.golden.directory} on {saved}"}


def foreign_differences(golden: Golden, artifact, outputs: list[TensorSpec]) -> list[str]:
    manifest = golden.manifest
    float_width_may_differ = manifest.get("dtype") != artifact.dtype
    differences = (_spec_differences("input", golden.inputs, artifact.inputs, float_width_may_differ)
                   + _spec_differences("output", golden.outputs, artifact.outputs, float_width_may_differ))
    if manifest.get("mode") != artifact.mode:
        differences.append(f"mode: the golden's is {manifest.get('mode')}, the artifact's {artifact.mode}")
    has_running_var = any(spec.role == "running_var" for spec in outputs)
    if has_running_var and manifest.get("running_var") != artifact.running_var:
        differences.append(f"running_var: the golden follows {manifest.get('running_var')}, "
                           f"the artifact {artifact.running_var}")
    return differences


def _spec_differences(kind: str, golden: list[TensorSpec], artifact: list[TensorSpec], float_width_may_differ: bool) -> list[str]:
    golden_names, artifact_names = [s.name for s in golden], [s.name for s in artifact]
    if golden_names != artifact_names:
        only_golden = [n for n in golden_names if n not in artifact_names]
        only_artifact = [n for n in artifact_names if n not in golden_names]
        if not only_golden and not only_artifact:
            return [f"{kind}s: in another order ({', '.join(golden_names)} in the golden)"]
        return [f"{kind}s: " + "; ".join(
            f"{len(names)} only in the {where} ({_short(names)})"
            for names, where in ((only_golden, "golden"), (only_artifact, "artifact")) if names)]
    differences = []
    for recorded, actual in zip(golden, artifact):
        if list(recorded.shape) != list(actual.shape):
            differences.append(f"{kind} {actual.name!r}: shape {list(recorded.shape)} in the golden, "
                               f"{list(actual.shape)} in the artifact")
        if recorded.dtype != actual.dtype and not (float_width_may_differ and _both_floating(recorded.dtype, actual.dtype)):
            differences.append(f"{kind} {actual.name!r}: dtype {recorded.dtype} in the golden, {actual.dtype} in the artifact")
    return differences


def _short(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _both_floating(a: str, b: str) -> bool:
    return np.issubdtype(np.dtype(a), np.floating) and np.issubdtype(np.dtype(b), np.floating)


def golden_notes(golden: Golden, artifact) -> list[str]:
    manifest, notes = golden.manifest, []
    if manifest.get("dtype") != artifact.dtype:
        notes.append(f"golden: saved from a {manifest.get('dtype')} artifact, this one is {artifact.dtype}: "
                     "its inputs are rounded to the artifact's dtype, its outputs compared with this dtype's tolerances")
    recorded = (manifest.get("source") or {}).get("onnx_sha256")
    current = (artifact.manifest.get("source") or {}).get("onnx_sha256")
    if recorded and current and recorded != current:
        notes.append(f"golden: this artifact was compiled from another ONNX file than the golden's "
                     f"(sha256 {current[:12]}... vs {recorded[:12]}...) with the same inputs and outputs")
    return notes


class GoldenWriter:
    """Writes a golden directory a sample at a time into a temporary directory beside ``directory``;
    ``commit`` moves it into place whole, ``discard`` (or an error) leaves nothing behind."""

    def __init__(self, directory: str | Path, replace: bool = False) -> None:
        self.directory = Path(directory).absolute()
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(_atomic(self.directory, replace))
        (self.tmp / GOLDEN_SAMPLES_DIR).mkdir()
        self.entries: list[dict] = []

    def add(self, name: str, feed: Feed, expected: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        relative = golden_sample_file(len(self.entries))
        write_golden_sample(self.tmp / relative, feed, expected)
        self.entries.append({"file": relative, "name": name, "inputs_digest": feed_digest(feed),
                             "sha256": sha256_of(self.tmp / relative)})

    def commit(self, manifest: dict) -> Path:
        write_manifest(self.tmp / GOLDEN_MANIFEST, manifest_header(GOLDEN_KIND) | manifest | {"samples": self.entries})
        self._stack.close()
        return self.directory

    def discard(self) -> None:
        self._stack.__exit__(_Discarded, _Discarded(), None)


class _Discarded(Exception):
    """Raised into atomic_directory's block to remove the temporary directory."""


@contextlib.contextmanager
def _atomic(directory: Path, replace: bool):
    try:
        with atomic_directory(directory, force=replace) as tmp:
            yield tmp
    except _Discarded:
        pass


def golden_manifest(artifact, outputs: list[TensorSpec], runners: list[Runner], keys: dict[str, dict[str, str]],
                    inputs_source: str) -> dict:
    """golden.json's provenance: what was checked, against what, with which tools, when."""
    source = artifact.manifest.get("source") or {}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {
            "directory": str(artifact.directory),
            "target": artifact.target_name,
            "device": artifact.device,
            "library_sha256": (artifact.manifest.get("library") or {}).get("sha256"),
        },
        "source": {"onnx": source.get("onnx"), "onnx_sha256": source.get("onnx_sha256"),
                   "export_manifest": source.get("export_manifest")},
        "mode": artifact.mode,
        "dtype": artifact.dtype,
        "running_var": artifact.running_var,
        "inputs": [spec_entry(s) for s in artifact.inputs],
        "outputs": [spec_entry(s) for s in outputs],
        "inputs_source": inputs_source,
        "references": {r.name: r.provenance() | {"keys": keys.get(r.name, {})} for r in runners},
        "versions": tool_versions(artifact),
    }


def spec_entry(spec: TensorSpec) -> dict:
    entry = {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
    extra = {"role": spec.role, "batchnorm": spec.batchnorm, "batch_count": spec.batch_count}
    return entry | {k: v for k, v in extra.items() if v is not None}


def tool_versions(artifact) -> dict[str, str | None]:
    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"bndeploy": __version__, "tvm": (artifact.manifest.get("versions") or {}).get("tvm"),
            "numpy": np.__version__, "onnxruntime": installed("onnxruntime"), "python": platform.python_version()}
