"""Inputs for an artifact: validated against its manifest, read from a file, or generated from a seed."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.layout import INPUT, has_prefix, strip_prefix
from bndeploy.runtime.specs import TensorSpec, describe_all


def validate_inputs(inputs: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Return the inputs as C-contiguous arrays in the artifact's order, or raise one error listing every
    problem (missing/unexpected names, wrong dtype or shape, an empty batch) and what is expected."""
    problems = _name_problems(inputs, specs)
    for spec in specs:
        if spec.name in inputs:
            problems += _array_problems(spec, np.asarray(inputs[spec.name]))
    if problems:
        raise BndeployError(
            "inputs do not match the artifact: " + "; ".join(problems) + f". The artifact expects: {describe_all(specs)}"
        )
    # np.asarray, not np.ascontiguousarray: that one turns a rank-0 input (a scalar bound) into shape (1,)
    return {spec.name: np.asarray(inputs[spec.name], order="C") for spec in specs}


def _name_problems(inputs: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> list[str]:
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in inputs]
    unexpected = [n for n in inputs if n not in expected]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(repr(n) for n in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(repr(n) for n in unexpected))
    return problems


def _array_problems(spec: TensorSpec, array: np.ndarray) -> list[str]:
    problems = []
    if array.dtype != np.dtype(spec.dtype):
        problems.append(f"{spec.name!r} is {array.dtype}, expected {spec.dtype} (cast it with .astype('{spec.dtype}'))")
    if array.size == 0:
        problems.append(f"{spec.name!r} is empty (shape {list(array.shape)}); BatchNorm needs at least one sample")
    elif not _shape_matches(array.shape, spec.shape):
        problems.append(f"{spec.name!r} has shape {list(array.shape)}")
    return problems


def _shape_matches(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(not isinstance(e, int) or e == s for s, e in zip(shape, expected))


def load_inputs_file(path: str | Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Read inputs from .npz (keys = input names, or ``input/<name>`` as in an export's reference.npz)
    or .npy (only for a single-input artifact). Validation happens when the artifact runs."""
    path = Path(path)
    if not path.is_file():
        raise BndeployError(f"inputs file {path} not found")
    try:
        if path.suffix == ".npy":
            return _single_array(np.load(path, allow_pickle=False), path, specs)
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise BndeployError(f"cannot read inputs file {path}: {e}") from None
    if has_prefix(arrays, INPUT):
        return strip_prefix(arrays, INPUT)
    return arrays


def _single_array(array: np.ndarray, path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise BndeployError(
            f"{path} holds one array but the artifact takes {len(specs)} inputs ({describe_all(specs)}); use an .npz keyed by name"
        )
    return {specs[0].name: array}


def generate_inputs(specs: list[TensorSpec], seed: int) -> dict[str, np.ndarray]:
    """Standard-normal floats (uniform integers in [0, 10) for integer inputs), reproducible by seed."""
    rng = np.random.default_rng(seed)
    generated = {}
    for spec in specs:
        dynamic = [d for d in spec.shape if not isinstance(d, int)]
        if dynamic:
            raise BndeployError(f"input {spec.describe()} has dynamic dimensions; pass an inputs file instead of a seed")
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            generated[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            generated[spec.name] = rng.integers(0, 10, size=spec.shape).astype(dtype)
        else:
            raise BndeployError(f"cannot generate input {spec.describe()} from a seed; pass an inputs file")
    return generated


def cast_floats_to(inputs: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Cast floating inputs to the artifact's floating dtypes (the fp32 export references fed to an fp16
    artifact); anything else is left for validation to report."""
    wanted = {s.name: np.dtype(s.dtype) for s in specs}
    cast = dict(inputs)
    for name, array in inputs.items():
        target = wanted.get(name)
        if target is not None and np.issubdtype(array.dtype, np.floating) and np.issubdtype(target, np.floating):
            cast[name] = array.astype(target)
    return cast
