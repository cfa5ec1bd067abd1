"""Task-level agreement for classifiers: over every row of every sample of a 2-D logits output, how often
the artifact's top-1 class is the reference's, and its top-5 set the reference's top-5 set.

Counts only (never the logits), so any number of samples takes constant memory. ``--top-k-agreement F``
gates both fractions at F.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.runtime.specs import TensorSpec

TOP_K = 5
# Outputs that are batch statistics, not predictions.
STATISTIC_ROLES = ("running_mean", "running_var")


@dataclass
class TopKAgreement:
    output: str
    reference: str
    threshold: float
    rows: int = 0
    top1: int = 0  # rows whose top-1 class agrees
    topk: int = 0  # rows whose top-k sets agree
    k: int = TOP_K
    classes: int = 0

    def add(self, actual: np.ndarray, expected: np.ndarray) -> None:
        a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        self.classes = a.shape[1]
        self.rows += a.shape[0]
        self.top1 += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
        k = min(self.k, self.classes)
        a_sets, b_sets = np.sort(_top(a, k), axis=1), np.sort(_top(b, k), axis=1)
        self.topk += int(np.sum(np.all(a_sets == b_sets, axis=1)))

    @property
    def top1_fraction(self) -> float:
        return self.top1 / self.rows if self.rows else 0.0

    @property
    def topk_fraction(self) -> float:
        return self.topk / self.rows if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return self.rows > 0 and self.top1_fraction >= self.threshold and self.topk_fraction >= self.threshold

    def line(self) -> str:
        k = min(self.k, self.classes) if self.classes else self.k
        return (f"top-k agreement {self.output} vs {self.reference} over {self.rows} rows: "
                f"top-1 {self.top1}/{self.rows} ({self.top1_fraction:.2%}), top-{k} {self.topk}/{self.rows} "
                f"({self.topk_fraction:.2%}); gate {self.threshold:g}: {'PASS' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        return {"output": self.output, "reference": self.reference, "threshold": self.threshold, "rows": self.rows,
                "top1": self.top1, "top1_fraction": self.top1_fraction, "k": min(self.k, self.classes or self.k),
                "topk": self.topk, "topk_fraction": self.topk_fraction, "passed": self.passed}


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def classifier_outputs(outputs: list[TensorSpec]) -> list[TensorSpec]:
    """Outputs that are 2-D float logits (batch, classes), batch statistics excluded."""
    return [spec for spec in outputs if len(spec.shape) == 2 and spec.role not in STATISTIC_ROLES
            and np.issubdtype(np.dtype(spec.dtype), np.floating) and spec.shape[1] != 1]


def check_threshold(threshold: float, outputs: list[TensorSpec]) -> list[TensorSpec]:
    """The outputs the gate applies to, or an error saying why it cannot apply."""
    if not 0.0 < threshold <= 1.0:
        raise BndeployError(f"--top-k-agreement {threshold:g}: give a fraction in (0, 1], e.g. 0.99")
    found = classifier_outputs(outputs)
    if not found:
        described = "; ".join(s.describe() for s in outputs)
        raise BndeployError(f"--top-k-agreement needs a classifier output (2-D logits: batch x classes); "
                            f"this artifact's outputs are {described}")
    return found
