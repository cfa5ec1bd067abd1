"""compile_model: ONNX -> Relax -> bndeploy's BatchNorm passes -> one artifact directory per target."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from bndeploy import __version__
from bndeploy.errors import ArtifactError, BndeployError, UnsupportedModelError
from bndeploy.files import atomic_directory, check_output_dir, sha256_of
from bndeploy.layout import (ARTIFACT_KIND, ARTIFACT_MANIFEST, ASSEMBLY_DUMP, DUMP_DIR, EXPORT_KIND, EXPORT_MANIFEST,
                             LIBRARY_FILE, manifest_header, read_manifest, write_manifest)

from . import passes
from .kernel_map import KernelMapRecorder, onnx_shapes
from .opset_conversion import ai_onnx_opset, convert_old_opset, refuse_unsupported_opset
from .targets import TargetSpec, library_compiler, resolve_target, verify_library_machine

DTYPES = ("float32", "float16")
# bndeploy.layout owns the file names; these former names stay importable from here.
MANIFEST_FILE, EXPORT_MANIFEST_FILE = ARTIFACT_MANIFEST, EXPORT_MANIFEST


@dataclass(frozen=True)
class CompileSettings:
    dtype: str = "float32"  # "float16": weights and activations in fp16, BN statistics in fp32
    running_var: str = "onnx"  # "torch": unbiased batch variance in the running-variance update
    dump: bool = False  # write Relax IR before/after the passes (and CUDA source) under dump/
    force: bool = False  # replace existing artifact directories
    tuned: Path | None = None  # a `bndeploy tune` folder: its measured-faster schedules replace the defaults
    # "auto": 3x3 stride-1 convs wide enough for it by Winograd F(2x2, 3x3) (schedules/winograd.py), the rest
    # by the direct kernel; "direct": every conv by the direct kernel (CPU targets)
    conv_algorithm: str = "auto"

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise BndeployError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.running_var not in passes.RUNNING_VAR_MODES:
            raise BndeployError(
                f"running_var must be one of {', '.join(passes.RUNNING_VAR_MODES)}, got {self.running_var!r}"
            )
        from .schedules.relax_rewrite import CONV_ALGORITHMS

        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise BndeployError(f"conv_algorithm must be one of {', '.join(CONV_ALGORITHMS)}, got {self.conv_algorithm!r}")


@dataclass
class SourceModel:
    """The ONNX model to compile and what is known about its interface."""

    path: Path
    sha256: str
    model: onnx.ModelProto
    export_manifest: Path | None
    mode: str
    inputs: list[dict]
    outputs: list[dict]
    train_dropout: dict | None = None  # the export's record of dropout run as identity in train mode
    opset_conversion: dict | None = None  # an opset below 14 converted in memory (opset_conversion.py)


Progress = Callable[[str], None]

# TVM's ONNX importer and pass infrastructure are not safe to run from two threads at once (seen: the
# importer's assertions fire); compiles from several threads take turns in these steps. CUDA builds
# happen in a worker process and overlap freely.
_IN_PROCESS_TVM = threading.Lock()


def compile_model(onnx_path, targets: list[str], out, settings: CompileSettings = CompileSettings(),
                  progress: Progress | None = None) -> list[Path]:
    """Compile ``onnx_path`` for each target; returns the artifact directories written.

    One target: ``out`` is the artifact directory. Several: ``out/<target name>/`` each. Every
    directory is written atomically, and all of them are checked for existence before any work.
    """
    settings.validate()
    say = progress or (lambda message: None)
    specs = _resolve_targets(targets)
    out_dirs = _artifact_dirs(Path(out), specs)
    for out_dir in out_dirs:
        check_output_dir(out_dir, settings.force)
    source = load_source(onnx_path)
    say(f"importing {source.path.name} ({source.mode} mode) into TVM Relax")
    kernel_map = KernelMapRecorder()
    with _IN_PROCESS_TVM:
        mod, fusion, dumps = lower_to_relax(source, settings, kernel_map)
    written = []
    for index, (spec, out_dir) in enumerate(zip(specs, out_dirs), start=1):
        say(f"[{index}/{len(specs)}] building for target {spec.name} -> {out_dir}")
        with atomic_directory(out_dir, settings.force) as tmp:
            built = _build(mod, spec, tmp, settings, kernel_map)
            if settings.dump:
                _write_dumps(tmp / DUMP_DIR, dumps)
            write_manifest(tmp / ARTIFACT_MANIFEST, _manifest(source, spec, settings, fusion, built, tmp))
        written.append(out_dir.absolute())
    return written


def _resolve_targets(names: list[str]) -> list[TargetSpec]:
    if not names:
        raise BndeployError("no target given; pass at least one --target")
    specs = [resolve_target(name) for name in names]
    seen = [s.name for s in specs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise BndeployError(f"target given more than once: {', '.join(duplicates)}")
    return specs


def _artifact_dirs(out: Path, specs: list[TargetSpec]) -> list[Path]:
    if len(specs) == 1:
        return [out]
    return [out / spec.name for spec in specs]


# --------------------------------------------------------------------------------------------------
# Source model


def load_source(onnx_path) -> SourceModel:
    path = Path(onnx_path).absolute()
    if not path.is_file():
        raise BndeployError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, ...
        raise BndeployError(f"{path}: not a valid ONNX model ({_first_line(e)})") from None
    _refuse_external_data_outside(model, path.parent)
    refuse_unsupported_opset(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx ValidationError, missing external file, ...
        raise BndeployError(f"{path}: not a valid ONNX model ({_first_line(e)})") from None
    model, conversion = convert_old_opset(model, path)
    _check_batchnorm_shapes(model, path)
    sha = sha256_of(path)
    export_path = path.parent / EXPORT_MANIFEST
    export = _matching_export_manifest(export_path, path, sha)
    if export is not None:
        return SourceModel(path, sha, model, export_path, export["mode"], export["inputs"], export["outputs"],
                           export.get("train_dropout"), conversion)
    inputs, outputs = _interface_from_graph(model)
    return SourceModel(path, sha, model, None, _mode_of(model), inputs, outputs, opset_conversion=conversion)


def _refuse_external_data_outside(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse, before any file is opened, external tensor data that resolves outside the model's folder
    (``../x``, absolute paths, symlinks leading out): a model file must not make bndeploy read elsewhere."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    base = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        resolved = (base / location).resolve()
        if Path(location).is_absolute() or not resolved.is_relative_to(base):
            raise BndeployError(
                f"{folder}: tensor {tensor.name!r} stores its data at "
                f"{location!r}, outside the model's folder {base}; refusing to read it (path traversal)"
            )


def _check_batchnorm_shapes(model: onnx.ModelProto, path: Path) -> None:
    """Each BatchNormalization's scale/bias/mean/var must be 1-D of the input's channel count."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.value_info):
        dims = value.type.tensor_type.shape.dim
        shapes.setdefault(value.name, [d.dim_value if d.HasField("dim_value") else None for d in dims])
    for node in _batchnorm_nodes(model):
        x_shape = shapes.get(node.input[0]) or []
        channels = x_shape[1] if len(x_shape) > 1 else None
        for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:]):
            shape = shapes.get(name)
            if shape is None:
                continue
            if len(shape) != 1 or (channels is not None and shape[0] not in (channels, None)):
                raise UnsupportedModelError(
                    f"{path}: BatchNormalization {_node_name(node)!r}: {role} {name!r} has shape {shape}, "
                    f"expected [{channels if channels is not None else 'C'}] (one value per channel of "
                    f"{node.input[0]!r}, shape {x_shape})"
                )


