"""Run a compiled artifact on another machine (a Raspberry Pi, a Jetson) through TVM RPC.

The client side (``run_remote``, ``RemoteArtifact``, ``remote_runner``) verifies the artifact here,
uploads its library to the device, runs it there through the Relax VM and pulls the outputs back by
ONNX output name. The device side (``start_server``, ``start_tracker``) is what
``bndeploy device serve`` / ``bndeploy device tracker`` run: TVM's RPC server and tracker started in
this process, which also works under qemu-user where TVM's stock ``rpc_server`` (it re-executes
the interpreter) fails.

Every remote exchange runs under one deadline (``RpcEndpoint.timeout``): a refused connection, a
tracker without a free device, a device that stops answering, all end in a ``BndeployError`` within
that time, never a hang. Imports only TVM's runtime and numpy.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.layout import ARTIFACT_MANIFEST, read_artifact_manifest
from bndeploy.runtime.artifact import Artifact, verified_library
from bndeploy.runtime.inputs import validate_inputs
from bndeploy.runtime.specs import TensorSpec

DEFAULT_TIMEOUT = 120.0  # seconds for a whole remote run: connect, upload, load, run, download
DEFAULT_SERVER_PORT = 9090
DEFAULT_TRACKER_PORT = 9190
REMOTE_DEVICES = ("cpu", "cuda")
INNER_DEADLINE_SHARE = 0.9  # of the timeout, for the socket waits inside a run (the watchdog takes all)

Runner = Callable[[Path, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------------
# Where the device is


@dataclass(frozen=True)
class RpcEndpoint:
    """A device reached through a tracker (``key`` names the device kind there) or a server directly.

    ``timeout`` bounds a whole remote run in seconds; the server is also told to end the session then.
    """

    host: str
    port: int
    key: str = ""
    via_tracker: bool = False
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def tracker(cls, address: str, key: str, timeout: float = DEFAULT_TIMEOUT) -> "RpcEndpoint":
        """``address`` is the tracker's HOST:PORT; ``key`` the one the device's server registered with."""
        if not key:
            raise BndeployError("a tracker needs the device key (--key) the device's server registered with")
        host, port = parse_address(address, "tracker")
        return cls(host, port, key, True, _positive_timeout(timeout))

    @classmethod
    def server(cls, address: str, key: str = "", timeout: float = DEFAULT_TIMEOUT) -> "RpcEndpoint":
        """``address`` is the RPC server's HOST:PORT (a server started without --tracker)."""
        host, port = parse_address(address, "RPC server")
        return cls(host, port, key, False, _positive_timeout(timeout))

    def describe(self) -> str:
        if self.via_tracker:
            return f"tracker {self.host}:{self.port}, key {self.key!r}"
        return f"RPC server {self.host}:{self.port}"


def parse_address(address: str, what: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port), with an error that names the bad part."""
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BndeployError(f"{what} address {address!r} is not HOST:PORT (e.g. 192.168.1.20:9190)")
    return host.strip("[]"), int(port)


def _positive_timeout(timeout: float) -> float:
    if not timeout or timeout <= 0 or math.isinf(timeout):
        raise BndeployError(f"the RPC timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# --------------------------------------------------------------------------------------------------
# Client: run an artifact on the device


class RemoteArtifact(Artifact):
    """An artifact verified here and run on a remote device: the same interface as ``Artifact``
    (manifest, inputs, outputs, mode, dtype, ``run``), so ``check`` can use either."""

    def __init__(self, directory: Path, manifest: dict, library: Path, endpoint: RpcEndpoint) -> None:
        self.kind = remote_device_kind(manifest, directory)
        super().__init__(directory, manifest, f"{self.kind} via {endpoint.describe()}", vm=None)
        self.library = library
        self.endpoint = endpoint

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = validate_inputs(inputs, self.inputs)
        load_tvm_client()
        what = f"running {self.directory} on the device ({self.endpoint.describe()})"
        return call_with_deadline(lambda deadline: self._exchange(arrays, deadline), self.endpoint.timeout, what)

    def _exchange(self, arrays: dict[str, np.ndarray], deadline: float) -> dict[str, np.ndarray]:
        session = open_session(self.endpoint, deadline)
        try:
            module = upload_library(session, self.library, self.manifest)
            values = run_on_device(session, module, self.kind, [arrays[s.name] for s in self.inputs], self.directory)
        finally:
            module = session = None
            end_sessions()
        return outputs_by_name(values, self.outputs, self.directory)


def load_tvm_client() -> None:
    """Import TVM's RPC client and VM before the clock starts: loading TVM takes seconds here, and
    the timeout is the device's."""
    import tvm.rpc  # noqa: F401
    import tvm.runtime.vm  # noqa: F401


