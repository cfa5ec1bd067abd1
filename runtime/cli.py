"""`bndeploy run` and `bndeploy check`: thin layers over load_artifact/Artifact.run and check()."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from bndeploy.compare import CHECK_STATS, DEFAULT_ERROR_QUANTILE, Gate
from bndeploy.errors import BndeployError
from bndeploy.runtime.check import REFERENCES, GoldenOutput, check, choose_inputs
from bndeploy.runtime.device_cli import add_rpc_arguments, endpoint_from_args
from bndeploy.runtime.remote import open_artifact
from bndeploy.runtime.samples import DataLoader, InputsDir
from bndeploy.tolerance import Tolerance, Tolerances, default_tolerance, parse_tolerance_option


def register(sub) -> None:
    register_profile(sub)
    run = sub.add_parser("run", help="run a compiled artifact on inputs and save its outputs")
    _add_common(run)
    run.add_argument("--out", required=True, help="output .npz, one array per ONNX output name")
    run.set_defaults(func=run_command)

    chk = sub.add_parser("check", help="compare an artifact's outputs with the torch/onnxruntime references")
    _add_common(chk)
    chk.add_argument("--against", default=",".join(REFERENCES),
                     help="comma-separated references: torch, onnxruntime, golden:DIR (default: %(default)s)")
    chk.add_argument("--atol", type=float, help="absolute tolerance for every output (default: per dtype and mode)")
    chk.add_argument("--rtol", type=float, help="relative tolerance for every output (default: per dtype and mode)")
    chk.add_argument("--tol", action="append", default=[], metavar="NAME=ATOL,RTOL", help="tolerance for one output (repeatable)")
    chk.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    chk.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML report (one testcase per output and reference)")
    chk.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML report with error charts")
    chk.add_argument("--check-stat", choices=CHECK_STATS, default="max",
                     help="error statistic that gates pass/fail: max (every element within tolerance), or the mean, "
                          "median or --error-quantile of error/allowed over the elements <= 1 (default: %(default)s)")
    chk.add_argument("--error-quantile", type=float, default=DEFAULT_ERROR_QUANTILE, metavar="Q",
                     help="the quantile reported, and gated on with --check-stat quantile (default: %(default)s)")
    chk.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    chk.add_argument("-v", "--verbose", action="store_true",
                     help="list every comparison and failure (default: the summary, then what failed or came closest)")
    _add_samples_arguments(chk)
    chk.add_argument("--locate", action="store_true", help="also find the first ONNX node whose output leaves "
                     "tolerance: each kernel's output compared with onnxruntime's as the artifact runs (runtime/locate.py)")
    chk.set_defaults(func=check_command)


def _add_samples_arguments(chk: argparse.ArgumentParser) -> None:
    """Many samples, task-level gates and goldens (runtime/samples.py, topk.py, golden.py)."""
    chk.add_argument("--inputs-dir", type=Path, metavar="DIR",
                     help="check every sample in DIR: one .npz/.npy per sample, or images (with --preprocess)")
    chk.add_argument("--preprocess", metavar="SPEC",
                     help="how images become inputs: imagenet, or resize=N|HxW,crop=N|HxW,mean=A/B/C,std=A/B/C,"
                          "scale=F,layout=nchw|nhwc (needs Pillow: bndeploy[images])")
    chk.add_argument("--data-loader", metavar="FILE.py:FUNCTION",
                     help="check every feed dict the function (no arguments) yields")
    chk.add_argument("--top-k-agreement", type=float, metavar="FRACTION",
                     help="also gate classifier outputs (2-D logits) on top-1 and top-5 agreement over all samples")
    chk.add_argument("--save-golden", type=Path, metavar="DIR",
                     help="when the check passes, write its inputs and reference outputs with their provenance to DIR "
                          "(check later with --against golden:DIR, no torch or onnx needed)")
    chk.add_argument("--force", action="store_true", help="replace an existing --save-golden directory")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", type=Path, help="artifact directory (artifact.json + library)")
    parser.add_argument("--inputs", type=Path, help=".npz keyed by input name, or .npy for a single input (default: the export's recorded inputs)")
    parser.add_argument("--seed", type=int, help="generate inputs from this seed instead")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the artifact's device)")
    add_rpc_arguments(parser)


def run_command(args) -> int:
    artifact = open_artifact(args.artifact, args.device, endpoint_from_args(args))
    inputs, source, _ = choose_inputs(artifact, args.inputs, args.seed)
    outputs = artifact.run(inputs)
    save_npz(args.out, outputs)
    described = ", ".join(f"{name} {a.dtype}{list(a.shape)}" for name, a in outputs.items())
    print(f"wrote {len(outputs)} outputs to {args.out} ({described}); inputs {source}")
    return 0


def check_command(args) -> int:
    if args.locate:
        refuse_remote_locate(args)
    report = check(
        args.artifact,
        against=args.against,
        tolerances=_tolerances_from_args(args),
        inputs=_inputs_from_args(args),
        seed=args.seed,
        device=args.device,
        remote=endpoint_from_args(args),
        gate=Gate(args.check_stat, args.error_quantile),
        top_k_agreement=args.top_k_agreement,
        save_golden=GoldenOutput(args.save_golden, args.force) if args.save_golden else None,
    )
    print(report.summary().splitlines()[-1] if args.quiet else report.summary(verbose=args.verbose))
    for path, write in ((args.json, report.write_json), (args.junit, report.write_junit), (args.html, report.write_html)):
        if path is not None:
            write(path)
    if args.locate:
        from bndeploy.runtime.locate import LocateSettings, locate

        tolerance = _tolerances_from_args(args)
        print()
        print(locate(args.artifact, inputs=args.inputs, seed=args.seed, device=args.device,
                     settings=LocateSettings(tolerance=tolerance.default if tolerance else None)).summary())
    return report.exit_code


def _inputs_from_args(args):
    given = [flag for flag, value in (("--inputs", args.inputs), ("--inputs-dir", args.inputs_dir),
                                      ("--data-loader", args.data_loader)) if value is not None]
    if len(given) > 1:
        raise BndeployError(f"give one of {', '.join(given)}")
    if args.preprocess is not None and args.inputs_dir is None:
        raise BndeployError("--preprocess describes the images of an --inputs-dir; give that directory too")
    if args.inputs_dir is not None:
        return InputsDir(args.inputs_dir, args.preprocess)
    if args.data_loader is not None:
        return DataLoader(args.data_loader)
    return args.inputs


def refuse_remote_locate(args) -> None:
    """--locate reads every kernel's output inside the VM, through a callback TVM's RPC cannot carry."""
    if endpoint_from_args(args) is not None:
        raise BndeployError(
            "--locate cannot run over RPC: it reads each kernel's output inside the VM through TVM's instrument "
            "callback, which must run in the device's own process and which TVM RPC cannot carry; run "
            "`bndeploy check ART --locate` on the device itself (it needs onnx and onnxruntime there), or compile "
            "the same model for this machine and locate there"
        )


def _tolerances_from_args(args) -> Tolerances | None:
    return tolerances_from_options(args.artifact, args.atol, args.rtol, args.tol)


def tolerances_from_options(artifact: str | Path, atol: float | None, rtol: float | None,
                            per_output_texts: list[str]) -> Tolerances | None:
    """check's --atol/--rtol/--tol (and the pytest plugin's) for one artifact: None keeps the defaults."""
    per_output = dict(parse_tolerance_option(text) for text in per_output_texts)
    if atol is None and rtol is None:
        return Tolerances(default=_artifact_default(artifact), per_output=per_output) if per_output else None
    base = _artifact_default(artifact)
    default = Tolerance(atol=base.atol if atol is None else atol, rtol=base.rtol if rtol is None else rtol)
    return Tolerances(default=default, per_output=per_output)


def _artifact_default(artifact: str | Path) -> Tolerance:
    from bndeploy.layout import read_artifact_manifest

    manifest = read_artifact_manifest(artifact)
    return default_tolerance(manifest.get("dtype", "float32"), manifest.get("mode", "inference"))


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    if path.suffix != ".npz":
        raise BndeployError(f"--out must end in .npz, got {path}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent.absolute())
    except OSError as e:
        raise BndeployError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def register_profile(sub) -> None:
    prof = sub.add_parser("profile", help="time an artifact kernel by kernel against this machine's bounds")
    prof.add_argument("artifact", type=Path, help="artifact directory (artifact.json + library)")
    prof.add_argument("--inputs", type=Path, help=".npz keyed by input name (default: the export's recorded inputs)")
    prof.add_argument("--seed", type=int, help="generate inputs from this seed instead")
    prof.add_argument("--rounds", type=int, default=10, help="runs timed (medians)")
    prof.add_argument("--top", type=int, default=15, help="kernels shown, slowest first (0: all)")
    prof.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    prof.set_defaults(func=profile_command)


def profile_command(args) -> int:
    from bndeploy.runtime.profile import profile, save_json

    result = profile(args.artifact, inputs=args.inputs, seed=args.seed, rounds=args.rounds)
    print(result.table(top=args.top or None))
    if args.json is not None:
        save_json(result, args.json)
    return 0
