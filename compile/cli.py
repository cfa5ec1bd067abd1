"""`bndeploy compile`: a thin layer over bndeploy.compile.compile_model."""

from __future__ import annotations

import argparse
import sys

TARGET_HELP = (
    "compile target (repeatable): cpu (this machine), x86-64-avx2, x86-64-avx512, aarch64, cortex-a72, "
    "cortex-a76, cortex-a78ae, carmel, armv7, riscv64, cuda, cuda-sm75/80/86/87/89/90, or raw TVM target JSON"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("compile", help="compile an exported ONNX model into TVM artifacts",
                                   description="Compile an ONNX model (BatchNorm in inference or training "
                                   "mode) into one artifact directory per target.")
    parser.add_argument("onnx", help="the ONNX model (an export.json beside it is picked up)")
    parser.add_argument("--target", "-t", action="append", required=True, dest="targets", help=TARGET_HELP)
    parser.add_argument("--out", "-o", required=True,
                        help="artifact directory (with several targets: a folder holding one per target)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="compute dtype; float16 keeps BatchNorm statistics in float32")
    parser.add_argument("--running-var", choices=("onnx", "torch"), default="onnx",
                        help="training-mode running-variance update: onnx (population variance, the ONNX "
                        "spec) or torch (unbiased, as PyTorch)")
    parser.add_argument("--conv-algorithm", choices=("auto", "direct"), default="auto",
                        help="CPU targets: auto (3x3 stride-1 convs with 64+ channels by Winograd F(2x2, 3x3), "
                        "the rest by direct register-tiled kernels) or direct (every conv by the direct kernels)")
    parser.add_argument("--dump", action="store_true", help="write Relax IR, and the CPU library's assembly or the CUDA source, under dump/")
    parser.add_argument("--force", action="store_true", help="replace existing artifact directories")
    parser.add_argument("--tuned", metavar="DIR", help="a `bndeploy tune` folder: use the schedules it measured faster")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bndeploy.compile import CompileSettings, compile_model

    settings = CompileSettings(dtype=args.dtype, running_var=args.running_var, dump=args.dump, force=args.force,
                               tuned=args.tuned, conv_algorithm=args.conv_algorithm)
    written = compile_model(args.onnx, args.targets, args.out, settings, progress=_progress)
    for path in written:
        print(path)
    return 0


def _progress(message: str) -> None:
    print(f"bndeploy compile: {message}", file=sys.stderr, flush=True)
