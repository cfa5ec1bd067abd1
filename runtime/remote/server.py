"""The device side: the RPC server and tracker started in this process (``bndeploy device serve`` /
``bndeploy device tracker``). It also works under qemu-user, where TVM's stock ``rpc_server`` (it
re-executes the interpreter) fails.

Without a guard (no allowlist, token or TLS) these are TVM's own server and tracker, which any TVM client
(MetaSchedule's tuner included) can use; with one, guarded.py's approved-only server and token/TLS tracker."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Callable

from bndeploy.errors import BndeployError

from .channel import Channel
from .guarded import ServeGuard, start_guarded_server, start_guarded_tracker
from .tracker import tracker_summary


@dataclass
class RunningService:
    """A server or tracker listening in this process (its thread never returns while it serves)."""

    what: str
    host: str
    port: int
    thread: threading.Thread
    sock: socket.socket | None
    reload: Callable[[], None] | None = None  # re-read the allowlist (SIGHUP)
    guard: str = ""  # what it enforces, in words ("" for TVM's own server and tracker)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        """Stop accepting connections (the daemon-less TVM thread ends with the process)."""
        if self.sock is not None:
            self.sock.close()


def start_server(host: str, port: int, tracker: tuple[str, int] | None = None, key: str = "",
                 custom_addr: str | None = None, quiet: bool = False, port_end: int | None = None,
                 guard: ServeGuard | None = None) -> RunningService:
    """The RPC server, in this process: every session runs in a forked child (no fresh interpreter).
    With ``guard``, the approved-only server; without, TVM's (it loads any library a client uploads)."""
    from tvm.rpc.server import PopenRPCServerState

    if tracker is not None:
        check_tracker_reachable(*tracker, channel=guard.channel if guard else None)
    if guard is not None:
        return start_guarded_server(host, port, guard, tracker, key, custom_addr)
    try:
        state = PopenRPCServerState(host, port, port_end or port + 1, is_proxy=False, tracker_addr=tracker,
                                    key=key, custom_addr=custom_addr, silent=quiet)
    except (OSError, ValueError) as e:
        raise BndeployError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    PopenRPCServerState.current = state
    return RunningService("RPC server", host, state.port, state.thread, state.sock)


def start_tracker(host: str, port: int, quiet: bool = False, port_end: int | None = None,
                  channel: Channel | None = None) -> RunningService:
    """TVM's tracker; with a token or TLS in ``channel``, behind guarded.py's front."""
    if channel is not None and not channel.plain:
        return start_guarded_tracker(host, port, channel, quiet)
    try:
        from tvm.rpc.tracker import PopenTrackerServerState
    except ImportError as e:  # the tracker needs tornado; servers and clients do not
        raise BndeployError(f"the RPC tracker needs the tornado package (pip install tornado): {e}") from None
    try:
        state = PopenTrackerServerState(host, port, port_end or port + 1, silent=quiet)
    except (OSError, ValueError) as e:
        raise BndeployError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return RunningService("RPC tracker", host, state.port, state.thread, None)


def check_tracker_reachable(host: str, port: int, timeout: float = 10.0, channel: Channel | None = None) -> None:
    """TVM's server retries an unreachable tracker in a background thread; fail up front instead."""
    tracker_summary(host, port, timeout, channel)
