"""Reference values from PyTorch eager, and the ONNX-spec running statistics derived from them.

PyTorch updates ``running_var`` with the *unbiased* batch variance (times n/(n-1)); the ONNX spec with
the *population* variance. Both are legitimate, so bndeploy records both, by name: ``torch/<output>``
is what torch did, ``spec/<output>`` what an ONNX-faithful runtime must produce, computed in float64
from the batch statistics torch saw.

The same model also runs once in float64 on the same inputs: how far torch's own fp32 result is from it
measures how much fp32 rounding moves this model on this data, which bounds export validation
(export/validate.py).

Train mode with ``dropout_identity``: every dropout module runs as in eval mode (identity), as the
exported graph does, so the references are deterministic (``--train-dropout identity``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bndeploy.errors import BndeployError
from bndeploy.export.onnx_graph import BatchNormInfo


@dataclass
class ReferenceRun:
    outputs: dict[str, np.ndarray]                                 # torch/<name>
    spec: dict[str, np.ndarray] = field(default_factory=dict)      # spec/<name>, running statistics only
    batch_counts: dict[str, int] = field(default_factory=dict)     # elements per channel, per BN module
    float64: dict[str, np.ndarray] | None = None  # the same run in float64 (outputs and torch's running stats)
    float64_problem: str = ""                     # why there is no float64 run (the model does not run in it)

    @property
    def model_output_names(self) -> list[str]:
        return [name for name in self.outputs if name not in self.spec]


def model_outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        return list(result)
    raise BndeployError(f"the model returns {type(result).__name__}; bndeploy exports models that return "
                        "a tensor or a tuple of tensors")


def output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def active_dropouts(model: nn.Module) -> list[str]:
    """Names of the dropout modules that drop something in train mode (p > 0)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def prepared_copy(model: nn.Module, training: bool, dropout_identity: bool = False) -> nn.Module:
    """A copy of ``model`` in the requested mode (dropout as identity when asked); the original is untouched."""
    work = copy.deepcopy(model).train(training)
    if dropout_identity:
        for module in work.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
    return work


def run_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], infos: list[BatchNormInfo],
                  training: bool, dropout_identity: bool = False) -> ReferenceRun:
    """Run a copy of ``model`` in the requested mode; the caller's module is never touched."""
    work = prepared_copy(model, training, dropout_identity)
    modules = dict(work.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[i.module].register_forward_pre_hook(_capture(i, captured, training)) for i in infos]
    try:
        with torch.no_grad():
            outputs = model_outputs(work(*inputs))
    finally:
        for h in hooks:
            h.remove()
    run = ReferenceRun({n: t.numpy() for n, t in zip(output_names(len(outputs)), outputs)})
    if training:
        _add_running_stats(run, model, modules, infos, captured)
    run.float64, run.float64_problem = _float64_run(model, inputs, infos, training, dropout_identity)
    return run


def _float64_run(model: nn.Module, inputs: tuple[torch.Tensor, ...], infos: list[BatchNormInfo], training: bool,
                 dropout_identity: bool) -> tuple[dict[str, np.ndarray] | None, str]:
    """The outputs (and torch's running statistics) of the same run in float64, named as in ReferenceRun."""
    work = prepared_copy(model, training, dropout_identity).double()
    try:
        with torch.no_grad():
            outputs = model_outputs(work(*(t.double() for t in inputs)))
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. a float32 tensor made inside forward
        return None, f"the model does not run in float64 ({type(e).__name__}: {str(e).splitlines()[0]})"
    values = {name: t.numpy() for name, t in zip(output_names(len(outputs)), outputs)}
    modules = dict(work.named_modules())
    for info in infos if training else []:
        for stat in ("running_mean", "running_var"):
            values[info.updated_name(stat)] = getattr(modules[info.module], stat).numpy()
    return values, ""


def _capture(info: BatchNormInfo, captured: dict, training: bool):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        per_channel = x.numel() // x.shape[1] if x.dim() > 1 else 0
        if training and per_channel <= 1:
            raise BndeployError(
                f"train-mode export: BatchNorm {info.label!r} sees {per_channel} value(s) per channel for input "
                f"shape {tuple(x.shape)}; batch statistics need N*spatial > 1 (torch refuses it, and ONNX "
                "would divide by sqrt(0 + eps)); use a larger batch or spatial size")
        captured[info.module] = x.detach().to(torch.float64)

    return hook


def _add_running_stats(run: ReferenceRun, original: nn.Module, updated: dict[str, nn.Module],
                       infos: list[BatchNormInfo], captured: dict[str, torch.Tensor]) -> None:
    before = dict(original.named_modules())
    for info in infos:
        x = captured[info.module]
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        kept = np.float64(info.momentum_onnx)
        batch_mean = x.mean(dims).numpy()
        batch_var = x.var(dims, unbiased=False).numpy()
        old_mean = before[info.module].running_mean.double().numpy()
        old_var = before[info.module].running_var.double().numpy()
        mean_name, var_name = info.updated_name("running_mean"), info.updated_name("running_var")
        run.outputs[mean_name] = updated[info.module].running_mean.numpy().copy()
        run.outputs[var_name] = updated[info.module].running_var.numpy().copy()
        run.spec[mean_name] = (old_mean * kept + batch_mean * (1 - kept)).astype(np.float32)
        run.spec[var_name] = (old_var * kept + batch_var * (1 - kept)).astype(np.float32)
        run.batch_counts[info.module] = n