def _matching_export_manifest(export_path: Path, onnx_path: Path, sha: str) -> dict | None:
    """export.json beside the model, when it describes this very file; a stale one is an error."""
    if not export_path.is_file():
        return None
    export = read_manifest(export_path, EXPORT_KIND)
    if export.get("onnx", {}).get("file") != onnx_path.name:
        return None
    if export["onnx"].get("sha256") != sha:
        raise ArtifactError(
            f"{onnx_path} does not match the sha256 recorded in {export_path}: the model was changed "
            f"after export; re-export it, or move it away from {EXPORT_MANIFEST} to compile it on its own"
        )
    return export


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _mode_of(model: onnx.ModelProto) -> str:
    return "train" if any(_training_mode(n) for n in _batchnorm_nodes(model)) else "inference"


def _batchnorm_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _training_mode(node: onnx.NodeProto) -> bool:
    return any(a.name == "training_mode" and a.i == 1 for a in node.attribute)


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _value_info(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype}


def _interface_from_graph(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_value_info(v) for v in model.graph.input if v.name not in initializers]
    roles = {}
    for node in _batchnorm_nodes(model):
        for index, role in ((1, "running_mean"), (2, "running_var")):
            if len(node.output) > index and node.output[index]:
                roles[node.output[index]] = {"role": role, "batchnorm": _node_name(node)}
    outputs = [{**_value_info(v), **roles.get(v.name, {"role": "output"})} for v in model.graph.output]
    return inputs, outputs


# --------------------------------------------------------------------------------------------------
# Relax


