"""Where the remote device is: through a tracker (by key) or a server reached directly, with one timeout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bndeploy.errors import BndeployError

from .channel import Channel

DEFAULT_TIMEOUT = 120.0  # seconds for a whole remote run: connect, upload, load, run, download
DEFAULT_SERVER_PORT = 9090
DEFAULT_TRACKER_PORT = 9190


@dataclass(frozen=True)
class RpcEndpoint:
    """A device reached through a tracker (``key`` names the device kind there) or a server directly.

    ``timeout`` bounds a whole remote run in seconds; the server is also told to end the session then.
    ``channel``: the token and the trusted TLS certificate, for the tracker and the device alike (none:
    plain TVM RPC, as TVM's stock tracker and server speak it).
    """

    host: str
    port: int
    key: str = ""
    via_tracker: bool = False
    timeout: float = DEFAULT_TIMEOUT
    channel: Channel = field(default_factory=Channel)

    @classmethod
    def tracker(cls, address: str, key: str, timeout: float = DEFAULT_TIMEOUT, channel: Channel | None = None) -> "RpcEndpoint":
        """``address`` is the tracker's HOST:PORT; ``key`` the one the device's server registered with."""
        if not key:
            raise BndeployError("a tracker needs the device key (--key) the device's server registered with")
        host, port = parse_address(address, "tracker")
        return cls(host, port, key, True, _positive_timeout(timeout), channel or Channel())

    @classmethod
    def server(cls, address: str, key: str = "", timeout: float = DEFAULT_TIMEOUT, channel: Channel | None = None) -> "RpcEndpoint":
        """``address`` is the RPC server's HOST:PORT (a server started without --tracker)."""
        host, port = parse_address(address, "RPC server")
        return cls(host, port, key, False, _positive_timeout(timeout), channel or Channel())

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
