"""Who may connect, and the wire in between: a shared token (challenge and answer, compared in constant
time), TLS from Python's ssl module, and the byte relays that put both in front of TVM's RPC, whose C++
side only talks on a plain socket.

What each protects: the token decides who gets a session (the token itself never crosses the wire, only
an HMAC of a fresh challenge); TLS keeps the bytes on the wire secret and unaltered and proves the server
holds the key of the certificate the client trusts; neither decides what code runs (the allowlist does,
guard.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import ssl
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from bndeploy.errors import BndeployError

TOKEN_ENV = "BNDEPLOY_RPC_TOKEN"
MIN_TOKEN_LENGTH = 16
HANDSHAKE_TIMEOUT = 10.0  # seconds a connecting peer has for TLS and the token
AUTH_MAGIC = b"BNDPTOK1"
NONCE_BYTES = 32
ACCEPTED, REFUSED = b"\x01", b"\x00"
TVM_RPC_MAGIC, TVM_TRACKER_MAGIC = 0xFF271, 0x2F271  # tvm.rpc.base's, so that no TVM import is needed here
CHUNK = 1 << 16


@dataclass(frozen=True)
class Channel:
    """How connections are secured. ``token``: the shared secret (never shown in a repr or a log).
    ``tls_cert``: on a server or tracker its own certificate (with ``tls_key``); on a client the
    certificate(s) it trusts, one PEM file (concatenate several for a tracker and devices)."""

    token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def plain(self) -> bool:
        return not self.token and self.tls_cert is None

    def describe(self) -> str:
        parts = (["token"] if self.token else []) + (["TLS"] if self.tls_cert else [])
        return " + ".join(parts) or "no token, no TLS"


class ConnectionRefused(Exception):
    """A peer the server turns away during the handshake; the text is the one line it logs."""


# --------------------------------------------------------------------------------------------------
# The token


def resolve_token(token: str | None, token_file: str | None, environ=os.environ) -> str | None:
    """--token-file, else --token, else $BNDEPLOY_RPC_TOKEN, else no token."""
    if token and token_file:
        raise BndeployError("give the token once: --token or --token-file, not both")
    if token_file:
        value = read_token_file(Path(token_file))
    else:
        value = token or environ.get(TOKEN_ENV) or None
    if value is not None and len(value.strip()) < MIN_TOKEN_LENGTH:
        raise BndeployError(f"the RPC token is shorter than {MIN_TOKEN_LENGTH} characters: make one with "
                            "`bndeploy device token FILE`")
    return value.strip() if value else None


def read_token_file(path: Path) -> str:
    """The token in ``path``, refused when the file is readable by anyone but its owner."""
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BndeployError(f"--token-file {path}: group or others may access it "
                                f"(mode {stat.S_IMODE(info.st_mode):o}): chmod 600 {path}")
        return path.read_text().strip()
    except OSError as e:
        raise BndeployError(f"--token-file {path}: cannot read it ({e.strerror})") from None


def write_token_file(path: Path) -> None:
    """A new random token in a new file only its owner can read (never overwrites)."""
    import secrets

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BndeployError(f"{path} already exists; keep it, or remove it to make a new token") from None
    except OSError as e:
        raise BndeployError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def token_answer(token: str, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), b"bndeploy-rpc-token" + nonce, hashlib.sha256).digest()


def present_token(sock: socket.socket, token: str, where: str) -> None:
    """Client side of the token handshake; a refusal is a BndeployError naming the reason."""
    sock.sendall(AUTH_MAGIC)
    try:
        nonce = recv_exactly(sock, NONCE_BYTES)
    except ConnectionError:
        raise BndeployError(f"{where} closed the connection at the token handshake: it takes no token "
                            "(drop --token), it requires TLS (--tls-cert), or it is not a bndeploy server or "
                            "tracker") from None
    sock.sendall(token_answer(token, nonce))
    if recv_exactly(sock, 1) != ACCEPTED:
        reason = sock.recv(200).decode("utf-8", "replace").strip() or "refused"
        raise BndeployError(f"{where} refused the connection: {reason} (give the token it was started with: "
                            f"--token-file, --token or ${TOKEN_ENV})")


def check_token(sock: socket.socket, token: str, tvm_magic: int) -> None:
    """Server side: accept only a client that answers the challenge with the token; else ConnectionRefused."""
    first = recv_exactly(sock, 4)
    if first != AUTH_MAGIC[:4]:
        if first == struct.pack("<i", tvm_magic):
            from tvm.rpc import base

            sock.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))  # a stock TVM client: "key mismatch"
        raise ConnectionRefused("no token (a client started without --token, or a stock TVM client)")
    if recv_exactly(sock, 4) != AUTH_MAGIC[4:]:
        raise ConnectionRefused("not a bndeploy client")
    nonce = os.urandom(NONCE_BYTES)
    sock.sendall(nonce)
    if not hmac.compare_digest(recv_exactly(sock, NONCE_BYTES), token_answer(token, nonce)):
        sock.sendall(REFUSED + b"bad token")
        raise ConnectionRefused("bad token")
    sock.sendall(ACCEPTED)


# --------------------------------------------------------------------------------------------------
# TLS


def server_tls_context(channel: Channel) -> ssl.SSLContext | None:
    if channel.tls_cert is None:
        return None
    if channel.tls_key is None:
        raise BndeployError("--tls-cert needs --tls-key (the certificate's private key) on a server or tracker")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(channel.tls_cert), str(channel.tls_key))
    except (OSError, ssl.SSLError) as e:
        raise BndeployError(f"cannot use --tls-cert {channel.tls_cert} with --tls-key {channel.tls_key}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    return context


def client_tls_context(channel: Channel) -> ssl.SSLContext | None:
    """Trust exactly the certificate(s) in --tls-cert (pinned: no host name check, no system CAs)."""
    if channel.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(channel.tls_cert))
    except (OSError, ssl.SSLError) as e:
        raise BndeployError(f"cannot read --tls-cert {channel.tls_cert}: {getattr(e, 'strerror', None) or e}") from None
    return context


def secure_client(sock: socket.socket, channel: Channel, where: str) -> socket.socket:
    """TLS (when the channel has a certificate) and then the token, on a connected socket."""
    context = client_tls_context(channel)
    if context is not None:
        try:
            sock = context.wrap_socket(sock)
        except ssl.SSLCertVerificationError:
            sock.close()
            raise BndeployError(f"{where} did not present the certificate in --tls-cert {channel.tls_cert} "
                                "(another server, or a man in the middle)") from None
        except (ssl.SSLError, ConnectionError) as e:
            sock.close()
            raise BndeployError(f"TLS with {where} failed ({e.__class__.__name__}: {e}): is it started "
                                "with --tls-cert and --tls-key?") from None
    if channel.token:
        present_token(sock, channel.token, where)
    return sock


def secure_server(conn: socket.socket, channel: Channel, context: ssl.SSLContext | None, tvm_magic: int) -> socket.socket:
    """TLS and the token on an accepted connection, within HANDSHAKE_TIMEOUT; else ConnectionRefused."""
    conn.settimeout(HANDSHAKE_TIMEOUT)
    try:
        if context is not None:
            if conn.recv(4, socket.MSG_PEEK) in {struct.pack("<i", m) for m in (tvm_magic, TVM_RPC_MAGIC, TVM_TRACKER_MAGIC)}:
                raise ConnectionRefused("a client without TLS (started without --tls-cert, or a stock TVM client)")
            conn = context.wrap_socket(conn, server_side=True)
        if channel.token:
            check_token(conn, channel.token, tvm_magic)
    except ssl.SSLError as e:
        raise ConnectionRefused(f"TLS handshake failed ({e.reason or e})") from None
    except (ConnectionError, TimeoutError) as e:
        raise ConnectionRefused(f"handshake not completed ({e.__class__.__name__})") from None
    return conn


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


# --------------------------------------------------------------------------------------------------
# Relays


class TooLarge(Exception):
    """A client sent an RPC message above the limit."""


class FrameLimit:
    """Follows TVM's RPC framing (each message: a little-endian uint64 length, then that many bytes) in
    the client-to-server stream and refuses a message above ``limit`` before it reaches TVM."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._header = b""
        self._body_left = 0

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                continue
            take = 8 - len(self._header)
            self._header += data[i:i + take]
            i += take
            if len(self._header) == 8:
                (nbytes,) = struct.unpack("<Q", self._header)
                self._header = b""
                if nbytes > self.limit:
                    raise TooLarge(f"an RPC message of {nbytes} bytes, over the limit of {self.limit}")
                self._body_left = nbytes


def pump(client: socket.socket, server: socket.socket, limit: FrameLimit | None = None,
         deadline: float | None = None) -> str:
    """Copy bytes both ways until one side closes ("closed") or the deadline passes ("timeout");
    ``limit`` sees the client-to-server bytes first. Works for TLS sockets (buffered records included)."""
    for sock in (client, server):
        sock.setblocking(False)
    while True:
        ready = [s for s in (client, server) if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready = select.select([client, server], [], [], wait)[0]
            if not ready and deadline is not None and time.monotonic() >= deadline:
                return "timeout"
        for source in ready:
            try:
                data = source.recv(CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            except OSError:
                return "closed"
            if not data:
                return "closed"
            if source is client and limit is not None:
                limit.feed(data)
            try:
                send_all(server if source is client else client, data)
            except OSError:
                return "closed"


def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (ssl.SSLWantWriteError, BlockingIOError):
            select.select([], [sock], [], 1.0)
        except ssl.SSLWantReadError:
            select.select([sock], [], [], 1.0)