def open_artifact(artifact_dir: str | Path, device: str | None = None, remote: RpcEndpoint | None = None):
    """The artifact on this machine's ``device``, or on the remote device behind ``remote``."""
    from bndeploy.runtime.artifact import load_artifact

    return open_remote_artifact(artifact_dir, remote) if remote is not None else load_artifact(artifact_dir, device)


def open_remote_artifact(artifact_dir: str | Path, endpoint: RpcEndpoint) -> RemoteArtifact:
    """Read artifact.json and verify the library's sha256 here; nothing is sent before that."""
    directory = Path(artifact_dir).absolute()
    manifest = read_artifact_manifest(directory)
    library = verified_library(directory, manifest)
    return RemoteArtifact(directory, manifest, library, endpoint)


def run_remote(artifact_dir: str | Path, inputs: Mapping[str, np.ndarray], endpoint: RpcEndpoint) -> dict[str, np.ndarray]:
    """Verify the artifact, run it once on the device behind ``endpoint``, return outputs by ONNX name."""
    return open_remote_artifact(artifact_dir, endpoint).run(inputs)


def remote_runner(endpoint: RpcEndpoint) -> Runner:
    """``runner(artifact_dir, inputs) -> outputs`` that runs on the device behind ``endpoint``."""

    def runner(artifact_dir: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_remote(artifact_dir, inputs, endpoint)

    return runner


def remote_device_kind(manifest: dict, directory: Path) -> str:
    kind = str((manifest.get("target") or {}).get("device", "cpu"))
    if kind not in REMOTE_DEVICES:
        raise ArtifactError(f"{directory / ARTIFACT_MANIFEST}: unknown device kind {kind!r} (expected cpu or cuda)")
    return kind


# Steps of one remote run (each called inside call_with_deadline's worker thread).


def open_session(endpoint: RpcEndpoint, deadline: float):
    """An RPC session with the device; the server ends it by itself after the endpoint's timeout."""
    from tvm import rpc

    if endpoint.via_tracker:
        host, port, key = request_device(endpoint, deadline)
        where = f"device {host}:{port} (given by the {endpoint.describe()})"
    else:
        host, port, key = endpoint.host, endpoint.port, endpoint.key
        where = endpoint.describe()
    try:
        return rpc.connect(host, port, key, session_timeout=math.ceil(endpoint.timeout))
    except Exception as e:  # TVM raises InternalError/RPCError with C++ text
        message = f"cannot open an RPC session with {where}: {connection_problem(host, port, e, deadline)}"
    raise BndeployError(message)


def upload_library(session, library: Path, manifest: dict):
    """Upload the library under a name unique to its content and load it on the device."""
    remote_name = f"bndeploy-{manifest['library']['sha256'][:16]}.so"
    tvm_step(f"uploading {library} to the device", session.upload, str(library), remote_name)
    target = manifest.get("target") or {}
    return tvm_step(
        f"the device could not load {library} (compiled for target {target.get('name', '?')}, "
        f"{target.get('triple') or 'this machine'}; compile for the device's CPU, e.g. --target cortex-a72 "
        "for a Raspberry Pi 4, cortex-a78ae for a Jetson Orin)",
        session.load_module, remote_name)


def run_on_device(session, module, kind: str, arrays: list[np.ndarray], directory: Path) -> list[np.ndarray]:
    return tvm_step(f"running {directory} on the device's {kind}", _run_vm, session, module, kind, arrays)


def _run_vm(session, module, kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    import tvm.runtime
    from tvm.runtime.vm import VirtualMachine  # tvm.relax is absent from runtime-only installs

    device = session.cpu(0) if kind == "cpu" else session.cuda(0)
    vm = VirtualMachine(module, device)
    # The stateful interface is the one that works over RPC: with vm["main"](...) a returned tuple
    # stays a remote object, while get_outputs fetches each tensor.
    vm.set_input("main", *[tvm.runtime.tensor(array, device) for array in arrays])
    vm.invoke_stateful("main")
    return [value.numpy() for value in flatten(vm.get_outputs("main"))]


def tvm_step(what: str, function, *args):
    """Call TVM; turn its error into a BndeployError that keeps no traceback (a traceback's frames
    would keep the remote session open)."""
    try:
        return function(*args)
    except Exception as e:  # TVM raises InternalError/RPCError/TVMError carrying C++ text
        message = f"{what}: {first_line(e)}"
    raise BndeployError(message)


def end_sessions() -> None:
    """Close the RPC connection now: TVM closes it when the last remote object is freed, and the
    session, module, VM and tensors refer to each other, so only a garbage collection frees them.
    A server serves one session at a time, so a lingering one would block the next run."""
    import gc

    gc.collect()


def outputs_by_name(values: list[np.ndarray], specs: list[TensorSpec], directory: Path) -> dict[str, np.ndarray]:
    if len(values) != len(specs):
        raise ArtifactError(
            f"{directory}: the library returned {len(values)} outputs on the device, {ARTIFACT_MANIFEST} lists {len(specs)}"
        )
    return {spec.name: value for spec, value in zip(specs, values)}


# Tracker protocol (TVM's JSON messages), on a Python socket so every wait has a timeout.


def request_device(endpoint: RpcEndpoint, deadline: float) -> tuple[str, int, str]:
    """Ask the tracker for a free device with the endpoint's key: (host, port, match key)."""
    from tvm.rpc import base

    answer = tracker_exchange(
        endpoint, deadline, [base.TrackerCode.REQUEST, endpoint.key, "", 1],
        dropped=f"the {endpoint.describe()} dropped the request", refused=f"the {endpoint.describe()} refused the request",
        timed_out=lambda: (f"the {endpoint.describe()} gave no free device within {endpoint.timeout:g} s; "
                           f"{tracker_keys_hint(endpoint)}"),
    )
    host, port, match_key = answer
    return str(host), int(port), str(match_key)


def tracker_exchange(endpoint: RpcEndpoint, deadline: float, message: list, dropped: str, refused: str,
                     timed_out: Callable[[], str] | None = None):
    """Send one message to the tracker and return the payload of its SUCCESS answer.

    ``dropped`` and ``refused`` begin the error for a broken exchange and a refusal; ``timed_out`` (when
    given) words a timeout, which otherwise counts as a broken exchange.
    """
    from tvm.rpc import base

    try:
        sock = tracker_socket(endpoint, deadline)
    except OSError as e:
        raise BndeployError(f"cannot reach the tracker {endpoint.host}:{endpoint.port}: {socket_problem(e, TRACKER_HINT)}") from None
    try:
        base.sendjson(sock, message)
        answer = base.recvjson(sock)
    except TimeoutError as e:
        if timed_out is None:
            raise BndeployError(f"{dropped}: {socket_problem(e, TRACKER_HINT)}") from None
        raise BndeployError(timed_out()) from None
    except OSError as e:
        raise BndeployError(f"{dropped}: {socket_problem(e, TRACKER_HINT)}") from None
    finally:
        sock.close()
    if not isinstance(answer, list) or answer[0] != base.TrackerCode.SUCCESS:
        raise BndeployError(f"{refused}: {answer!r}")
    return answer[1]


def tracker_socket(endpoint: RpcEndpoint, deadline: float) -> socket.socket:
    """A connected tracker socket whose every operation times out at the deadline."""
    import struct

    from tvm.rpc import base

    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=remaining(deadline))
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except BaseException:
        sock.close()
        raise
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise BndeployError(f"{endpoint.host}:{endpoint.port} answered but is not a TVM RPC tracker")
    sock.settimeout(remaining(deadline))
    return sock


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    """The tracker's {"queue_info": {key: {"free", "pending"}}, "server_info": [...]}."""
    from tvm.rpc import base

    endpoint = RpcEndpoint(host, port, via_tracker=True, timeout=timeout)
    return tracker_exchange(endpoint, time.monotonic() + timeout, [base.TrackerCode.SUMMARY],
                            dropped=f"the tracker {host}:{port} did not answer a summary",
                            refused=f"the tracker {host}:{port} refused a summary")


def registered_keys(summary: dict) -> dict[str, int]:
    """{device key: number of servers registered} from a tracker summary."""
    counts: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":", 1)[-1]
        counts[key] = counts.get(key, 0) + 1
    return counts


