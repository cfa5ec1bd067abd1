"""Optional dependencies: which pip extra brings what each stage needs beyond the runtime.

The core install (numpy, apache-tvm, apache-tvm-ffi) is what a board needs to run and check artifacts.
The other stages need more, and name the extra to install when something is missing:

    bndeploy[export]   torch, onnx, onnxscript, onnxruntime   (export and its validation against ORT)
    bndeploy[compile]  onnx                                    (compile: read and check the ONNX model)
    bndeploy[check]    onnxruntime                             (check's "onnxruntime" reference)
    bndeploy[images]   Pillow                                  (check --inputs-dir with images)
    bndeploy[tune]     onnx, psutil, cloudpickle, xgboost       (tune: MetaSchedule and its cost model)
    bndeploy[full]     all of the above, rich, tornado          (a workstation: pipeline, bench, tracker)
    bndeploy[zoo]      export's, torchvision                    (torchvision's networks: bench --suite zoo)

This table names import names; pyproject.toml's [project.optional-dependencies] names the same
distributions with their versions (tests/test_install.py keeps the two equal).
"""

from __future__ import annotations

import importlib.util

from bndeploy.errors import BndeployError

EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "onnx", "onnxscript", "onnxruntime"),
    "compile": ("onnx",),
    "check": ("onnxruntime",),
    "images": ("PIL",),
}
EXTRAS["tune"] = (*EXTRAS["compile"], "psutil", "cloudpickle", "xgboost")
EXTRAS["full"] = tuple(dict.fromkeys([*EXTRAS["export"], *EXTRAS["compile"], *EXTRAS["check"], *EXTRAS["tune"],
                                      *EXTRAS["images"], "rich", "tornado"]))
EXTRAS["zoo"] = (*EXTRAS["export"], "torchvision")
# Distributions whose import name differs (xgboost-cpu: xgboost without the CUDA/NCCL libraries, 400+ MB).
IMPORT_NAMES = {"xgboost-cpu": "xgboost", "pillow": "PIL"}

# torch is installed first, by hand, to choose its build: an unpinned torch is a multi-GB CUDA download.
TORCH_HINT = " (install torch first to choose its build, e.g. pip install torch==2.13.0 for the CPU one)"


class MissingDependencyError(BndeployError):
    """A stage's optional dependency is not installed; the message names the pip extra that brings it."""


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if not _importable(name)]


def require(extra: str, what: str) -> None:
    """Raise MissingDependencyError when ``what`` (e.g. "bndeploy export") lacks a module of ``extra``."""
    missing = missing_modules(extra)
    if missing:
        raise MissingDependencyError(missing_message(extra, what, missing))


def missing_message(extra: str, what: str, missing: list[str]) -> str:
    hint = TORCH_HINT if "torch" in missing else ""
    return (f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed here: "
            f"pip install 'bndeploy[{extra}]'{hint}")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a broken half-installed package
        return False
