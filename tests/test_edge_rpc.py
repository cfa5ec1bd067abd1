"""Artifacts checked on a remote device through TVM RPC (runtime/remote/, `bndeploy device`).

(a) loopback x86: a tracker and an RPC server on 127.0.0.1 run host-CPU artifacts of conv->BN
    (inference and train mode); outputs match the export's references. Cross-compiled libraries
    have the target's ELF machine.
(b) failures: a killed server, a device that accepts but never answers, an unknown key: each a
    BndeployError (CLI exit 2) within the timeout.
(c) slow: an emulated aarch64 device (qemu-user, scripts/emulated-aarch64.sh) runs a Jetson Orin
    CPU (cortex-a78ae) artifact through the tracker.

Every server is a child process on 127.0.0.1, stopped by the test that started it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bndeploy.runtime.device_cli  # noqa: F401  (see below)
from bndeploy.cli import main as cli
from bndeploy.errors import BndeployError
from bndeploy.runtime import compare, default_tolerance
from bndeploy.runtime.remote import (
    RpcEndpoint,
    open_remote_artifact,
    registered_keys,
    remote_runner,
    run_remote,
    tracker_summary,
)

REPO = Path(__file__).resolve().parents[1]
EMULATOR = REPO / "scripts" / "emulated-aarch64.sh"
LOOPBACK = "127.0.0.1"
HOST_KEY = "x86-loopback"
START_TIMEOUT = 60.0  # a server/tracker process imports TVM before it listens
EMULATED_START_TIMEOUT = 240.0  # the same under qemu-user, on a shared 2-core machine
STOP_TIMEOUT = 10.0
RUN_TIMEOUT = 60.0
FAILURE_TIMEOUT = 4.0  # the timeout given to runs that must fail
FAILURE_SLACK = 2.0  # what a failing run may take beyond its timeout (thread hand-over, error text)

ELF_MACHINE = {"cortex-a78ae": 183, "armv7": 40}  # System V ABI e_machine: EM_AARCH64, EM_ARM


# --------------------------------------------------------------------------------------------------
# Processes on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Service:
    """A `bndeploy device ...` child process; started when it printed its "listening" line."""

    def __init__(self, command: list[str], name: str, start_timeout: float = START_TIMEOUT) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, stdin=subprocess.DEVNULL)
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(start_timeout):
            self.stop()
            raise AssertionError(f"{name} did not start within {start_timeout:g} s:\n{self.log()}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "listening on" in line:
                self._listening.set()
        self._listening.set()  # exited: wait() returns, the caller sees the log

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


def bndeploy_device(*args: str) -> list[str]:
    return [sys.executable, "-m", "bndeploy.cli", "device", *args]


@contextlib.contextmanager
def running(command: list[str], name: str, start_timeout: float = START_TIMEOUT):
    service = Service(command, name, start_timeout)
    try:
        yield service
    finally:
        service.stop()


def start_tracker() -> tuple[Service, str]:
    port = free_port()
    return Service(bndeploy_device("tracker", "--host", LOOPBACK, "--port", str(port)), "tracker"), f"{LOOPBACK}:{port}"


def server_command(tracker: str | None = None, key: str = "", port: int | None = None) -> list[str]:
    args = ["serve", "--host", LOOPBACK, "--port", str(port or free_port())]
    if tracker:
        args += ["--tracker", tracker, "--key", key]
    return bndeploy_device(*args)


def wait_registered(tracker: str, key: str, timeout: float = START_TIMEOUT) -> None:
    host, port = tracker.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registered_keys(tracker_summary(host, int(port))).get(key):
            return
        time.sleep(0.2)
    raise AssertionError(f"no server registered with key {key!r} at {tracker} within {timeout:g} s")


@pytest.fixture(scope="module")
def tracker():
    service, address = start_tracker()
    try:
        yield address
    finally:
        service.stop()


@pytest.fixture(scope="module")
def host_device(tracker):
    """An RPC server for this machine's CPU, registered with the module's tracker as HOST_KEY."""
    with running(server_command(tracker, HOST_KEY), "host RPC server") as server:
        wait_registered(tracker, HOST_KEY)
        yield server


# --------------------------------------------------------------------------------------------------
# Artifacts: conv->BN exported in both modes, compiled for the host CPU and two ARM CPUs


@pytest.fixture(scope="module")
def artifacts(exported, tmp_path_factory):
    """{(mode, target): artifact dir}: host CPU and Jetson Orin CPU in both modes, armv7 in inference."""
    from bndeploy.compile import compile_model

    out = tmp_path_factory.mktemp("edge-artifacts")
    built = {}
    for mode, export_dir in exported("conv-bn").items():
        targets = ["cpu", "cortex-a78ae", "armv7"] if mode == "inference" else ["cpu", "cortex-a78ae"]
        targets = [t for t in targets if t == "cpu" or shutil.which(cross_compiler(t))]
        for target, directory in zip(targets, compile_model(export_dir / "model.onnx", targets, out / mode)):
            built[mode, target] = directory
    return built


def cross_compiler(target: str) -> str:
    return {"cortex-a78ae": "aarch64-linux-gnu-gcc", "armv7": "arm-linux-gnueabihf-gcc"}[target]


def cross_artifact(artifacts, target: str, mode: str = "inference") -> Path:
    if (mode, target) not in artifacts:
        pytest.skip(f"{cross_compiler(target)} is not installed (.ci/install-edge installs it)")
    return artifacts[mode, target]


def references(artifact_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) from the export's reference.npz, as ARCHITECTURE.md keys them:
    torch/ for every output except running_var, which follows the ONNX spec (spec/)."""
    artifact = open_remote_artifact(artifact_dir, RpcEndpoint.server(f"{LOOPBACK}:1"))
    export_manifest = Path(artifact.manifest["source"]["export_manifest"])
    with np.load(export_manifest.parent / "reference.npz") as data:
        arrays = {key: data[key] for key in data.files}
    inputs = {key[len("input/"):]: value for key, value in arrays.items() if key.startswith("input/")}
    expected = {}
    for spec in artifact.outputs:
        prefix = "spec" if spec.role == "running_var" else "torch"
        expected[spec.name] = arrays[f"{prefix}/{spec.name}"]
    return inputs, expected