def tracker_keys_hint(endpoint: RpcEndpoint) -> str:
    try:
        # Within the share of the timeout the watchdog leaves after the inner deadline.
        summary_timeout = max(0.2, endpoint.timeout * (1 - INNER_DEADLINE_SHARE) / 2)
        keys = registered_keys(tracker_summary(endpoint.host, endpoint.port, timeout=summary_timeout))
    except BndeployError:
        return "the tracker did not answer a summary either"
    if endpoint.key in keys:
        return f"{keys[endpoint.key]} server(s) with that key are registered but busy (or dead and not yet dropped)"
    known = ", ".join(f"{k!r} ({n})" for k, n in sorted(keys.items())) or "none"
    return (f"no server is registered with key {endpoint.key!r} (keys there: {known}); start one on the device: "
            f"bndeploy device serve --tracker {endpoint.host}:{endpoint.port} --key {endpoint.key}")


# Deadline and error wording


def call_with_deadline(work: Callable[[float], object], timeout: float, what: str):
    """Run ``work(deadline)`` in a worker thread; give up after ``timeout`` seconds.

    TVM's RPC client waits on its sockets without a timeout (a device that vanishes from the network
    never answers); TVM's FFI releases the GIL, so the caller gets its error on time and the stuck
    daemon thread is abandoned.
    """
    # The steps inside stop a little earlier, so their own, more specific timeout errors win.
    deadline = time.monotonic() + timeout * INNER_DEADLINE_SHARE
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work(deadline)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=target, name="bndeploy-rpc", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise BndeployError(
            f"{what}: no answer within {timeout:g} s (the device stopped answering, the network is down, "
            "or the run needs longer: raise --rpc-timeout)"
        )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BndeployError("the RPC timeout passed before the device answered (raise --rpc-timeout)")
    return left


