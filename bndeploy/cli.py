"""The ``bndeploy`` command: each subcommand is a thin layer over a Python API of the same name.

Exit codes (bndeploy.errors): 0 success (all checks pass), 1 a numerical mismatch, 2 an error (bad input,
missing device, corrupt artifact), 128 + N when stopped by signal N. Every subcommand module exposes ``register(subparsers)`` which adds its
parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from bndeploy import __version__
from bndeploy.errors import EXIT_ERROR, BndeployError, exit_code_for_signal
from bndeploy.extras import missing_message, missing_modules

# Subcommand modules, imported only when their command runs so `bndeploy run` on an edge device
# never imports torch or onnx.
SUBCOMMANDS = {
    "export": "bndeploy.export.cli",
    "compile": "bndeploy.compile.cli",
    "tune": "bndeploy.compile.tune_cli",
    "run": "bndeploy.runtime.cli",
    "check": "bndeploy.runtime.cli",
    "profile": "bndeploy.runtime.cli",
    "device": "bndeploy.runtime.device_cli",
    "pipeline": "bndeploy.pipeline",
    "bench": "bndeploy.bench",
    "debug": "bndeploy.reduce",
}
# The pip extra each subcommand needs beyond the runtime (bndeploy.extras); run, check, device need none.
COMMAND_EXTRAS = {"export": "export", "compile": "compile", "tune": "tune", "pipeline": "full", "bench": "full",
                  "debug": "compile"}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bndeploy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bndeploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = [command] if command in SUBCOMMANDS else list(SUBCOMMANDS)
    registered = set()
    for name in commands:
        missing = missing_modules(COMMAND_EXTRAS[name]) if name in COMMAND_EXTRAS else []
        if missing:
            _register_unavailable(sub, name, COMMAND_EXTRAS[name], missing)
        elif SUBCOMMANDS[name] not in registered:
            importlib.import_module(SUBCOMMANDS[name]).register(sub)
            registered.add(SUBCOMMANDS[name])
    return parser


def _register_unavailable(sub, name: str, extra: str, missing: list[str]) -> None:
    """A subcommand whose extra is not installed: listed in the help, and one error line when run."""
    parser = sub.add_parser(name, help=f"(not installed here: pip install 'bndeploy[{extra}]')", add_help=False,
                            prefix_chars="\0")  # takes any arguments, options included, and ignores them
    parser.add_argument("ignored", nargs="*")
    error = BndeployError(missing_message(extra, "this command", missing))
    parser.set_defaults(func=lambda args: _raise(error))


def _raise(error: Exception):
    raise error


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    _signals_received.clear()
    previous = _sigterm_interrupts()
    try:
        return int(args.func(args) or 0)
    except BndeployError as e:
        print(f"bndeploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception:
        # An interrupt raised inside a TVM callback comes back out of the FFI as a RuntimeError.
        if not _signals_received:
            raise
        return _interrupted(args.command)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_signals_received: list[int] = []


def _interrupted(command: str) -> int:
    print(f"bndeploy {command}: interrupted; nothing was left half-written", file=sys.stderr)
    return exit_code_for_signal(_signals_received[-1] if _signals_received else signal.SIGINT)


def _sigterm_interrupts() -> dict:
    """Make SIGTERM (kill, CI cancellation, container stop) unwind like Ctrl-C, so atomic_directory
    removes its temporary directory instead of the process dying with it half-written; SIGINT gets
    the same handler so that an interrupt is recognised even when TVM re-raises it as another error.
    Returns the previous handlers (none when not on the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        _signals_received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


if __name__ == "__main__":
    sys.exit(main())
