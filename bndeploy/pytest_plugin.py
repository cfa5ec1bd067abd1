"""The pytest plugin's entry point (``pytest11: bndeploy`` in pyproject.toml): its options, nothing more.

pytest loads this module in every run of an environment where bndeploy is installed, so it imports only
pytest and bndeploy's errors. Given ``--bndeploy PATH``, it hands the session to runtime/pytest_items.py
(artifacts as test items); without it, it does nothing.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bndeploy", "bndeploy: compiled artifacts as test items (one per artifact and reference)")
    group.addoption("--bndeploy", action="append", default=[], metavar="PATH",
                    help="an artifact directory, or a folder searched for them (repeatable); with no test paths "
                         "given, only the artifacts are collected")
    group.addoption("--bndeploy-against", metavar="REFS",
                    help="comma-separated references, as `bndeploy check --against` (default: torch,onnxruntime)")
    group.addoption("--bndeploy-atol", type=float, metavar="ATOL", help="absolute tolerance for every output")
    group.addoption("--bndeploy-rtol", type=float, metavar="RTOL", help="relative tolerance for every output")
    group.addoption("--bndeploy-tol", action="append", default=[], metavar="NAME=ATOL,RTOL",
                    help="tolerance for one output (repeatable)")
    group.addoption("--bndeploy-check-stat", default="max", metavar="STAT",
                    help="error statistic that gates pass/fail: max, mean, median or quantile, as "
                         "`bndeploy check --check-stat` (default: max)")
    group.addoption("--bndeploy-error-quantile", type=float, metavar="Q",
                    help="the quantile reported, and gated on with --bndeploy-check-stat quantile (default: 0.99)")
    group.addoption("--bndeploy-locate", action="store_true",
                    help="on a failure, also find the first ONNX node whose output leaves tolerance (check --locate)")
    group.addoption("--bndeploy-html", metavar="DIR",
                    help="write each artifact's HTML report to DIR (for a CI job to upload)")


def pytest_configure(config: pytest.Config) -> None:
    roots = config.getoption("bndeploy")
    if not roots:
        return
    if int(pytest.__version__.split(".")[0]) < 8:
        raise pytest.UsageError(f"--bndeploy needs pytest 8 or newer (this is pytest {pytest.__version__})")
    from bndeploy.runtime.pytest_items import start_session

    start_session(config, roots)
