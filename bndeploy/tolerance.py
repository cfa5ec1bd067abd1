"""Tolerances: when is a value close enough to a reference value? (shared by every stage, with compare.py)

An element passes when ``|actual - expected| <= atol + rtol * |expected|`` (numpy.isclose's rule,
asymmetric: the reference scales the relative part). Defaults depend on the artifact's dtype and mode;
each is a first-class object that a caller can override for all outputs or for one output by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from bndeploy.errors import BndeployError


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    why: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for label, value in (("atol", self.atol), ("rtol", self.rtol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BndeployError(f"tolerance {label} must be a finite number >= 0, got {value!r}")

    def __str__(self) -> str:
        return f"{self.atol:.0e}/{self.rtol:.0e}"

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


# Why these numbers (u = unit roundoff: fp32 6.0e-8, fp16 4.9e-4):
FP32_INFERENCE = Tolerance(
    atol=1e-5,
    rtol=1e-4,
    why="fp32 inference: the artifact folds BN into the conv (one extra rounding per weight) and sums "
    "each conv output over K = C_in*kh*kw products in a different order than PyTorch/ORT; the typical "
    "reordering error is about sqrt(K)*u of the magnitude summed (1.4e-6 for K=576), so rtol 1e-4 keeps "
    "a ~70x margin; atol 1e-5 covers outputs near zero where cancellation makes relative error meaningless.",
)
FP32_TRAIN = Tolerance(
    atol=1e-4,
    rtol=1e-4,
    why="fp32 train: y is normalised by batch statistics that TVM reduces over n = N*H*W values serially "
    "(random-walk error about sqrt(n)*u, 2e-5 for n=1e5) while PyTorch/ORT use pairwise or blocked sums; "
    "y is O(1) after normalisation, so atol 1e-4 gives a ~5x margin; rtol 1e-4 covers the running "
    "statistics, which scale with the data.",
)
FP16 = Tolerance(
    atol=1e-2,
    rtol=1e-2,
    why="fp16 (either mode) against fp32 references: rounding the input alone costs u = 4.9e-4 relative, "
    "and accumulating K products or n batch values in fp16 grows that by about sqrt(K) (24x for K=576: "
    "1.2e-2 at worst); 1e-2 is the usual fp16 bar and still catches a wrong channel or formula.",
)


def default_tolerance(dtype: str, mode: str) -> Tolerance:
    """The documented default for an artifact of this dtype ("float32", "float16") and mode."""
    if dtype == "float16":
        return FP16
    if dtype == "float32":
        return FP32_TRAIN if mode == "train" else FP32_INFERENCE
    raise BndeployError(f"no default tolerance for dtype {dtype!r}; pass tolerances explicitly")


@dataclass(frozen=True)
class Tolerances:
    """One default tolerance plus per-output overrides (by ONNX output name)."""

    default: Tolerance
    per_output: Mapping[str, Tolerance] = field(default_factory=dict)

    def for_output(self, name: str) -> Tolerance:
        return self.per_output.get(name, self.default)

    def check_names(self, output_names: list[str]) -> None:
        unknown = sorted(set(self.per_output) - set(output_names))
        if unknown:
            raise BndeployError(
                f"tolerance given for unknown output(s) {', '.join(unknown)}; "
                f"the artifact's outputs are: {', '.join(output_names)}"
            )


ToleranceSpec = Tolerances | Tolerance | Mapping[str, "Tolerance | tuple[float, float]"] | None


def resolve_tolerances(spec: ToleranceSpec, dtype: str, mode: str, output_names: list[str]) -> Tolerances:
    """Turn what a caller passed (nothing, one Tolerance for all, or {output: Tolerance}) into Tolerances."""
    if isinstance(spec, Tolerances):
        result = spec
    elif isinstance(spec, Tolerance):
        result = Tolerances(default=spec)
    else:
        overrides = {name: _as_tolerance(value) for name, value in (spec or {}).items()}
        result = Tolerances(default=default_tolerance(dtype, mode), per_output=overrides)
    result.check_names(output_names)
    return result


def _as_tolerance(value: "Tolerance | tuple[float, float]") -> Tolerance:
    if isinstance(value, Tolerance):
        return value
    atol, rtol = value
    return Tolerance(atol=float(atol), rtol=float(rtol))


def parse_tolerance_option(text: str) -> tuple[str, Tolerance]:
    """Parse the CLI form ``NAME=ATOL,RTOL`` (the name may itself contain '=' only before the last one)."""
    name, sep, values = text.rpartition("=")
    parts = values.split(",")
    if not sep or not name or len(parts) != 2:
        raise BndeployError(f"--tol expects NAME=ATOL,RTOL (e.g. y=1e-4,1e-3), got {text!r}")
    try:
        return name, Tolerance(atol=float(parts[0]), rtol=float(parts[1]))
    except ValueError:
        raise BndeployError(f"--tol {text!r}: ATOL and RTOL must be numbers") from None
