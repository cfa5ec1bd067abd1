"""`bndeploy device serve|tracker|list`: the device side of checking an artifact over TVM RPC.

On the device (Raspberry Pi, Jetson; only apache-tvm, numpy and bndeploy's runtime installed):

    bndeploy device serve --tracker 192.168.1.10:9190 --key rpi4 --host 0.0.0.0

On the machine that compiles (or anywhere both can reach):

    bndeploy device tracker --host 0.0.0.0          # where devices register
    bndeploy device list --tracker 127.0.0.1:9190   # which devices are registered
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

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
    serve.set_defaults(func=serve_command)

    tracker = actions.add_parser("tracker", help="run a TVM RPC tracker here (devices register, clients request)")
    tracker.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for the network)")
    tracker.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT, help="port to listen on (default %(default)s)")
    tracker.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    tracker.set_defaults(func=tracker_command)

    listing = actions.add_parser("list", help="list the devices registered with a tracker")
    listing.add_argument("--tracker", metavar="HOST:PORT", required=True)
    listing.set_defaults(func=list_command)


def add_rpc_arguments(parser) -> None:
    """--rpc/--key (through a tracker), --rpc-server (direct) and --rpc-timeout, for `check` and `run`."""
    group = parser.add_argument_group("run on a remote device (TVM RPC; see `bndeploy device serve`)")
    group.add_argument("--rpc", metavar="HOST:PORT", help="RPC tracker; the device is the one registered under --key")
    group.add_argument("--key", help="device key at the tracker (e.g. rpi4)")
    group.add_argument("--rpc-server", metavar="HOST:PORT", help="a device's RPC server, reached directly (no tracker)")
    group.add_argument("--rpc-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="give up on the device after this long (default %(default)g)")


def endpoint_from_args(args) -> RpcEndpoint | None:
    """The device chosen by add_rpc_arguments' options, or None to run here."""
    if args.rpc and args.rpc_server:
        raise BndeployError("give --rpc HOST:PORT --key KEY (tracker) or --rpc-server HOST:PORT (direct), not both")
    if args.key and not args.rpc:
        raise BndeployError("--key names a device at a tracker: give the tracker with --rpc HOST:PORT")
    if args.rpc:
        if not args.key:
            raise BndeployError("--rpc needs --key: the key the device's server registered with (bndeploy device list --tracker ...)")
        return RpcEndpoint.tracker(args.rpc, args.key, args.rpc_timeout)
    if args.rpc_server:
        return RpcEndpoint.server(args.rpc_server, timeout=args.rpc_timeout)
    return None


def serve_command(args) -> int:
    use_runtime_library()
    tracker = parse_address(args.tracker, "tracker") if args.tracker else None
    if tracker and not args.key:
        raise BndeployError("--tracker needs --key: the name clients ask the tracker for (e.g. --key rpi4)")
    service = start_server(args.host, args.port, tracker, args.key, args.custom_addr, args.quiet)
    where = f"registered with tracker {args.tracker} as key {args.key!r}" if tracker else f"direct mode, key {args.key!r}"
    announce(f"bndeploy device: RPC server listening on {service.host}:{service.port} ({where}); Ctrl-C stops it")
    return serve_until_stopped(service)


def tracker_command(args) -> int:
    use_runtime_library()
    service = start_tracker(args.host, args.port, args.quiet)
    announce(f"bndeploy device: RPC tracker listening on {service.host}:{service.port}; Ctrl-C stops it")
    return serve_until_stopped(service)


def list_command(args) -> int:
    host, port = parse_address(args.tracker, "tracker")
    summary = tracker_summary(host, port)
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
