"""`bndeploy tune`: a thin layer over bndeploy.compile.tuning.tune_model."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    tune = subparsers.add_parser("tune", help="search faster kernel schedules for a model with MetaSchedule",
                                 description="Tune a model's CPU kernels (as `bndeploy compile` builds them) with "
                                 "MetaSchedule, measured here or on boards behind a TVM RPC tracker; a tuned "
                                 "schedule is kept only where it beats bndeploy's default. Use the folder with "
                                 "`bndeploy compile --tuned DIR`.")
    tune.add_argument("onnx", help="the ONNX model")
    tune.add_argument("--target", "-t", required=True, help="the CPU target to tune for (as for compile)")
    tune.add_argument("--out", "-o", required=True, help="the tuning folder to write")
    tune.add_argument("--trials", type=int, default=64, help="MetaSchedule measurements over all kernels (default: %(default)s)")
    tune.add_argument("--rpc", metavar="HOST:PORT", help="measure on boards registered with this TVM RPC tracker")
    tune.add_argument("--key", help="the boards' key at the tracker (with --rpc)")
    tune.add_argument("--timeout", type=float, default=120.0, help="seconds per build and per measurement")
    tune.add_argument("--num-cores", type=int, help="cores of the measuring machine (default: this machine's)")
    tune.add_argument("--force", action="store_true", help="replace an existing tuning folder")
    tune.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from bndeploy.compile.tuning import TuneSettings, tune_model

    settings = TuneSettings(trials=args.trials, rpc=args.rpc, key=args.key, timeout_s=args.timeout,
                            num_cores=args.num_cores, force=args.force)
    report = tune_model(args.onnx, args.target, args.out, settings, progress=_progress)
    print(report.table())
    return 0


def _progress(message: str) -> None:
    print(f"bndeploy tune: {message}", file=sys.stderr, flush=True)
