"""``bndeploy export``: a thin layer over ``bndeploy.export.export``."""

from __future__ import annotations

import argparse

from bndeploy.export.exporter import MODES, TRAIN_DROPOUT, ExportSettings, ModeNotWrittenError, export
from bndeploy.export.loader import load_model, parse_shape
from bndeploy.export.models import REFERENCE_MODELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a PyTorch model to ONNX (inference and/or train mode) with references",
                       description="Export MODEL to OUT/<mode>/{model.onnx, export.json, reference.npz}. MODEL is a "
                       "reference model name (see --list), torchvision:NAME (torchvision's definition, random weights with "
                       "calibrated BatchNorm statistics unless --weights), path/to/file.py:factory, or a saved "
                       "full-model .pt file.")
    p.add_argument("model", nargs="?", help="reference model name, torchvision:NAME, file.py:factory, or model.pt")
    p.add_argument("--mode", choices=[*MODES, "both"], default="both")
    p.add_argument("--input-shape", action="append", type=parse_shape, metavar="N,C,H,W",
                   help="input shape (repeat for several inputs); required for your own model")
    p.add_argument("--weights", help="state_dict file to load into the model made by file.py:factory")
    p.add_argument("--out", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated reference input")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic in the ONNX")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--train-dropout", choices=TRAIN_DROPOUT, help="train mode of a model with active dropout: "
                   "identity exports dropout as identity (recorded in export.json and noted in every check report); "
                   "without it such a train-mode export is refused, its output being random")
    p.add_argument("--list", action="store_true", help="list the reference models and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for spec in REFERENCE_MODELS.values():
            print(f"{spec.name:20s} {str(spec.input_shape):18s} {spec.summary}")
        return 0
    if not args.model or not args.out:
        raise SystemExit("bndeploy export: error: MODEL and --out are required (or --list)")
    modes = MODES if args.mode == "both" else (args.mode,)
    model = load_model(args.model, args.input_shape, args.weights, args.seed)
    settings = ExportSettings(modes=modes, dynamic_batch=args.dynamic_batch, force=args.force,
                              train_dropout=args.train_dropout)
    try:
        written = export(model, args.out, settings)
    except ModeNotWrittenError as e:  # the modes that could be written are there: say so, then the error
        _print_written(e.written)
        raise
    _print_written(written)
    return 0


def _print_written(written: dict) -> None:
    for mode, path in written.items():
        print(f"{mode:9s} -> {path}")
