"""Resolve what the user asked to export: a reference model name, ``file.py:factory``, or a saved model."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bndeploy.errors import BndeployError
from bndeploy.export.models import REFERENCE_MODELS, seeded_normal


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]


def parse_shape(text: str) -> tuple[int, ...]:
    """'5,3,2,2' or '5x3x2x2' -> (5, 3, 2, 2)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise BndeployError(f"input shape {text!r} is not a list of integers like 5,3,2,2") from None
    if not shape or any(d < 0 for d in shape):
        raise BndeployError(f"input shape {text!r} must be non-empty with non-negative sizes")
    return shape


TORCHVISION_PREFIX = "torchvision:"


def load_model(spec: str, input_shapes: list[tuple[int, ...]] | None = None, weights: str | None = None,
               seed: int = 0) -> LoadedModel:
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX):], input_shapes, weights, seed)
    if spec in REFERENCE_MODELS:
        ref = REFERENCE_MODELS[spec]
        if weights:
            raise BndeployError("--weights applies to your own model (file.py:factory), not a reference model")
        shapes = input_shapes or [ref.input_shape]
        if len(shapes) != 1:
            raise BndeployError(f"reference model {spec!r} takes one input, got {len(shapes)} shapes")
        return LoadedModel(spec, ref.factory(), (ref.example_input(shapes[0], seed),))
    module, name = _load_user_module(spec, weights)
    if not input_shapes:
        raise BndeployError(f"{spec}: pass --input-shape for your own model (e.g. --input-shape 1,3,224,224)")
    inputs = tuple(seeded_normal(s, seed + i) for i, s in enumerate(input_shapes))
    return LoadedModel(name, module, inputs)


def _torchvision_model(name: str, input_shapes, weights: str | None, seed: int) -> LoadedModel:
    """torchvision.models.<name> with random weights and calibrated BatchNorm statistics (export/zoo.py), or
    with --weights (a state_dict saved from the same definition); input 1x3x224x224 unless given."""
    from bndeploy.export.zoo import IMAGE_SHAPE, zoo_model

    module = zoo_model(name, seed)
    if weights:
        _load_state_dict(module, Path(weights))
        module.eval()
    shapes = input_shapes or [(1, *IMAGE_SHAPE)]
    if len(shapes) != 1:
        raise BndeployError(f"torchvision:{name} takes one input, got {len(shapes)} shapes")
    return LoadedModel(name, module, (seeded_normal(shapes[0], seed),))


def _load_user_module(spec: str, weights: str | None) -> tuple[nn.Module, str]:
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, factory_name = spec.rsplit(":", 1)
        module = _call_factory(Path(path), factory_name)
        if weights:
            _load_state_dict(module, Path(weights))
        return module, Path(path).stem
    path = Path(spec)
    if path.suffix in (".pt", ".pth") and path.is_file():
        if weights:
            raise BndeployError("--weights goes with file.py:factory; a full-model file already has its weights")
        return _load_full_model(path), path.stem
    known = ", ".join(REFERENCE_MODELS)
    raise BndeployError(f"unknown model {spec!r}: give a reference model ({known}), path/to/file.py:factory, "
                        "or a saved full-model .pt/.pth file")


def _call_factory(path: Path, factory_name: str) -> nn.Module:
    if not path.is_file():
        raise BndeployError(f"model file {path} not found")
    module_name = f"bndeploy_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user
    try:
        spec.loader.exec_module(user)
    except Exception as e:
        raise BndeployError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    factory = getattr(user, factory_name, None)
    if not callable(factory):
        raise BndeployError(f"{path} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise BndeployError(f"{path}:{factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_state_dict(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BndeployError(f"weights file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise BndeployError(f"{path} does not fit the model: {str(e).splitlines()[0]}") from None


def _load_full_model(path: Path) -> nn.Module:
    # A full-model file is a pickle: loading it runs code from the file, as torch.load(weights_only=False) says.
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise BndeployError(f"{path} holds a {type(model).__name__}, not a full nn.Module; for a state_dict use "
                            "file.py:factory --weights FILE")
    return model
