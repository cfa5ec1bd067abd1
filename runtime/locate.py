"""`bndeploy check ART --locate`: the first ONNX node whose output the artifact gets wrong.

The artifact runs once under TVM's VM instrumentation; after each kernel call its outputs (the destination
arguments of the call) are read, put back in the ONNX layout and compared at once with ONNX Runtime's value
of the same tensor, then dropped. Which tensor each kernel call writes comes from the kernel map recorded
at compile time (artifact.json ``kernel_map``, compile/kernel_map.py): a folded Conv+BatchNorm kernel writes
the BatchNorm's output, a fused epilogue its last op's; ONNX nodes computed inside a kernel have no boundary
of their own and are reported as such, never guessed at.

ONNX Runtime runs the source model with graph optimizations disabled and the mapped tensors added to its
outputs, fetched in windows of at most ``window_bytes`` in the order the kernels need them, so the memory
held is one window plus the artifact's own, never every intermediate. In train mode ORT normalises with
batch statistics, as the artifact does.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bndeploy.compare import Comparison, compare
from bndeploy.errors import BndeployError
from bndeploy.layout import ARTIFACT_MANIFEST
from bndeploy.tolerance import Tolerance, default_tolerance

VM_BUILTIN_PREFIX = "vm."
ONNXRUNTIME = "onnxruntime"

# What a node's row says about it.
COMPARED = "compared"  # a kernel writes its output: compared with ORT's
INSIDE = "inside"  # computed inside a fused kernel, with no boundary of its own
NO_KERNEL = "no kernel"  # no kernel writes it (a view such as a reshape, folded into constants, or an input)
NOT_COMPARABLE = "not comparable"  # a kernel writes it, in a layout that cannot be mapped back


@dataclass(frozen=True)
class LocateSettings:
    tolerance: Tolerance | None = None  # default: the artifact's dtype and mode default (bndeploy.tolerance)
    window_bytes: int = 256 << 20  # ORT intermediates held at once
    context: int = 8  # nodes listed before the first divergence


@dataclass
class NodeResult:
    index: int  # position in graph (topological) order
    name: str
    op: str
    status: str
    kernel: str | None = None  # the kernel that writes (or contains) it
    call: int | None = None  # that kernel's position among the VM's kernel calls
    comparisons: list[Comparison] = field(default_factory=list)
    note: str = ""

    @property
    def failed(self) -> bool:
        return any(not c.passed for c in self.comparisons)

    def worst(self) -> Comparison | None:
        return max(self.comparisons, key=lambda c: (not c.passed, c.max_abs_error), default=None)


@dataclass
class Location:
    artifact: str
    target: str
    mode: str
    dtype: str
    inputs_source: str
    tolerance: Tolerance
    nodes: list[NodeResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ort_runs: int = 0
    peak_rss_mib: float = 0.0
    context: int = LocateSettings.context

    @property
    def first_failure(self) -> NodeResult | None:
        return next((n for n in self.nodes if n.failed), None)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.status] = counts.get(node.status, 0) + 1
        return counts

    def inside_kernel(self, node: NodeResult) -> list[NodeResult]:
        """The other nodes computed by the kernel call that writes ``node``, with no boundary of their own."""
        return [n for n in self.nodes if n.status == INSIDE and n.call == node.call]

    def summary(self) -> str:
        counts = self.counts()
        lines = [
            f"locate: {self.artifact} (target {self.target}, {self.mode}, {self.dtype}) vs {ONNXRUNTIME} "
            f"(graph as written), inputs {self.inputs_source}",
            f"tolerance atol={self.tolerance.atol:g} rtol={self.tolerance.rtol:g} at every compared tensor; "
            f"{len(self.nodes)} ONNX nodes: {counts.get(COMPARED, 0)} compared at a kernel's output, "
            f"{counts.get(INSIDE, 0)} inside fused kernels (no boundary of their own), "
            f"{counts.get(NO_KERNEL, 0)} written by no kernel, {counts.get(NOT_COMPARABLE, 0)} not comparable",
        ]
        failure = self.first_failure
        if failure is None:
            lines.append("no compared node leaves tolerance")
        else:
            lines += self._failure_lines(failure)
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time {self.seconds:.1f} s ({self.ort_runs} onnxruntime run(s)); peak memory (max RSS) "
                     f"{self.peak_rss_mib:.0f} MiB")
        return "\n".join(lines)

    def _failure_lines(self, failure: NodeResult) -> list[str]:
        worst = failure.worst()
        later = [n for n in self.nodes if n.failed and n.index > failure.index]
        lines = ["", f"first divergence: node {failure.name!r} ({failure.op}, #{failure.index} in topological order), "
                     f"written by kernel {failure.kernel} (kernel call {failure.call})"]
        lines += ["  " + line for line in worst.details().splitlines()]
        inside = self.inside_kernel(failure)
        if inside:
            listed = ", ".join(f"{n.name!r} ({n.op})" for n in inside)
            lines.append(f"  cannot be narrowed further: the same kernel also computes {listed} with no boundary "
                         f"to compare between them, so the cause is one of these {len(inside) + 1} nodes")
        lines += ["", f"nodes before it (topological order, last {self.context}):", *self._context_table(failure)]
        if later:
            lines.append(f"{len(later)} later compared node(s) also leave tolerance (from {later[0].name!r} on)")
        return lines

    def _context_table(self, failure: NodeResult) -> list[str]:
        shown = [n for n in self.nodes if n.index <= failure.index][-(self.context + 1):]
        rows = [("#", "node", "op", "where", "max abs err", "max rel err", "result")]
        for node in shown:
            worst = node.worst()
            where = {COMPARED: f"{node.kernel} output", INSIDE: f"inside {node.kernel}"}.get(node.status, node.status)
            result = "-" if worst is None else ("FAIL" if node.failed else "ok")
            rows.append((str(node.index), node.name, node.op, where,
                         f"{worst.max_abs_error:.3g}" if worst else "-", f"{worst.max_rel_error:.3g}" if worst else "-",
                         result))
        widths = [min(48, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
        return ["  " + "  ".join(_clip(c, w).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    def to_dict(self) -> dict:
        failure = self.first_failure
        return {
            "artifact": self.artifact, "target": self.target, "mode": self.mode, "dtype": self.dtype,
            "inputs_source": self.inputs_source, "tolerance": self.tolerance.to_dict(),
            "first_divergence": None if failure is None else failure.name,
            "nodes": [{"index": n.index, "name": n.name, "op": n.op, "status": n.status, "kernel": n.kernel,
                       "call": n.call, "note": n.note, "comparisons": [c.to_dict() for c in n.comparisons]}
                      for n in self.nodes],
            "notes": self.notes, "seconds": self.seconds, "onnxruntime_runs": self.ort_runs,
            "peak_rss_mib": self.peak_rss_mib,
        }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


# --------------------------------------------------------------------------------------------------


def locate(artifact_dir, inputs=None, seed: int | None = None, device: str | None = None,
           settings: LocateSettings = LocateSettings()) -> Location:
    """Run the artifact kernel by kernel against ONNX Runtime; see the module docstring."""
    from bndeploy.runtime.artifact import load_artifact
    from bndeploy.runtime.check import RECORDED_INPUTS, choose_inputs
    from bndeploy.runtime.inputs import cast_floats_to

    started = time.perf_counter()
    artifact = load_artifact(artifact_dir, device)
    kernel_map = recorded_kernel_map(artifact.manifest, artifact.directory)
    feed, inputs_source, _ = choose_inputs(artifact, inputs, seed)
    model, nodes = _source_graph(artifact)
    tolerance = settings.tolerance or default_tolerance(artifact.dtype, artifact.mode)
    plan = _Plan(kernel_map, model, nodes, folded_into(artifact.manifest))
    reference = _WindowedReference(model, plan.fetch_order(), feed, settings.window_bytes)
    for tensor in reference.untyped:
        plan.problems[tensor] = "ONNX shape inference gives it no type, so ONNX Runtime cannot expose it"
    capture = _Capture(plan, reference, tolerance)
    artifact_feed = cast_floats_to(feed, artifact.inputs) if inputs_source == RECORDED_INPUTS else feed
    with artifact.instrumented(capture.after_each_kernel):
        try:
            artifact.run(artifact_feed)
        except BndeployError:
            if capture.error is not None:
                raise capture.error from None
            raise
    if capture.error is not None:
        raise capture.error
    capture.check_complete()
    location = Location(str(artifact.directory), artifact.target_name, artifact.mode, artifact.dtype, inputs_source,
                        tolerance, plan.node_results(capture.comparisons), nodes.unnamed_note() + plan.notes(),
                        context=settings.context)
    location.ort_runs = reference.runs
    location.seconds = time.perf_counter() - started
    location.peak_rss_mib = peak_rss_mib()
    return location


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB): native allocations included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recorded_kernel_map(manifest: dict, directory: Path) -> list[dict]:
    kernel_map = manifest.get("kernel_map")
    if kernel_map is None:
        device = (manifest.get("target") or {}).get("device", "cpu")
        why = ("bndeploy records it for CPU targets only" if device != "cpu"
               else "it was compiled by a bndeploy that did not record one")
        raise BndeployError(f"{directory / ARTIFACT_MANIFEST} has no kernel map (which ONNX tensor each kernel writes), "
                            f"which --locate needs: {why}; re-compile it for a CPU target with this bndeploy")
    return kernel_map


def folded_into(manifest: dict) -> dict[str, str]:
    """The fusion report's folds: linear op -> the BatchNorm folded into it (names as the report writes them)."""
    return {entry["into"]: entry["batchnorm"] for entry in manifest.get("fusion") or []
            if entry.get("folded") and entry.get("into")}