def assert_matches_references(artifact_dir: Path, outputs: dict[str, np.ndarray]) -> None:
    _, expected = references(artifact_dir)
    artifact = open_remote_artifact(artifact_dir, RpcEndpoint.server(f"{LOOPBACK}:1"))
    assert sorted(outputs) == sorted(expected)
    tolerance = default_tolerance(artifact.dtype, artifact.mode)
    for name, value in outputs.items():
        result = compare(value, expected[name], tolerance, name, "torch", name)
        assert result.passed, f"{artifact_dir} over RPC, output {name}: {result.details()}"


# --------------------------------------------------------------------------------------------------
# (a) loopback x86


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_host_artifact_runs_through_tracker_and_matches_references(artifacts, tracker, host_device, mode):
    artifact_dir = artifacts[mode, "cpu"]
    inputs, _ = references(artifact_dir)
    outputs = run_remote(artifact_dir, inputs, RpcEndpoint.tracker(tracker, HOST_KEY, timeout=RUN_TIMEOUT))
    if mode == "train":
        assert len(outputs) == 3, "train mode returns y and both running statistics"
    assert_matches_references(artifact_dir, outputs)


def test_runs_one_after_another_in_one_process(artifacts, tracker, host_device):
    """A server serves one session at a time: each run must close its session, or the next waits."""
    artifact_dir = artifacts["inference", "cpu"]
    inputs, _ = references(artifact_dir)
    runner = remote_runner(RpcEndpoint.tracker(tracker, HOST_KEY, timeout=20))
    first, second = runner(artifact_dir, inputs), runner(artifact_dir, inputs)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_direct_server_without_tracker(artifacts):
    artifact_dir = artifacts["train", "cpu"]
    inputs, _ = references(artifact_dir)
    port = free_port()
    with running(server_command(port=port), "direct RPC server"):
        outputs = run_remote(artifact_dir, inputs, RpcEndpoint.server(f"{LOOPBACK}:{port}", timeout=RUN_TIMEOUT))
    assert_matches_references(artifact_dir, outputs)


