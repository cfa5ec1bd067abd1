"""The tracker protocol (TVM's JSON messages) on a Python socket, so that every wait has a timeout:
request a device by key, ask for the summary of registered devices."""

from __future__ import annotations

import socket
import time
from typing import Callable

from bndeploy.errors import BndeployError

from .channel import Channel, secure_client
from bndeploy.deadline import INNER_DEADLINE_SHARE

from .deadline import TRACKER_HINT, remaining, socket_problem
from .endpoint import RpcEndpoint


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
        raise BndeployError(f"cannot reach the tracker {endpoint.host}:{endpoint.port}: {socket_problem(e, TRACKER_HINT)}"
                            f"{plain_hint(endpoint, e)}") from None
    try:
        base.sendjson(sock, message)
        answer = base.recvjson(sock)
    except TimeoutError as e:
        if timed_out is None:
            raise BndeployError(f"{dropped}: {socket_problem(e, TRACKER_HINT)}") from None
        raise BndeployError(timed_out()) from None
    except OSError as e:
        raise BndeployError(f"{dropped}: {socket_problem(e, TRACKER_HINT)}{plain_hint(endpoint, e)}") from None
    finally:
        sock.close()
    if not isinstance(answer, list) or answer[0] != base.TrackerCode.SUCCESS:
        raise BndeployError(f"{refused}: {answer!r}")
    return answer[1]


def plain_hint(endpoint: RpcEndpoint, error: OSError) -> str:
    """A tracker that drops a client at once may want the token or TLS this client did not bring."""
    if endpoint.channel.plain and isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return " (a tracker started with --token-file or --tls-cert drops clients without them)"
    return ""


def tracker_socket(endpoint: RpcEndpoint, deadline: float) -> socket.socket:
    """A connected tracker socket whose every operation times out at the deadline."""
    import struct

    from tvm.rpc import base

    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=remaining(deadline))
    try:
        sock = secure_client(sock, endpoint.channel, f"the tracker {endpoint.host}:{endpoint.port}")
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


def tracker_summary(host: str, port: int, timeout: float = 10.0, channel: Channel | None = None) -> dict:
    """The tracker's {"queue_info": {key: {"free", "pending"}}, "server_info": [...]}."""
    from tvm.rpc import base

    endpoint = RpcEndpoint(host, port, via_tracker=True, timeout=timeout, channel=channel or Channel())
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
        keys = registered_keys(tracker_summary(endpoint.host, endpoint.port, summary_timeout, endpoint.channel))
    except BndeployError:
        return "the tracker did not answer a summary either"
    if endpoint.key in keys:
        return f"{keys[endpoint.key]} server(s) with that key are registered but busy (or dead and not yet dropped)"
    known = ", ".join(f"{k!r} ({n})" for k, n in sorted(keys.items())) or "none"
    return (f"no server is registered with key {endpoint.key!r} (keys there: {known}); start one on the device: "
            f"bndeploy device serve --tracker {endpoint.host}:{endpoint.port} --key {endpoint.key}")
