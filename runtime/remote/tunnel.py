"""The client's end of a token/TLS connection to a device, in a process of its own.

TVM's C++ client connects only by host and port, so it talks to a loopback port of this process, which
relays its one connection over a connection that passed TLS and the token (channel.py). The relay cannot
be a thread of the client: TVM's client blocks in C++ with Python's lock held (freeing a remote handle
waits for the device's answer), and a relay thread would then never run.

Protocol with the parent: one JSON line on stdin (host, port, token, tls_cert, where); one line on stdout,
``port N`` or ``error MESSAGE``. The process ends when the relayed connection ends or stdin closes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

from bndeploy.errors import BndeployError

from .channel import Channel, pump, secure_client
from .deadline import remaining, socket_problem

TUNNEL_MAIN = "from bndeploy.runtime.remote.tunnel import main; main()"


def open_tunnel(host: str, port: int, channel: Channel, where: str, deadline: float) -> int:
    """Start the tunnel process; return the loopback port TVM's client connects to."""
    config = {"host": host, "port": port, "token": channel.token, "where": where, "timeout": remaining(deadline),
              "tls_cert": str(channel.tls_cert) if channel.tls_cert else None}
    process = subprocess.Popen([sys.executable, "-c", TUNNEL_MAIN], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    process.stdin.write(json.dumps(config) + "\n")
    process.stdin.flush()  # stdin stays open: the tunnel ends when this process does
    threading.Thread(target=process.wait, name="bndeploy-tunnel-reaper", daemon=True).start()
    if not select.select([process.stdout], [], [], remaining(deadline))[0]:
        process.kill()
        raise BndeployError(f"no answer from {where} within the RPC timeout (TLS and token handshake)")
    kind, _, value = process.stdout.readline().strip().partition(" ")
    if kind != "port":
        process.kill()
        raise BndeployError(value or f"the connection to {where} failed (the tunnel process ended)")
    return int(value)


def serve_tunnel(config: dict) -> None:
    """Connect, pass TLS and the token, then relay one loopback connection over it."""
    channel = Channel(config["token"], Path(config["tls_cert"]) if config["tls_cert"] else None)
    try:
        remote = socket.create_connection((config["host"], config["port"]), timeout=config["timeout"])
    except OSError as e:
        raise BndeployError(f"cannot open an RPC session with {config['where']}: {socket_problem(e)}") from None
    remote = secure_client(remote, channel, config["where"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(config["timeout"])
    print(f"port {listener.getsockname()[1]}", flush=True)
    try:
        local, _ = listener.accept()
    finally:
        listener.close()
    threading.Thread(target=exit_when_parent_leaves, daemon=True).start()
    pump(local, remote)


def exit_when_parent_leaves() -> None:
    sys.stdin.read()
    os._exit(0)


def main() -> None:
    try:
        serve_tunnel(json.loads(sys.stdin.readline()))
    except BndeployError as e:
        print(f"error {e}", flush=True)
        os._exit(2)
    except OSError:
        pass
    os._exit(0)