def _source_graph(artifact):
    from bndeploy.extras import require
    from bndeploy.onnx_nodes import check_topological_order, graph_nodes
    from bndeploy.runtime.sources import source_onnx_path

    require("compile", "bndeploy check --locate (reading the ONNX graph)")
    import onnx

    path = source_onnx_path(artifact.manifest, artifact.directory)
    model = onnx.load(str(path))
    check_topological_order(model)
    return model, graph_nodes(model.graph)


class _Plan:
    """Which ONNX tensor each kernel call writes (from the kernel map), and each node's status."""

    def __init__(self, kernel_map: list[dict], model, nodes, folded: dict[str, str]) -> None:
        self.kernel_map, self.model, self.nodes, self.folded = kernel_map, model, nodes, folded
        self.problems: dict[str, str] = {}  # tensor -> why it cannot be compared
        self.writer: dict[str, tuple[int, str]] = {}  # tensor -> (kernel call, kernel) writing it
        self.inside: dict[str, tuple[int, str]] = {}  # tensor -> (kernel call, kernel) computing it inside
        for call, entry in enumerate(kernel_map):
            for output in entry["outputs"]:
                tensor = output.get("tensor")
                if tensor is None:
                    continue
                self.writer.setdefault(tensor, (call, entry["kernel"]))
                if output.get("axes") is None:
                    self.problems[tensor] = output.get("not_comparable", "its layout is not recorded")
            for tensor in entry.get("inside", []):
                self.inside.setdefault(tensor, (call, entry["kernel"]))

    def fetch_order(self) -> list[str]:
        seen, order = set(), []
        for entry in self.kernel_map:
            for output in entry["outputs"]:
                tensor = output.get("tensor")
                if tensor and tensor not in self.problems and tensor not in seen and tensor in self.nodes.producer:
                    seen.add(tensor)
                    order.append(tensor)
        return order

    def node_results(self, comparisons: dict[str, Comparison]) -> list[NodeResult]:
        results = []
        for index, node in enumerate(self.model.graph.node):
            row = NodeResult(index, self.nodes.names[index], node.op_type, NO_KERNEL)
            outputs = [t for t in node.output if t]
            written = [t for t in outputs if t in self.writer]
            if written:
                row.call, row.kernel = self.writer[written[0]]
                compared = [comparisons[t] for t in written if t in comparisons]
                row.comparisons = compared
                row.status = COMPARED if compared else NOT_COMPARABLE
                row.note = "; ".join(f"{t}: {self.problems[t]}" for t in written if t in self.problems)
            elif any(t in self.inside for t in outputs):
                row.call, row.kernel = self.inside[next(t for t in outputs if t in self.inside)]
                row.status = INSIDE
            results.append(row)
        self._place_folded(results)
        return results

    def _place_folded(self, results: list[NodeResult]) -> None:
        """A linear op a BatchNorm folded into is computed by the kernel that computes that BatchNorm."""
        by_report_name = {(node.name or node.output[0]): row for node, row in zip(self.model.graph.node, results)}
        for into, batchnorm in self.folded.items():
            row, bn_row = by_report_name.get(into), by_report_name.get(batchnorm)
            if row is not None and bn_row is not None and row.status == NO_KERNEL and bn_row.kernel is not None:
                row.status, row.call, row.kernel = INSIDE, bn_row.call, bn_row.kernel
                row.note = f"BatchNormalization {bn_row.name!r} folded into it"

    def notes(self) -> list[str]:
        if not self.problems:
            return []
        listed = "; ".join(f"{t}: {why}" for t, why in list(self.problems.items())[:5])
        return [f"{len(self.problems)} kernel output(s) not comparable ({listed})"]


