"""The export stage: a torch model -> one directory per mode with model.onnx, export.json, reference.npz."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bndeploy.errors import BndeployError, UnsupportedModelError
from bndeploy.export import onnx_graph, validate
from bndeploy.export.loader import LoadedModel
from bndeploy.export.onnx_graph import BatchNormInfo
from bndeploy.export.reference import ReferenceRun, active_dropouts, run_reference
from bndeploy.files import atomic_directory, sha256_of
from bndeploy.layout import (EXPORT_KIND, EXPORT_MANIFEST, ONNX_FILE, REFERENCE_FILE, manifest_header, write_manifest,
                             write_reference)

MODES = ("inference", "train")
# How train mode treats active dropout: None refuses (its output is random), "identity" runs it as in eval mode.
TRAIN_DROPOUT = ("identity",)


@dataclass(frozen=True)
class ExportSettings:
    modes: tuple[str, ...] = MODES
    dynamic_batch: bool = False
    force: bool = False
    train_dropout: str | None = None  # "identity": export train mode with dropout as identity


class ModeNotWrittenError(UnsupportedModelError):
    """A requested mode could not be written; ``written`` holds the modes that were, ``refused`` why not."""

    def __init__(self, message: str, written: dict[str, Path], refused: dict[str, str]):
        super().__init__(message)
        self.written, self.refused = written, refused


def export(model: LoadedModel, out: str | Path, settings: ExportSettings = ExportSettings()) -> dict[str, Path]:
    """Export ``model`` in each requested mode to ``out/<mode>/``; returns {mode: export directory}.

    A mode that cannot be exported (train mode with active dropout and no ``train_dropout`` choice) is
    refused: the other modes are written, then ModeNotWrittenError says which mode is missing and why.
    The user's module is left bit-identical (state and training flag): every run uses a deep copy.
    """
    _check_settings(settings)
    _check_inputs(model.inputs)
    refused = _refused_modes(model, settings)
    modes = tuple(m for m in settings.modes if m not in refused)
    if not modes:
        raise UnsupportedModelError(next(iter(refused.values())))
    written = _export_modes(model, out, settings, modes)
    if refused:
        done = "; ".join(f"{mode} written to {path}" for mode, path in written.items())
        raise ModeNotWrittenError(f"{'; '.join(refused.values())} ({done})", written, refused)
    return written


def _export_modes(model: LoadedModel, out: str | Path, settings: ExportSettings, modes: tuple[str, ...]) -> dict[str, Path]:
    before = _snapshot(model.module)
    infos = onnx_graph.batchnorm_infos(model.module)
    dropouts = active_dropouts(model.module)
    input_names = _input_names(model.module, len(model.inputs))
    references = {mode: _reference(model, infos, mode == "train", settings.train_dropout == "identity")
                  for mode in modes}
    base = _export_eval_copy(model, input_names, settings.dynamic_batch, references[modes[0]].model_output_names)
    written = {}
    with atomic_directory(out, settings.force) as tmp:
        for mode in modes:
            onnx_model = build_mode(base, model.module, infos, mode == "train")
            feeds = {n: t.numpy() for n, t in zip(input_names, model.inputs)}
            validation = validate.compare_with_reference(onnx_model, feeds, references[mode])
            extra = _train_dropout_entry(dropouts, settings) if mode == "train" else {}
            _write_export_dir(tmp / mode, model.name, mode, onnx_model, feeds, references[mode], infos, validation, extra)
            written[mode] = Path(out).absolute() / mode
    _assert_unchanged(model.module, before)
    return written


def build_mode(base: onnx.ModelProto, module: nn.Module, infos: list[BatchNormInfo], training: bool) -> onnx.ModelProto:
    onnx_model = copy.deepcopy(base)
    onnx_graph.rewrite_batchnorms(onnx_model, infos, training)
    onnx_graph.remove_dead_code(onnx_model)
    onnx_graph.strip_debug_info(onnx_model)
    return validate.check_onnx(onnx_model)


def _export_eval_copy(model: LoadedModel, input_names: list[str], dynamic_batch: bool,
                      output_names: list[str]) -> onnx.ModelProto:
    eval_copy = copy.deepcopy(model.module).eval()
    base = onnx_graph.torch_to_onnx(eval_copy, model.inputs, input_names, dynamic_batch)
    parameters = {name for name, _ in model.module.named_parameters()}
    onnx_graph.drop_zero_conv_bias(base, parameters)
    return onnx_graph.rename_outputs(base, output_names)


def _reference(model: LoadedModel, infos: list[BatchNormInfo], training: bool, dropout_identity: bool) -> ReferenceRun:
    try:
        return run_reference(model.module, model.inputs, infos, training, dropout_identity)
    except BndeployError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in model.inputs)
        raise BndeployError(f"model {model.name!r} rejects input shape {shapes}: {str(e).splitlines()[0]}") from None


def _check_settings(settings: ExportSettings) -> None:
    unknown = [m for m in settings.modes if m not in MODES]
    if unknown or not settings.modes:
        raise BndeployError(f"unknown export mode(s) {unknown}; use inference, train or both")
    if settings.train_dropout not in (None, *TRAIN_DROPOUT):
        raise BndeployError(f"unknown train_dropout {settings.train_dropout!r}; use {', '.join(TRAIN_DROPOUT)} or None")


def _check_inputs(inputs: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(inputs):
        if t.dtype != torch.float32:
            raise BndeployError(f"input {i} has dtype {t.dtype}; bndeploy exports float32 inputs")
        if t.numel() == 0:
            raise BndeployError(f"input {i} has shape {tuple(t.shape)} with no elements")


def _refused_modes(model: LoadedModel, settings: ExportSettings) -> dict[str, str]:
    """{mode: one-line reason} for the requested modes that cannot be exported as the settings stand."""
    dropouts = active_dropouts(model.module)
    if "train" not in settings.modes or not dropouts or settings.train_dropout is not None:
        return {}
    return {"train": (
        f"train mode not written: {model.name} has active dropout ({', '.join(dropouts)}), whose train-mode output "
        "is random and cannot be checked; pass --train-dropout identity (ExportSettings(train_dropout='identity')) "
        "to export dropout as identity in train mode, as test-time BatchNorm adaptation wants")}


def _train_dropout_entry(dropouts: list[str], settings: ExportSettings) -> dict:
    """export.json's record of how a train-mode export treats active dropout (nothing when there is none)."""
    if not dropouts:
        return {}
    return {"train_dropout": {"mode": settings.train_dropout, "modules": dropouts,
                              "note": "dropout runs as identity in train mode, in the ONNX graph and in the references"}}


