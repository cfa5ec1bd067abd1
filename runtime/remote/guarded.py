"""The approved-only device server and the token/TLS tracker (``bndeploy device serve --allow ...``,
``bndeploy device tracker --token-file ...``).

The server's own accept loop replaces TVM's (which hands the raw client socket to the session): per
connection it runs TLS and the token check (channel.py) and TVM's key handshake, then forks the session
process, which installs the guard (guard.py) and runs TVM's RPC loop on one end of a socket pair. The
accept loop relays between the client and the other end, refusing any RPC message above the upload limit.
One session at a time, as TVM's server; it registers with a tracker like TVM's (key, match keys).

The tracker is TVM's, on an internal loopback port, behind a front that lets through only connections
that passed TLS and the token.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bndeploy.errors import BndeployError

from .allowlist import Allowlist
from .channel import (
    Channel,
    ConnectionRefused,
    FrameLimit,
    TooLarge,
    pump,
    recv_exactly,
    secure_server,
    server_tls_context,
)
from .endpoint import RpcEndpoint

DEFAULT_MAX_UPLOAD = 512 << 20  # bytes: a library, or one input tensor, sent to the device
FRAME_SLACK = 1 << 20  # an upload's RPC message carries the file name and framing besides the data
TRACKER_PING = 2.0  # seconds between checks with the tracker while no client comes (as TVM's server)
UNMATCHED_RENEW = 6.0  # a match key handed out but unused this long is replaced (as TVM's server)
TRACKER_RETRY = 60.0  # seconds the server keeps trying to reach its tracker before it stops
SESSION_STOP = 5.0


@dataclass(frozen=True)
class ServeGuard:
    """What an approved-only server enforces. ``allow``: hash files, artifact directories, artifact.json
    files or folders of artifacts (re-read on change); ``any_library``: the owner's opt-in to load any
    library (tuning); ``max_upload``: bytes; ``channel``: the token and TLS certificate/key."""

    allow: tuple[Path, ...] = ()
    any_library: bool = False
    max_upload: int = DEFAULT_MAX_UPLOAD
    channel: Channel = field(default_factory=Channel)

    def describe(self, allowlist: Allowlist | None) -> str:
        libraries = ("any library (--allow-any-library)" if allowlist is None
                     else f"approved libraries only ({len(allowlist.digests())} approved)")
        return f"{libraries}, uploads up to {self.max_upload >> 20} MiB, {self.channel.describe()}"


def log(line: str) -> None:
    print(f"bndeploy device: {line}", flush=True)


# --------------------------------------------------------------------------------------------------
# The server


def start_guarded_server(host: str, port: int, guard: ServeGuard, tracker: tuple[str, int] | None = None,
                         key: str = "", custom_addr: str | None = None):
    from .server import RunningService

    allowlist = None if guard.any_library else Allowlist(guard.allow, log)
    context = server_tls_context(guard.channel)
    sock = listen(host, port)
    server = GuardedServer(sock, sock.getsockname()[1], key, tracker, custom_addr, guard, allowlist, context)
    thread = threading.Thread(target=server.run, name="bndeploy-rpc-server")
    thread.start()
    reload = allowlist.request_reload if allowlist else None
    return RunningService("RPC server", host, server.port, thread, sock, reload=reload,
                          guard=guard.describe(allowlist))


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=False, backlog=8)
    except OSError as e:
        raise BndeployError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class GuardedServer:
    def __init__(self, sock, port, key, tracker, custom_addr, guard: ServeGuard, allowlist, context) -> None:
        self.sock, self.port, self.key, self.tracker = sock, port, key, tracker
        self.custom_addr, self.guard, self.allowlist, self.context = custom_addr, guard, allowlist, context
        self.advertised = custom_addr  # the address the tracker hands clients (set when registering)

    def run(self) -> None:
        tracker_conn = None
        while True:
            try:
                if self.tracker and tracker_conn is None:
                    tracker_conn = self.register()
                stream, addr, opts = self.accept_client(tracker_conn)
            except OSError:
                if self.sock.fileno() < 0:
                    return  # closed: the server stops
                tracker_conn = close_quietly(tracker_conn)  # the tracker dropped: register again
                continue
            self.serve_session(stream, addr, opts)

    # tracker

    def register(self) -> socket.socket:
        from tvm.rpc import base

        from .tracker import tracker_socket

        endpoint = RpcEndpoint(self.tracker[0], self.tracker[1], via_tracker=True, timeout=30.0,
                               channel=self.client_channel())
        deadline = time.monotonic() + TRACKER_RETRY
        while True:
            try:
                conn = tracker_socket(endpoint, time.monotonic() + 10.0)
                break
            except (OSError, BndeployError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the tracker {self.tracker[0]}:{self.tracker[1]} is unreachable: {e}") from None
                time.sleep(2.0)
        conn.settimeout(30.0)
        self.advertised = self.custom_addr or conn.getsockname()[0]
        tracker_call(conn, [base.TrackerCode.UPDATE_INFO, {"key": "server:" + self.key, "addr": [self.advertised, self.port]}])
        return conn

    def client_channel(self) -> Channel:
        """Toward the tracker the server is a client: the same token, its certificate trusted."""
        return Channel(token=self.guard.channel.token, tls_cert=self.guard.channel.tls_cert)

    def put(self, tracker_conn, matchkey: str) -> None:
        from tvm.rpc import base

        tracker_call(tracker_conn, [base.TrackerCode.PUT, self.key, [self.port, matchkey], self.advertised])

    # clients

    def accept_client(self, tracker_conn):
        """The next client that passes TLS, the token and TVM's key check: (stream, address, options)."""
        from tvm.rpc import base

        matchkey = self.key
        if tracker_conn is not None:
            matchkey = base.random_key(self.key)
            self.put(tracker_conn, matchkey)
        unmatched = 0
        while True:
            if tracker_conn is not None and not select.select([self.sock], [], [], TRACKER_PING)[0]:
                pending = tracker_call(tracker_conn, [base.TrackerCode.GET_PENDING_MATCHKEYS])
                unmatched = 0 if matchkey in pending else unmatched + 1
                if unmatched * TRACKER_PING > UNMATCHED_RENEW:
                    matchkey, unmatched = base.random_key(self.key, cmap={matchkey}), 0
                    self.put(tracker_conn, matchkey)
                continue
            conn, addr = self.sock.accept()
            try:
                stream = secure_server(conn, self.guard.channel, self.context, base.RPC_MAGIC)
                opts = tvm_key_handshake(stream, matchkey, self.key)
            except (ConnectionRefused, OSError) as e:
                log(f"refused {addr[0]}: {e}")
                close_quietly(conn)
                continue
            return stream, addr, opts

    # sessions

    def serve_session(self, stream: socket.socket, addr, opts: dict) -> None:
        from .guard import SessionPolicy

        log(f"connected from {addr[0]}:{addr[1]}")
        approved = None if self.allowlist is None else self.allowlist.digests()
        policy = SessionPolicy(approved, self.guard.max_upload)
        workdir = Path(tempfile.mkdtemp(prefix="bndeploy-session-"))
        private = Path(tempfile.mkdtemp(prefix="bndeploy-loaded-"))
        ours, theirs = socket.socketpair()
        process = multiprocessing.get_context("fork").Process(target=run_session, args=(theirs, policy, workdir, private))
        process.start()
        theirs.close()
        deadline = time.monotonic() + opts["timeout"] if "timeout" in opts else None
        try:
            outcome = pump(stream, ours, FrameLimit(self.guard.max_upload + FRAME_SLACK), deadline)
        except TooLarge as e:
            outcome = f"refused: {e}"
        finally:
            close_quietly(stream)
            close_quietly(ours)
            stop_process(process)
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(private, ignore_errors=True)
        log(f"finished serving {addr[0]}:{addr[1]} ({outcome})")