def check_remotely(artifact_dir: Path, endpoint: RpcEndpoint):
    """`bndeploy check --rpc` in Python: the artifact runs on the device, references are computed here."""
    from bndeploy.runtime import check

    report = check(artifact_dir, against=("torch", "onnxruntime"), remote=endpoint)
    assert report.passed, report.summary()
    assert {c.reference for c in report.comparisons} == {"torch", "onnxruntime"}
    assert endpoint.describe() in report.device
    return report


def test_check_compares_a_remote_artifact_with_both_references(artifacts, tracker, host_device):
    check_remotely(artifacts["train", "cpu"], RpcEndpoint.tracker(tracker, HOST_KEY, timeout=RUN_TIMEOUT))


@pytest.mark.parametrize("target", sorted(ELF_MACHINE))
def test_cross_compiled_library_is_built_for_the_target_cpu(artifacts, target):
    library = cross_artifact(artifacts, target) / "model.so"
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE[target]


def test_artifact_changed_after_compile_is_refused_before_connecting(artifacts, tmp_path):
    damaged = Path(shutil.copytree(artifacts["inference", "cpu"], tmp_path / "artifact"))
    with open(damaged / "model.so", "ab") as f:
        f.write(b"\0")
    inputs, _ = references(artifacts["inference", "cpu"])
    # Nothing listens on port 1: a connection attempt would fail differently.
    with pytest.raises(BndeployError, match="changed since it was compiled"):
        run_remote(damaged, inputs, RpcEndpoint.server(f"{LOOPBACK}:1", timeout=FAILURE_TIMEOUT))


def test_foreign_library_on_the_host_device_names_the_target(artifacts, tracker, host_device):
    artifact_dir = cross_artifact(artifacts, "cortex-a78ae")
    inputs, _ = references(artifact_dir)
    with pytest.raises(BndeployError, match="could not load .*cortex-a78ae.*aarch64"):
        run_remote(artifact_dir, inputs, RpcEndpoint.tracker(tracker, HOST_KEY, timeout=RUN_TIMEOUT))


# --------------------------------------------------------------------------------------------------
# (b) dead devices: a clear error within the timeout, never a hang


def assert_fails_in_time(artifact_dir: Path, endpoint: RpcEndpoint, match: str) -> BndeployError:
    inputs, _ = references(artifact_dir)
    started = time.monotonic()
    with pytest.raises(BndeployError, match=match) as failure:
        run_remote(artifact_dir, inputs, endpoint)
    elapsed = time.monotonic() - started
    assert elapsed < endpoint.timeout + FAILURE_SLACK, f"took {elapsed:.1f} s with a {endpoint.timeout:g} s timeout"
    return failure.value


def test_killed_direct_server_gives_connection_refused(artifacts):
    artifact_dir = artifacts["inference", "cpu"]
    inputs, _ = references(artifact_dir)
    port = free_port()
    endpoint = RpcEndpoint.server(f"{LOOPBACK}:{port}", timeout=FAILURE_TIMEOUT)
    with running(server_command(port=port), "doomed direct server") as server:
        run_remote(artifact_dir, inputs, RpcEndpoint.server(f"{LOOPBACK}:{port}", timeout=RUN_TIMEOUT))
        server.kill()
    assert_fails_in_time(artifact_dir, endpoint, "connection refused.*bndeploy device serve")


