"""Every remote wait is bounded (the watchdog: bndeploy/deadline.py), and network failures put in words a user can act on."""

from __future__ import annotations

import socket
import time

from bndeploy.errors import BndeployError


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
    return f"{first_line(error)} (the port accepts connections: is it a TVM RPC server, is the key right, does it require a token (--token-file) or TLS (--tls-cert)?)"


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