def _input_names(module: nn.Module, count: int) -> list[str]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:count]]
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


def _snapshot(module: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    return module.training, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: nn.Module, before: tuple[bool, dict[str, torch.Tensor]]) -> None:
    training, state = before
    now = module.state_dict()
    changed = [k for k, v in state.items() if not torch.equal(v, now[k])]
    if module.training != training or changed:
        raise BndeployError(f"internal error: export changed the user's module ({changed or 'training flag'})")


def _write_export_dir(path: Path, name: str, mode: str, onnx_model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      reference: ReferenceRun, infos: list[BatchNormInfo], validation: dict, extra: dict) -> None:
    path.mkdir()
    onnx.save_model(onnx_model, path / ONNX_FILE)
    write_reference(path / REFERENCE_FILE, feeds, reference.outputs, reference.spec)
    manifest = manifest_header(EXPORT_KIND) | {
        "model": name,
        "mode": mode,
        "opset": onnx_graph.OPSET,
        "onnx": {"file": ONNX_FILE, "sha256": sha256_of(path / ONNX_FILE)},
        "reference": {"file": REFERENCE_FILE, "sha256": sha256_of(path / REFERENCE_FILE)},
        "inputs": [_value_entry(v) for v in onnx_model.graph.input],
        "outputs": [_output_entry(v, infos, reference) for v in onnx_model.graph.output],
        "batchnorms": [_batchnorm_entry(i, mode) for i in infos],
        "validation": validation,
        "versions": _versions(),
        **extra,
    }
    write_manifest(path / EXPORT_MANIFEST, manifest)


def _value_entry(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name}


def _output_entry(value: onnx.ValueInfoProto, infos: list[BatchNormInfo], reference: ReferenceRun) -> dict:
    entry = _value_entry(value) | {"role": "output"}
    for info in infos:
        for stat in ("running_mean", "running_var"):
            if value.name == info.updated_name(stat):
                entry |= {"role": stat, "batchnorm": info.label, "batch_count": reference.batch_counts[info.module]}
    return entry


def _batchnorm_entry(info: BatchNormInfo, mode: str) -> dict:
    entry = {"module": info.module, "node": info.label, "num_features": info.num_features, "epsilon": info.epsilon,
             "momentum_onnx": info.momentum_onnx, "momentum_torch": info.momentum_torch, "affine": info.affine,
             "training_mode": int(mode == "train")}
    if info.cumulative:
        entry["note"] = ("torch momentum=None (cumulative average): exported with this step's factor "
                         "1/(num_batches_tracked+1); valid for one update")
    return entry


def _versions() -> dict:
    import onnxruntime

    from bndeploy import __version__

    return {"bndeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