def test_killed_server_behind_tracker_times_out_with_the_key_named(artifacts, tracker):
    artifact_dir = artifacts["inference", "cpu"]
    inputs, _ = references(artifact_dir)
    with running(server_command(tracker, "doomed"), "doomed tracked server") as server:
        wait_registered(tracker, "doomed")
        run_remote(artifact_dir, inputs, RpcEndpoint.tracker(tracker, "doomed", timeout=RUN_TIMEOUT))
        server.kill()
    error = assert_fails_in_time(artifact_dir, RpcEndpoint.tracker(tracker, "doomed", timeout=FAILURE_TIMEOUT),
                                 "gave no free device within")
    assert "'doomed'" in str(error)


def test_device_that_accepts_but_never_answers_times_out(artifacts):
    """A device that vanished from the network: TCP accepted, then silence (TVM would wait forever)."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        endpoint = RpcEndpoint.server(f"{LOOPBACK}:{listener.getsockname()[1]}", timeout=FAILURE_TIMEOUT)
        assert_fails_in_time(artifacts["inference", "cpu"], endpoint, "no answer within")


def test_dead_tracker_is_exit_2_through_the_cli(capsys):
    """(device_cli is imported with this module: the CLI imports it lazily, and pytest's assertion rewriting
    then parsed it in the middle of this test, where CPython 3.11.7's compile() sometimes failed with
    "SystemError: AST constructor recursion depth mismatch" after the RPC tests before it.)"""
    # a port held bound but never listening: connecting is refused, and no other process can take it
    # meanwhile (a port merely found free could be, by a service another test starts)
    with socket.socket() as held:
        held.bind((LOOPBACK, 0))
        assert cli(["device", "list", "--tracker", f"{LOOPBACK}:{held.getsockname()[1]}"]) == 2
    assert "connection refused" in capsys.readouterr().err


def test_bad_addresses_are_refused_before_any_connection():
    with pytest.raises(BndeployError, match="not HOST:PORT"):
        RpcEndpoint.server("raspberrypi")
    with pytest.raises(BndeployError, match="device key"):
        RpcEndpoint.tracker(f"{LOOPBACK}:9190", "")
    with pytest.raises(BndeployError, match="positive"):
        RpcEndpoint.server(f"{LOOPBACK}:9090", timeout=0)


# --------------------------------------------------------------------------------------------------
# (c) an emulated aarch64 device (qemu-user), as CI runs it after .ci/install-edge


def emulated_device_missing() -> str | None:
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (run .ci/install-edge)"
    ready = subprocess.run(["bash", str(EMULATOR), "check"], capture_output=True, text=True)
    if ready.returncode != 0:
        return f"the emulated aarch64 root is not set up ({ready.stdout.strip()}; run .ci/install-edge)"
    return None


@pytest.fixture(scope="module")
def conv_classes_orin(exported, tmp_path_factory):
    """The conv-classes model (one conv of every class real CNNs use) compiled for the Jetson Orin CPU."""
    from bndeploy.compile import compile_model

    if not shutil.which(cross_compiler("cortex-a78ae")):
        pytest.skip(f"{cross_compiler('cortex-a78ae')} is not installed (.ci/install-edge installs it)")
    export_dir = exported("conv-classes")["inference"]
    (directory,) = compile_model(export_dir / "model.onnx", ["cortex-a78ae"], tmp_path_factory.mktemp("conv-classes") / "orin")
    kernels = json.loads((directory / "artifact.json").read_text())["kernels"]
    assert sum("bndeploy_conv2d" in k for k in kernels) == 8 and any("bndeploy_dense" in k for k in kernels), kernels
    assert not any("conv2d" in k and "bndeploy" not in k for k in kernels), f"a conv fell to TVM's generic path: {kernels}"
    return directory


@pytest.fixture(scope="module")
def winograd_orin(tmp_path_factory):
    """A conv3x3(64 -> 64)+BN+ReLU block on 16x16 compiled for the Jetson Orin CPU in both modes: its conv is
    the Winograd kernel (with the statistics in its output transform in train mode)."""
    from bndeploy import bench

    if not shutil.which(cross_compiler("cortex-a78ae")):
        pytest.skip(f"{cross_compiler('cortex-a78ae')} is not installed (.ci/install-edge installs it)")
    work, built = tmp_path_factory.mktemp("winograd-orin"), []
    for mode, kernel in (("inference", "bndeploy_conv2d_winograd"), ("train", "bndeploy_conv2d_winograd_stats")):
        case = bench.conv_case(1, 64, 16, mode)
        settings = bench.BenchSettings(target="cortex-a78ae")
        _, directory, _, _ = bench.export_and_compile(case, case.build(), settings, work)
        kernels = json.loads((directory / "artifact.json").read_text())["kernels"]
        assert any(kernel in k for k in kernels), kernels
        built.append(directory)
    return built


@pytest.mark.slow
def test_orin_cpu_artifacts_pass_check_on_emulated_aarch64_device(artifacts, conv_classes_orin, winograd_orin, tracker):
    """cortex-a78ae libraries cannot load on x86 (test_foreign_library_...), so passing proves they
    ran on the emulated aarch64 CPU: conv->BN in both modes, every NEON conv kernel class, and the
    Winograd kernel in both modes."""
    missing = emulated_device_missing()
    if missing:
        pytest.skip(missing)
    modes = ("inference", "train")
    artifact_dirs = [cross_artifact(artifacts, "cortex-a78ae", mode) for mode in modes]
    endpoint = RpcEndpoint.tracker(tracker, "orin-emulated", timeout=180)
    started = time.monotonic()
    command = ["bash", str(EMULATOR), "serve", "--host", LOOPBACK, "--port", str(free_port()),
               "--tracker", tracker, "--key", "orin-emulated"]
    with running(command, "emulated aarch64 RPC server", EMULATED_START_TIMEOUT) as server:
        wait_registered(tracker, "orin-emulated")
        ready = time.monotonic()
        check_remotely(artifact_dirs[0], endpoint)
        check_remotely(conv_classes_orin, endpoint)
        for directory in winograd_orin:  # the Winograd kernel's NEON code, in both modes
            check_remotely(directory, endpoint)
        # the train-mode one through the CLI, as a user's CI job would run it
        assert cli(["check", str(artifact_dirs[1]), "--rpc", tracker, "--key", "orin-emulated",
                    "--rpc-timeout", "180"]) == 0
        checks = len(modes) + 1 + len(winograd_orin)
        assert sum("connected from" in line for line in server.lines) == checks, server.log()
    print(f"\nemulated aarch64: server up in {ready - started:.1f} s, "
          f"{checks} checks over RPC in {time.monotonic() - ready:.1f} s")


def test_rpc_options_choose_the_endpoint():
    import argparse

    from bndeploy.runtime.device_cli import add_rpc_arguments, endpoint_from_args

    parser = argparse.ArgumentParser()
    add_rpc_arguments(parser)
    parse = lambda *argv: endpoint_from_args(parser.parse_args(list(argv)))  # noqa: E731

    assert parse() is None
    assert parse("--rpc", "10.0.0.2:9190", "--key", "rpi4", "--rpc-timeout", "30") == RpcEndpoint(
        "10.0.0.2", 9190, "rpi4", via_tracker=True, timeout=30.0)
    assert parse("--rpc-server", "raspberrypi.local:9090") == RpcEndpoint("raspberrypi.local", 9090)
    for argv, problem in ((["--rpc", "h:1"], "needs --key"), (["--key", "rpi4"], "give the tracker"),
                          (["--rpc", "h:1", "--key", "k", "--rpc-server", "h:2"], "not both")):
        with pytest.raises(BndeployError, match=problem):
            parse(*argv)


def test_device_side_imports_neither_torch_nor_onnx():
    """A Raspberry Pi has only TVM and numpy: serving and remote runs must not need more."""
    code = ("import sys, bndeploy.cli, bndeploy.runtime.remote, bndeploy.runtime.device_cli; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
