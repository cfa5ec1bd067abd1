"""The calling thread runs its share of a CPU artifact's parallel kernels on the CPU TVM's pool leaves it
(runtime/caller_cpu.py), for the duration of the call only."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import compile_cases as cases
from bndeploy.compile import CompileSettings, compile_model
from bndeploy.runtime import caller_cpu as module
from bndeploy.runtime import load_artifact
from bndeploy.runtime.caller_cpu import caller_cpu

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux thread affinity")


@pytest.fixture
def four_cpus(monkeypatch):
    """A 4-CPU machine whose CPUs report no frequency (a VM), the pool at 4 threads, no TVM settings."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(module, "_max_frequency", lambda cpu: 0)
    for name in ("TVM_BIND_THREADS", "TVM_EXCLUDE_WORKER0"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TVM_NUM_THREADS", "4")
    return monkeypatch


def test_the_caller_takes_the_first_cpu_in_tvms_order(four_cpus):
    assert caller_cpu() == 0
    four_cpus.setattr(module, "_max_frequency", lambda cpu: 2_000_000 if cpu in (2, 3) else 1_000_000)
    assert caller_cpu() == 2  # big cores first, then by number


@pytest.mark.parametrize("setting", [{"TVM_NUM_THREADS": "1"}, {"TVM_NUM_THREADS": "8"},
                                     {"TVM_BIND_THREADS": "0"}, {"TVM_EXCLUDE_WORKER0": "0"}])
def test_no_cpu_where_the_pool_pins_no_worker_or_runs_no_task_on_the_caller(four_cpus, setting):
    for name, value in setting.items():
        four_cpus.setenv(name, value)
    assert caller_cpu() is None


def test_no_cpu_outside_the_process_affinity(four_cpus):
    four_cpus.setattr(os, "sched_getaffinity", lambda pid: {2, 3})
    assert caller_cpu() is None


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caller_cpu")
    onnx.save(cases.conv_bn_case("c", activation="relu").model, tmp / "model.onnx")
    (directory,) = compile_model(tmp / "model.onnx", ["cpu"], tmp / "artifact", CompileSettings())
    loaded = load_artifact(directory)
    if loaded._caller_cpu is None:
        pytest.skip("the pool pins no worker here (one CPU or one thread)")
    loaded.run({"x": np.zeros((2, 4, 7, 6), np.float32)})  # TVM's pool starts, resetting the caller's affinity
    return loaded


def _affinity_during_run(artifact) -> list[set[int]]:
    seen = []

    def record(func, name, before_run, result, *args):
        if before_run:
            seen.append(os.sched_getaffinity(0))
        return 0

    x = np.zeros((2, 4, 7, 6), np.float32)
    with artifact.instrumented(record):
        artifact.run({"x": x})
    return seen


def test_a_free_thread_found_elsewhere_runs_on_the_callers_cpu_during_the_call_only(artifact, monkeypatch):
    everything = os.sched_getaffinity(0)
    other = min(everything - {artifact._caller_cpu})
    monkeypatch.setattr(module, "_current_cpu", lambda: other)  # where sched_getcpu would find it
    during = _affinity_during_run(artifact)
    assert during and all(cpus == {artifact._caller_cpu} for cpus in during)
    assert os.sched_getaffinity(0) == everything


def test_a_thread_already_on_the_callers_cpu_is_not_touched(artifact, monkeypatch):
    """Setting the affinity costs about 6 us a call: where the thread runs already, nothing is set."""
    everything = os.sched_getaffinity(0)
    monkeypatch.setattr(module, "_current_cpu", lambda: artifact._caller_cpu)
    assert all(cpus == everything for cpus in _affinity_during_run(artifact))


def test_a_thread_its_owner_pinned_stays_pinned(artifact):
    everything = os.sched_getaffinity(0)
    other = min(everything - {artifact._caller_cpu})
    os.sched_setaffinity(0, {other})
    try:
        assert all(cpus == {other} for cpus in _affinity_during_run(artifact))
        assert os.sched_getaffinity(0) == {other}
    finally:
        os.sched_setaffinity(0, everything)