class _WindowedReference:
    """ORT's value of each mapped tensor, computed a window at a time in the order they are asked for."""

    def __init__(self, model, order: list[str], feed: dict, window_bytes: int) -> None:
        from bndeploy.onnx_nodes import with_outputs_exposed
        from bndeploy.onnxruntime_reference import cast_to_model_types, reference_session

        exposed, untyped = with_outputs_exposed(model, order)
        self.untyped = set(untyped)
        self.order = [t for t in order if t not in self.untyped]
        self.position = {t: i for i, t in enumerate(self.order)}
        self.sizes = _tensor_bytes(exposed, self.order)
        self.window_bytes = window_bytes
        try:
            self.session = reference_session(exposed.SerializeToString())
        except Exception as e:  # ORT raises its own exception types
            raise BndeployError(f"onnxruntime could not load the source model with its intermediates exposed: {e}") from None
        self.feed = cast_to_model_types(self.session, feed)
        self.cache: dict[str, np.ndarray] = {}
        self.runs = 0

    def value(self, tensor: str) -> np.ndarray | None:
        if tensor not in self.position:
            return None
        if tensor not in self.cache:
            self._fetch_window_from(self.position[tensor])
        return self.cache.pop(tensor)

    def _fetch_window_from(self, start: int) -> None:
        window, held = [], 0
        for tensor in self.order[start:]:
            size = self.sizes.get(tensor, self.window_bytes)  # a tensor of unknown size gets a window of its own
            if window and held + size > self.window_bytes:
                break
            window.append(tensor)
            held += size
        self.cache = {}  # drop what the kernels did not ask for before this window is fetched
        try:
            self.cache = dict(zip(window, self.session.run(window, self.feed)))
        except Exception as e:  # ORT raises its own exception types
            raise BndeployError(f"onnxruntime could not compute {window[0]} (and the tensors after it): {e}") from None
        self.runs += 1


