"""The ``bndeploy`` command: each subcommand is a thin layer over a Python API of the same name.

Exit codes: 0 success (all checks pass), 1 a numerical mismatch, 2 an error (bad input, missing
device, corrupt artifact). Every subcommand module exposes ``register(subparsers)`` which adds its
parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bndeploy import __version__
from bndeploy.errors import BndeployError

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2

# Subcommand modules, imported only when their command runs so `bndeploy run` on an edge device
# never imports torch or onnx.
SUBCOMMANDS = {
    "export": "bndeploy.export.cli",
    "compile": "bndeploy.compile.cli",
    "run": "bndeploy.runtime.cli",
    "check": "bndeploy.runtime.cli",
    "device": "bndeploy.runtime.device_cli",
    "pipeline": "bndeploy.pipeline",
    "bench": "bndeploy.bench",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bndeploy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bndeploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else list(dict.fromkeys(SUBCOMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except BndeployError as e:
        print(f"bndeploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"bndeploy {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