def run_session(sock: socket.socket, policy, workdir: Path, private: Path) -> None:
    """The forked session process: guard first, then TVM's RPC loop until the client leaves."""
    from tvm.rpc import _ffi_api

    from .guard import SessionGuard

    server_loop = _ffi_api.ServerLoop  # kept before the guard removes it from the registry
    os.chdir(workdir)
    SessionGuard(policy, workdir, private).install()
    server_loop(sock.fileno())


def tvm_key_handshake(stream: socket.socket, matchkey: str, key: str) -> dict:
    """TVM's RPC handshake, server side: [magic, key length, "client:MATCHKEY [-timeout=S]"]."""
    from tvm.rpc import base

    if struct.unpack("<i", recv_exactly(stream, 4))[0] != base.RPC_MAGIC:
        raise ConnectionRefused("not a TVM RPC client")
    (length,) = struct.unpack("<i", recv_exactly(stream, 4))
    if not 0 <= length <= 4096:
        raise ConnectionRefused("not a TVM RPC client")
    words = recv_exactly(stream, length).decode("utf-8", "replace").split()
    if not words or words[0] != "client:" + matchkey:
        stream.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
        raise ConnectionRefused("key mismatch")
    server_key = ("server:" + key).encode()
    stream.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(server_key)) + server_key)
    stream.settimeout(None)
    return {"timeout": float(w[len("-timeout="):]) for w in words[1:] if w.startswith("-timeout=")}


def tracker_call(conn: socket.socket, message: list):
    from tvm.rpc import base

    base.sendjson(conn, message)
    answer = base.recvjson(conn)
    if isinstance(answer, int) and answer != base.TrackerCode.SUCCESS:
        raise OSError(f"the tracker answered {answer!r} to {message[0]!r}")
    return answer


def stop_process(process) -> None:
    process.join(SESSION_STOP)
    if process.is_alive():
        process.terminate()
        process.join(SESSION_STOP)
    if process.is_alive():
        process.kill()
        process.join()


def close_quietly(sock) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
    return None


# --------------------------------------------------------------------------------------------------
# The tracker


def start_guarded_tracker(host: str, port: int, channel: Channel, quiet: bool = False):
    """TVM's tracker on an internal loopback port, reachable from the network only through TLS/the token."""
    from .server import RunningService, start_tracker

    context = server_tls_context(channel)
    sock = listen(host, port)
    internal = start_tracker("127.0.0.1", free_loopback_port(), quiet)
    thread = threading.Thread(target=tracker_front, args=(sock, internal.port, channel, context), name="bndeploy-tracker")
    thread.start()
    return RunningService("RPC tracker", host, sock.getsockname()[1], thread, sock, guard=channel.describe())


def tracker_front(sock: socket.socket, internal_port: int, channel: Channel, context) -> None:
    while True:
        try:
            conn, addr = sock.accept()
        except OSError:
            return  # closed: the tracker stops
        threading.Thread(target=relay_tracker_client, args=(conn, addr, internal_port, channel, context),
                         daemon=True).start()


def relay_tracker_client(conn, addr, internal_port: int, channel: Channel, context) -> None:
    from tvm.rpc import base

    try:
        stream = secure_server(conn, channel, context, base.RPC_TRACKER_MAGIC)
        stream.settimeout(None)
        inner = socket.create_connection(("127.0.0.1", internal_port))
    except (ConnectionRefused, OSError) as e:
        log(f"tracker refused {addr[0]}: {e}")
        close_quietly(conn)
        return
    try:
        pump(stream, inner)
    finally:
        close_quietly(stream)
        close_quietly(inner)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

