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

One concern per file:

- endpoint.py: where the device is (``RpcEndpoint``: tracker and key, or a server) and the timeout;
- client.py: verify, upload, run and fetch the outputs (``run_remote``, ``RemoteArtifact``);
- tracker.py: the tracker protocol (request a device, the summary of registered ones);
- server.py: the device side (the RPC server and the tracker in this process);
- guarded.py, guard.py, allowlist.py: the approved-only server (its accept loop and sessions; what a
  session process refuses; the approved sha256s), and the token/TLS tracker;
- channel.py, tunnel.py: the token handshake, TLS and relays; the client's token/TLS end (a process);
- deadline.py: the deadline every wait obeys (its watchdog, bndeploy/deadline.py, is shared with tuning),
  and network failures in words.
"""

from bndeploy.deadline import call_with_deadline

from .client import RemoteArtifact, Runner, open_artifact, open_remote_artifact, remote_runner, run_remote
from .endpoint import DEFAULT_SERVER_PORT, DEFAULT_TIMEOUT, DEFAULT_TRACKER_PORT, RpcEndpoint, parse_address
from .server import RunningService, check_tracker_reachable, start_server, start_tracker
from .tracker import registered_keys, request_device, tracker_summary

__all__ = [
    "DEFAULT_SERVER_PORT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRACKER_PORT",
    "RemoteArtifact",
    "RpcEndpoint",
    "Runner",
    "RunningService",
    "call_with_deadline",
    "check_tracker_reachable",
    "open_artifact",
    "open_remote_artifact",
    "parse_address",
    "registered_keys",
    "remote_runner",
    "request_device",
    "run_remote",
    "start_server",
    "start_tracker",
    "tracker_summary",
]
