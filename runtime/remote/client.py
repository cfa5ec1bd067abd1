"""The client: verify an artifact here, upload its library to the device, run it there through the Relax
VM and pull the outputs back by ONNX output name, all within the endpoint's timeout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from bndeploy.deadline import call_with_deadline
from bndeploy.device_protocol import POLICY_FUNCTION, read_policy
from bndeploy.errors import ArtifactError, BndeployError
from bndeploy.layout import ARTIFACT_MANIFEST, read_artifact_manifest
from bndeploy.runtime.artifact import Artifact, verified_library
from bndeploy.runtime.inputs import validate_inputs
from bndeploy.runtime.specs import TensorSpec

from .deadline import connection_problem, first_line
from .endpoint import RpcEndpoint

from .guard import REFUSED_MARK
from .tracker import request_device
from .tunnel import open_tunnel

REMOTE_DEVICES = ("cpu", "cuda")

Runner = Callable[[Path, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


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
        failure = None
        try:
            module = upload_library(session, self.library, self.manifest)
            values = run_on_device(session, module, self.kind, [arrays[s.name] for s in self.inputs], self.directory)
        except BndeployError as e:
            failure = e.with_traceback(None)  # its frames hold the session: the device would stay busy
        finally:
            module = session = None
            end_sessions()
        if failure is not None:
            raise failure
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
    """An RPC session with the device; the server ends it by itself after the endpoint's timeout.

    With a token or TLS, TVM's client talks to the loopback port of a tunnel process that carries its
    bytes over a connection that passed both (tunnel.py)."""
    from tvm import rpc

    if endpoint.via_tracker:
        host, port, key = request_device(endpoint, deadline)
        where = f"device {host}:{port} (given by the {endpoint.describe()})"
    else:
        host, port, key = endpoint.host, endpoint.port, endpoint.key
        where = endpoint.describe()
    via = (host, port) if endpoint.channel.plain else ("127.0.0.1", open_tunnel(host, port, endpoint.channel, where, deadline))
    try:
        return rpc.connect(*via, key, session_timeout=math.ceil(endpoint.timeout))
    except Exception as e:  # TVM raises InternalError/RPCError with C++ text
        message = f"cannot open an RPC session with {where}: {connection_problem(host, port, e, deadline)}"
    raise BndeployError(message)


def upload_library(session, library: Path, manifest: dict):
    """Upload the library under a name unique to its content and load it on the device."""
    check_upload_limit(session, library)
    remote_name = f"bndeploy-{manifest['library']['sha256'][:16]}.so"
    refused = f"the device refused {library}"
    tvm_step(f"uploading {library} to the device", session.upload, str(library), remote_name, refused=refused)
    target = manifest.get("target") or {}
    return tvm_step(
        f"the device could not load {library} (compiled for target {target.get('name', '?')}, "
        f"{target.get('triple') or 'this machine'}; compile for the device's CPU, e.g. --target cortex-a72 "
        "for a Raspberry Pi 4, cortex-a78ae for a Jetson Orin)",
        session.load_module, remote_name, refused=refused)


def device_policy(session) -> dict | None:
    """{"libraries": "approved"|"any", "max_upload": bytes} from an approved-only server; None from TVM's."""
    try:
        ask = session.get_function(POLICY_FUNCTION)
    except Exception:  # TVM's own server has no such function
        return None
    return read_policy(tvm_step("asking the device for its upload limit", ask))


def device_policy_of(endpoint: RpcEndpoint) -> dict | None:
    """``device_policy`` of the device behind ``endpoint``, in a session of its own."""
    load_tvm_client()

    def ask(deadline: float):
        session = open_session(endpoint, deadline)
        try:
            return device_policy(session)
        finally:
            session = None
            end_sessions()

    return call_with_deadline(ask, endpoint.timeout, f"asking the device ({endpoint.describe()}) what it loads")


def check_upload_limit(session, library: Path) -> None:
    """Refuse here, before sending a byte, a library larger than the device accepts."""
    policy = device_policy(session)
    size = library.stat().st_size
    if policy is not None and size > int(policy["max_upload"]):
        raise BndeployError(f"{library} is {size} bytes, more than the device accepts ({policy['max_upload']} bytes: "
                            "its --max-upload)")


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


def tvm_step(what: str, function, *args, refused: str = "the device refused"):
    """Call TVM; turn its error into a BndeployError that keeps no traceback (a traceback's frames
    would keep the remote session open). An approved-only server's refusal becomes ``refused: reason``."""
    try:
        return function(*args)
    except Exception as e:  # TVM raises InternalError/RPCError/TVMError carrying C++ text
        reason = refusal_reason(e)
        message = f"{what}: {first_line(e)}" if reason is None else f"{refused}: {reason}"
    raise BndeployError(message)


def refusal_reason(error: BaseException) -> str | None:
    """The one-line reason in an approved-only server's refusal (guard.Refused), if it is one."""
    text = str(error)
    start = text.find(REFUSED_MARK)
    if start < 0:
        return None
    return text[start + len(REFUSED_MARK):].splitlines()[0].strip()


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


def flatten(value) -> list:
    """A (possibly nested) tuple of tensors, or one tensor, as a flat list in order."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]