def connection_problem(host: str, port: int, error: Exception, deadline: float) -> str:
    """Why TVM's connect failed, in words: probe the address with a plain socket."""
    try:
        with socket.create_connection((host, port), timeout=min(5.0, max(remaining(deadline), 0.1))):
            pass
    except OSError as e:
        return socket_problem(e)
    return f"{first_line(error)} (the port accepts connections: is it a TVM RPC server, and is the key right?)"


SERVER_HINT = "is `bndeploy device serve` running there?"
TRACKER_HINT = "is the tracker running (`bndeploy device tracker`)?"


def socket_problem(error: OSError, hint: str = SERVER_HINT) -> str:
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused (nothing listens there: {hint})"
    if isinstance(error, TimeoutError):
        return "timed out (host down or unreachable, or a firewall drops the packets)"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    return error.strerror or str(error) or type(error).__name__


def first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def flatten(value) -> list:
    """A (possibly nested) tuple of tensors, or one tensor, as a flat list in order."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]


# --------------------------------------------------------------------------------------------------
# Device side: the RPC server and the tracker, started in this process


@dataclass
class RunningService:
    """A server or tracker listening in this process (its thread never returns while it serves)."""

    what: str
    host: str
    port: int
    thread: threading.Thread
    sock: socket.socket | None

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        """Stop accepting connections (the daemon-less TVM thread ends with the process)."""
        if self.sock is not None:
            self.sock.close()


def start_server(host: str, port: int, tracker: tuple[str, int] | None = None, key: str = "",
                 custom_addr: str | None = None, quiet: bool = False, port_end: int | None = None) -> RunningService:
    """TVM's RPC server, in this process: every session runs in a forked child (no fresh interpreter)."""
    from tvm.rpc.server import PopenRPCServerState

    if tracker is not None:
        check_tracker_reachable(*tracker)
    try:
        state = PopenRPCServerState(host, port, port_end or port + 1, is_proxy=False, tracker_addr=tracker,
                                    key=key, custom_addr=custom_addr, silent=quiet)
    except (OSError, ValueError) as e:
        raise BndeployError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    PopenRPCServerState.current = state
    return RunningService("RPC server", host, state.port, state.thread, state.sock)


def start_tracker(host: str, port: int, quiet: bool = False, port_end: int | None = None) -> RunningService:
    try:
        from tvm.rpc.tracker import PopenTrackerServerState
    except ImportError as e:  # the tracker needs tornado; servers and clients do not
        raise BndeployError(f"the RPC tracker needs the tornado package (pip install tornado): {e}") from None
    try:
        state = PopenTrackerServerState(host, port, port_end or port + 1, silent=quiet)
    except (OSError, ValueError) as e:
        raise BndeployError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return RunningService("RPC tracker", host, state.port, state.thread, None)


def check_tracker_reachable(host: str, port: int, timeout: float = 10.0) -> None:
    """TVM's server retries an unreachable tracker in a background thread; fail up front instead."""
    tracker_summary(host, port, timeout)
