"""`bndeploy device serve|tracker|list`: the device side of checking an artifact over TVM RPC.

On the device (Raspberry Pi, Jetson; only apache-tvm, numpy and bndeploy's runtime installed):

    bndeploy device serve --tracker 192.168.1.10:9190 --key rpi4 --host 0.0.0.0 \
        --allow approved.sha256 --token-file ~/.bndeploy-token --tls-cert device.crt --tls-key device.key

On the machine that compiles (or anywhere both can reach):

    bndeploy device token ~/.bndeploy-token         # a new shared secret (copy it to the device)
    bndeploy device tracker --host 0.0.0.0 --token-file ... --tls-cert ... --tls-key ...
    bndeploy device list --tracker 127.0.0.1:9190 --token-file ... --tls-cert ...
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

from bndeploy.errors import EXIT_ERROR, EXIT_OK, BndeployError, exit_code_for_signal
from bndeploy.runtime.remote import (
    DEFAULT_SERVER_PORT,
    DEFAULT_TIMEOUT,
    DEFAULT_TRACKER_PORT,
    RpcEndpoint,
    RunningService,
    parse_address,
    registered_keys,
    start_server,
    start_tracker,
    tracker_summary,
)
from bndeploy.runtime.remote.channel import TOKEN_ENV, Channel, resolve_token, write_token_file
from bndeploy.runtime.remote.guarded import DEFAULT_MAX_UPLOAD, ServeGuard

WATCH_PERIOD = 0.5  # seconds between liveness checks of the serving thread


def register(sub) -> None:
    device = sub.add_parser("device", help="serve this machine as a remote device for `bndeploy check --rpc`")
    actions = device.add_subparsers(dest="action", metavar="ACTION", required=True)

    serve = actions.add_parser("serve", help="run TVM's RPC server here (works under qemu-user too)")
    serve.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker (else: direct mode)")
    serve.add_argument("--key", default="", help="device key to register under (needed with --tracker), e.g. rpi4")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=DEFAULT_SERVER_PORT, help="port to listen on (default %(default)s)")
    serve.add_argument("--custom-addr", metavar="ADDR", help="address the tracker hands to clients (default: as the tracker sees this machine)")
    serve.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    policy = serve.add_argument_group("what clients may run here (a non-loopback --host needs one of these)")
    policy.add_argument("--allow", action="append", metavar="PATH", default=[],
                        help="load only these libraries: a file of sha256 digests (sha256sum's output), an artifact "
                             "directory or its artifact.json, or a folder of artifacts; repeatable; re-read when it "
                             "changes and on SIGHUP")
    policy.add_argument("--allow-any-library", action="store_true",
                        help="load any library a client uploads, as TVM's server does (`bndeploy tune --rpc` needs it): "
                             "whoever can connect runs code here")
    policy.add_argument("--max-upload", type=float, metavar="MIB",
                        help=f"refuse uploads (and RPC messages) above this size (default {DEFAULT_MAX_UPLOAD >> 20})")
    add_channel_arguments(serve, server=True)
    serve.set_defaults(func=serve_command)

    tracker = actions.add_parser("tracker", help="run a TVM RPC tracker here (devices register, clients request)")
    tracker.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for the network)")
    tracker.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT, help="port to listen on (default %(default)s)")
    tracker.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    add_channel_arguments(tracker, server=True)
    tracker.set_defaults(func=tracker_command)

    listing = actions.add_parser("list", help="list the devices registered with a tracker")
    listing.add_argument("--tracker", metavar="HOST:PORT", required=True)
    add_channel_arguments(listing, server=False)
    listing.set_defaults(func=list_command)

    token = actions.add_parser("token", help="write a new random token to FILE (mode 600) for --token-file")
    token.add_argument("file", metavar="FILE")
    token.set_defaults(func=token_command)


def add_channel_arguments(parser, server: bool) -> None:
    """--token/--token-file (and $BNDEPLOY_RPC_TOKEN), --tls-cert (and a server's --tls-key)."""
    group = parser.add_argument_group("who may connect (token) and the encrypted channel (TLS)")
    group.add_argument("--token-file", metavar="FILE",
                       help=f"the shared secret, in a file only its owner can read (else ${TOKEN_ENV}); "
                            "`bndeploy device token FILE` makes one")
    group.add_argument("--token", help="the shared secret itself (other users see it in `ps`: prefer --token-file)")
    if server:
        group.add_argument("--tls-cert", metavar="PEM", help="TLS: this machine's certificate (with --tls-key)")
        group.add_argument("--tls-key", metavar="PEM", help="TLS: the certificate's private key")
    else:
        group.add_argument("--tls-cert", metavar="PEM",
                           help="TLS: trust only this certificate (the device's and the tracker's; concatenate if they differ)")


def channel_from_args(args) -> Channel:
    token = resolve_token(args.token, args.token_file)
    key = getattr(args, "tls_key", None)
    if key and not args.tls_cert:
        raise BndeployError("--tls-key needs --tls-cert (the certificate of that key)")
    return Channel(token, Path(args.tls_cert) if args.tls_cert else None, Path(key) if key else None)


def add_rpc_arguments(parser) -> None:
    """--rpc/--key (through a tracker), --rpc-server (direct) and --rpc-timeout, for `check` and `run`."""
    group = parser.add_argument_group("run on a remote device (TVM RPC; see `bndeploy device serve`)")
    group.add_argument("--rpc", metavar="HOST:PORT", help="RPC tracker; the device is the one registered under --key")
    group.add_argument("--key", help="device key at the tracker (e.g. rpi4)")
    group.add_argument("--rpc-server", metavar="HOST:PORT", help="a device's RPC server, reached directly (no tracker)")
    group.add_argument("--rpc-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="give up on the device after this long (default %(default)g)")
    group.add_argument("--token-file", metavar="FILE",
                       help=f"the device's (and tracker's) token, in a file only you can read (else ${TOKEN_ENV})")
    group.add_argument("--token", help="the token itself (other users see it in `ps`: prefer --token-file)")
    group.add_argument("--tls-cert", metavar="PEM", help="TLS: trust only this certificate (the device's and the tracker's)")


def endpoint_from_args(args) -> RpcEndpoint | None:
    """The device chosen by add_rpc_arguments' options, or None to run here."""
    if args.rpc and args.rpc_server:
        raise BndeployError("give --rpc HOST:PORT --key KEY (tracker) or --rpc-server HOST:PORT (direct), not both")
    if args.key and not args.rpc:
        raise BndeployError("--key names a device at a tracker: give the tracker with --rpc HOST:PORT")
    if not (args.rpc or args.rpc_server):
        if args.token or args.token_file or args.tls_cert:
            raise BndeployError("--token, --token-file and --tls-cert are for a remote device: give --rpc or --rpc-server")
        return None
    channel = channel_from_args(args)
    if args.rpc:
        if not args.key:
            raise BndeployError("--rpc needs --key: the key the device's server registered with (bndeploy device list --tracker ...)")
        return RpcEndpoint.tracker(args.rpc, args.key, args.rpc_timeout, channel)
    return RpcEndpoint.server(args.rpc_server, timeout=args.rpc_timeout, channel=channel)


def serve_command(args) -> int:
    use_runtime_library()
    tracker = parse_address(args.tracker, "tracker") if args.tracker else None
    if tracker and not args.key:
        raise BndeployError("--tracker needs --key: the name clients ask the tracker for (e.g. --key rpi4)")
    guard = serve_guard_from_args(args)
    service = start_server(args.host, args.port, tracker, args.key, args.custom_addr, args.quiet, guard=guard)
    where = f"registered with tracker {args.tracker} as key {args.key!r}" if tracker else f"direct mode, key {args.key!r}"
    if args.allow_any_library and not is_loopback(args.host):
        announce(f"bndeploy device: warning: --allow-any-library on {args.host}: whoever can connect"
                 f"{' with the token' if guard and guard.channel.token else ''} runs code on this machine")
    announce(f"bndeploy device: RPC server listening on {service.host}:{service.port} ({where}); Ctrl-C stops it")
    if service.guard:
        announce(f"bndeploy device: serving {service.guard}")
    if service.reload is not None:
        reload = service.reload
        signal.signal(signal.SIGHUP, lambda signum, frame: reload())
    return serve_until_stopped(service)


def serve_guard_from_args(args) -> ServeGuard | None:
    """The approved-only server's settings, or None for TVM's own server (loopback or --allow-any-library,
    without token or TLS), which loads any library."""
    channel = channel_from_args(args)
    if args.allow and args.allow_any_library:
        raise BndeployError("--allow (approved libraries only) and --allow-any-library contradict each other: give one")
    if not args.allow and not args.allow_any_library:
        if not is_loopback(args.host):
            raise BndeployError(
                f"serving on {args.host} would run any library anyone on the network uploads: approve what may run "
                "with --allow FILE|ARTIFACT_DIR (see README: Check on a device), or opt in with --allow-any-library "
                "on a network you trust (tuning)")
        if not channel.plain:
            raise BndeployError("--token/--tls-cert need a library policy: --allow PATH (approved only) or --allow-any-library")
    max_upload = DEFAULT_MAX_UPLOAD if args.max_upload is None else int(args.max_upload * (1 << 20))
    if max_upload <= 0:
        raise BndeployError(f"--max-upload must be a positive number of MiB, got {args.max_upload:g}")
    if not args.allow and channel.plain:
        if args.max_upload is not None:
            raise BndeployError("--max-upload is enforced by the approved-only server: add --allow, --token or --tls-cert")
        return None
    return ServeGuard(tuple(Path(p) for p in args.allow), bool(args.allow_any_library), max_upload, channel)


def is_loopback(host: str) -> bool:
    """Every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        return False


def tracker_command(args) -> int:
    use_runtime_library()
    channel = channel_from_args(args)
    service = start_tracker(args.host, args.port, args.quiet, channel=channel)
    announce(f"bndeploy device: RPC tracker listening on {service.host}:{service.port}; Ctrl-C stops it")
    if service.guard:
        announce(f"bndeploy device: tracker requires {service.guard}")
    return serve_until_stopped(service)


def token_command(args) -> int:
    write_token_file(Path(args.file))
    print(f"wrote a new token to {args.file} (mode 600): give it to the device, the tracker and each client "
          "with --token-file")
    return 0


def list_command(args) -> int:
    host, port = parse_address(args.tracker, "tracker")
    summary = tracker_summary(host, port, channel=channel_from_args(args))
    keys = registered_keys(summary)
    queues = summary.get("queue_info", {})
    if not keys:
        print(f"tracker {host}:{port}: no device registered")
    for key, count in sorted(keys.items()):
        queue = queues.get(key, {})
        print(f"{key}: {count} server(s), {queue.get('free', '?')} free, {queue.get('pending', '?')} pending")
    return 0


def use_runtime_library() -> None:
    """Load TVM's runtime library, not the compiler: measured under qemu-aarch64, importing TVM's
    RPC server takes 8.7 s and 137 MB this way against 23.6 s and 366 MB with the full library."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


def announce(line: str) -> None:
    print(line, flush=True)


def serve_until_stopped(service: RunningService) -> int:
    """Block until Ctrl-C / SIGTERM (exit 0) or the serving thread dies (exit 2); never returns to the
    interpreter's shutdown, which would wait forever for TVM's non-daemon serving thread."""
    signal.signal(signal.SIGTERM, _interrupt_server_only)
    code = EXIT_OK
    try:
        while service.alive():
            time.sleep(WATCH_PERIOD)
        print(f"bndeploy device: error: the {service.what} stopped unexpectedly (see the log above)", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print(f"bndeploy device: {service.what} on {service.host}:{service.port} stopped", file=sys.stderr)
    stop_sessions()
    service.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop_sessions() -> None:
    """End the forked session processes (a client mid-run gets a closed connection, not a hang)."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(2)
        if child.is_alive():
            child.kill()


_SERVER_PID = os.getpid()


def _interrupt_server_only(signum, frame):
    """SIGTERM stops the server cleanly; a forked session process (TVM ends one whose session timed
    out with SIGTERM) inherits this handler and must just exit."""
    if os.getpid() != _SERVER_PID:
        os._exit(exit_code_for_signal(signum))
    raise KeyboardInterrupt