def lower_to_relax(source: SourceModel, settings: CompileSettings, kernel_map: KernelMapRecorder | None = None):
    """Import, report and rewrite every BN; returns (module, fusion report, IR dumps by file name).
    ``kernel_map`` learns each ONNX tensor's shape before any layout pass."""
    from tvm import relax

    from .onnx_import import import_onnx

    try:
        mod = import_onnx(source.model)
    except Exception as e:  # the importer raises assorted TVM and Python errors
        raise UnsupportedModelError(f"{source.path}: TVM's ONNX importer failed: {_first_line(e)}") from None
    if kernel_map is not None:
        kernel_map.graph_outputs = [o.name for o in source.model.graph.output]
        kernel_map.onnx_shapes = onnx_shapes(mod, kernel_map.graph_outputs)
    bn_names = [_node_name(n) for n in _batchnorm_nodes(source.model)]
    fusion = passes.fusion_report(mod, bn_names, _linear_op_names(source.model))
    dumps = {"relax_imported.py": mod.script()}
    mod = passes.fold_conv_batchnorm(mod)
    mod = passes.lower_inference_batchnorm(mod)
    if settings.dtype == "float16":
        # batch_norm is "never fp16" for ToMixedPrecision, so training BN keeps fp32 inputs and
        # statistics; the decomposition below therefore runs in fp32. Graph inputs/outputs keep
        # their declared dtype (cast at the boundary).
        mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
    mod = passes.decompose_training_batchnorm(mod, settings.running_var)
    passes.assert_no_batchnorm(mod)
    dumps["relax_after_passes.py"] = mod.script()
    return mod, fusion, dumps


def _conv_names(model: onnx.ModelProto, ordinals: list[int]) -> list[str]:
    """The ONNX names of the k-th Conv nodes (the importer emits one conv2d per Conv, in graph order)."""
    from .fold_rules import CONV

    names = _linear_op_names(model).get(CONV, [])
    return [names[k] for k in ordinals if k < len(names)]


def _linear_op_names(model: onnx.ModelProto) -> dict[str, list[str]]:
    """ONNX node names of the ops a BatchNorm can fold into, by fold_rules kind, in graph order."""
    from .fold_rules import CONV, CONV_TRANSPOSE, MATMUL

    kinds = {"Conv": CONV, "ConvTranspose": CONV_TRANSPOSE, "Gemm": MATMUL, "MatMul": MATMUL}
    names: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in kinds:
            names.setdefault(kinds[node.op_type], []).append(_node_name(node))
    return names


def _write_dumps(dump_dir: Path, dumps: dict[str, str]) -> None:
    dump_dir.mkdir(exist_ok=True)
    for name, text in dumps.items():
        (dump_dir / name).write_text(text)


# --------------------------------------------------------------------------------------------------
# Build


@dataclass
class BuildResult:
    kernels: list[str]  # the kernels the Relax VM calls, in the executable's order
    archs: list[str]  # CUDA architectures with device code (empty for CPU targets)
    costs: dict[str, dict[str, int]]  # per kernel: useful FLOPs and parameter bytes per call (CPU targets)
    fma_peak: dict | None = None  # the FMA-peak kernel the library carries for `bndeploy profile`
    tuned_kernels: list[str] = field(default_factory=list)  # kernels scheduled from the tuning database
    statistics_fused: list[int] = field(default_factory=list)  # ordinals of the Convs that sum BN statistics
    kernel_map: list[dict] | None = None  # which ONNX tensor each kernel call writes (kernel_map.py; CPU only)


def _build(mod, spec: TargetSpec, out_dir: Path, settings: CompileSettings,
           kernel_map: KernelMapRecorder | None = None) -> BuildResult:
    """Build and export the library into ``out_dir``."""
    if spec.device == "cuda":
        if settings.tuned is not None:
            raise BndeployError(f"--tuned applies to CPU targets ({spec.name!r} is a CUDA target)")
        info = _build_cuda(mod, spec, out_dir, settings.dump)  # a worker process: no lock needed
        return BuildResult(list(info["kernels"]), list(info["archs"]), {},
                           statistics_fused=list(info.get("statistics_fused", [])))
    with _IN_PROCESS_TVM:
        return _build_llvm(mod, spec, out_dir, settings, kernel_map)