def _tensor_bytes(model, tensors: list[str]) -> dict[str, int]:
    """Static sizes from the inferred shapes (absent where unknown)."""
    import onnx

    types = {v.name: v.type.tensor_type for v in list(model.graph.value_info) + list(model.graph.output)}
    sizes = {}
    for tensor in tensors:
        t = types.get(tensor)
        dims = [d.dim_value for d in t.shape.dim] if t is not None and t.HasField("shape") else []
        if dims and all(d > 0 for d in dims) and t.elem_type:
            sizes[tensor] = int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    return sizes


class _Capture:
    """The VM instrument: after each kernel call, compare what it wrote with ORT's value, then drop both."""

    def __init__(self, plan: _Plan, reference: _WindowedReference, tolerance: Tolerance) -> None:
        self.plan, self.reference, self.tolerance = plan, reference, tolerance
        self.calls = 0
        self.comparisons: dict[str, Comparison] = {}
        self.error: BndeployError | None = None

    def after_each_kernel(self, func, name, before_run, result, *args):
        if before_run or name.startswith(VM_BUILTIN_PREFIX) or self.error is not None:
            return 0
        try:
            self._compare_call(self.calls, str(name), args)
        except BndeployError as e:
            self.error = e
        self.calls += 1
        return 0

    def _compare_call(self, call: int, name: str, args) -> None:
        kernel_map = self.plan.kernel_map
        if call >= len(kernel_map) or kernel_map[call]["kernel"] != name:
            recorded = kernel_map[call]["kernel"] if call < len(kernel_map) else "no further call"
            raise BndeployError(f"kernel call {call} runs {name}, but the kernel map records {recorded}: the map does "
                                "not describe this library; re-compile the artifact")
        outputs = kernel_map[call]["outputs"]
        for output, value in zip(outputs, args[len(args) - len(outputs):]):
            tensor = output.get("tensor")
            if tensor is None or output.get("axes") is None or tensor in self.comparisons:
                continue
            expected = self.reference.value(tensor)
            if expected is None:
                continue
            actual = np.transpose(value.numpy(), np.argsort(output["axes"]))
            if "channel_positions" in output:  # stored permuted (and padded): ONNX's channel order back
                actual = np.take(actual, output["channel_positions"], axis=1)
            self.comparisons[tensor] = compare(actual, expected, self.tolerance, tensor, ONNXRUNTIME, ONNXRUNTIME)

    def check_complete(self) -> None:
        if self.calls != len(self.plan.kernel_map):
            raise BndeployError(f"the artifact made {self.calls} kernel calls, its kernel map records "
                                f"{len(self.plan.kernel_map)}: the map does not describe this library; re-compile it")