def _build_llvm(mod, spec: TargetSpec, out_dir: Path, settings: CompileSettings,
                kernel_map: KernelMapRecorder | None = None) -> BuildResult:
    from .cpu import build_lowered, lower_cpu
    from .kernel_costs import kernel_costs
    from .schedules import TUNED_ATTR, isa_for_target
    from .schedules.relax_rewrite import CONV_ALGORITHM_ATTR, STATISTICS_FUSED_ATTR
    from .schedules.fma_peak import add_fma_peak
    from .tuning import load_database

    fcompile = library_compiler(spec)  # fails before the build when a cross toolchain is missing
    target = spec.tvm_target()
    tuned, dump = settings.tuned, settings.dump
    database = load_database(tuned) if tuned is not None else None
    lowered = lower_cpu(mod.with_attr(CONV_ALGORITHM_ATTR, settings.conv_algorithm), target, database, kernel_map)
    tuned_kernels = [gv.name_hint for gv, f in lowered.functions.items()
                     if f.attrs is not None and TUNED_ATTR in f.attrs]
    costs = kernel_costs(lowered)
    fma_peak = add_fma_peak(lowered, isa_for_target(target))
    executable = build_lowered(lowered, target)
    if dump:  # the library's assembly, for `bndeploy bench --predict` and for reading
        (out_dir / DUMP_DIR).mkdir(exist_ok=True)
        (out_dir / DUMP_DIR / ASSEMBLY_DUMP).write_text(executable.mod.imports[0].inspect_source("asm"))
    library = out_dir / LIBRARY_FILE
    try:
        if fcompile is None:
            executable.export_library(str(library))
        else:
            executable.export_library(str(library), fcompile=fcompile)
    except RuntimeError as e:  # TVM reports compiler/linker failures as RuntimeError with the output
        raise BndeployError(f"target {spec.name!r}: linking {LIBRARY_FILE} failed: {_link_error(e)}") from None
    verify_library_machine(library, spec)
    kernels = kernel_names(executable)
    fused = [int(k) for k in (lowered.attrs or {}).get(STATISTICS_FUSED_ATTR, [])]
    return BuildResult(kernels, [], {name: costs[name] for name in kernels if name in costs}, fma_peak,
                       [name for name in kernels if name in tuned_kernels], fused,
                       kernel_map.entries if kernel_map is not None else None)


def _link_error(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower() and "compilation error" not in line.lower()),
                  lines[0] if lines else "")
    if "crti.o" in detail:
        detail += " (the cross C library is missing: install the libc6-dev-<arch>-cross package)"
    return detail.strip()


def _build_cuda(mod, spec: TargetSpec, out_dir: Path, dump: bool) -> dict:
    from .cuda import build_cuda_library, check_cuda_toolchain

    check_cuda_toolchain()
    library_compiler(spec)  # fails before the build when the host's cross toolchain is missing
    library = out_dir / LIBRARY_FILE
    info = build_cuda_library(mod, spec.tvm_target(), library, dump_dir=(out_dir / DUMP_DIR) if dump else None,
                              host_compiler=spec.cross.compiler if spec.cross else None)
    verify_library_machine(library, spec)
    return info


_PACKED_FUNC = re.compile(r"^@(\S+) packed_func;$", re.MULTILINE)


def kernel_names(executable) -> list[str]:
    """The compiled kernels (PrimFuncs) the Relax VM calls, from the executable's listing."""
    return [name for name in _PACKED_FUNC.findall(executable.as_text()) if not name.startswith("vm.")]


# --------------------------------------------------------------------------------------------------
# Manifest


def _manifest(source: SourceModel, spec: TargetSpec, settings, fusion, built: BuildResult, out_dir: Path) -> dict:
    import tvm

    target = spec.manifest()
    if built.archs:
        target["archs"] = list(built.archs)
    return {
        **manifest_header(ARTIFACT_KIND),
        "target": target,
        "mode": source.mode,
        "dtype": settings.dtype,
        "running_var": settings.running_var,
        "conv_algorithm": settings.conv_algorithm,
        "library": {"file": LIBRARY_FILE, "sha256": sha256_of(out_dir / LIBRARY_FILE)},
        "source": {"onnx": str(source.path), "onnx_sha256": source.sha256,
                   "export_manifest": str(source.export_manifest) if source.export_manifest else None,
                   "opset": ai_onnx_opset(source.model) if source.opset_conversion is None
                   else source.opset_conversion["from_opset"],
                   **({"opset_conversion": source.opset_conversion} if source.opset_conversion else {})},
        "inputs": source.inputs,
        "outputs": source.outputs,
        "fusion": passes.place_statistics(fusion, _conv_names(source.model, built.statistics_fused), spec.device),
        "kernels": built.kernels,
        "kernel_costs": built.costs,
        **({"kernel_map": built.kernel_map} if built.kernel_map is not None else {}),
        "fma_peak": built.fma_peak,
        "tuning": ({"folder": str(Path(settings.tuned).absolute()), "kernels": built.tuned_kernels}
                   if settings.tuned is not None else None),
        "versions": {"tvm": tvm.__version__, "bndeploy": __version__},
        **({"train_dropout": source.train_dropout} if source.train_dropout else {}),
    }
