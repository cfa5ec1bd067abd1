#!/usr/bin/env python3
"""A copy of the installed ONNX Runtime whose MLAS kernels stop at AVX2, for timing AVX2 code against AVX2 code.

ONNX Runtime picks its kernels from CPUID at start-up and has no switch for it, so on an AVX-512 host it
always runs AVX-512 code: `bndeploy bench --target x86-64-avx2` there compares bndeploy's AVX2 code with
ORT's AVX-512 code, not with what an AVX2-only CPU would run. This writes DIR/onnxruntime, a copy whose
MLAS platform set-up skips its AVX-512F branch (one conditional jump made unconditional; the AVX2/FMA
kernels it chose before that branch stay), with `__version__` suffixed "+no-avx512" so a bench table names
it, and prints DIR for PYTHONPATH:

    PYTHONPATH=$(.venv/bin/python scripts/ort-without-avx512.py /tmp/ort-avx2) \\
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        .venv/bin/bndeploy bench --suite zoo --target x86-64-avx2

(the two variables hold torch eager to AVX2 as well). A measurement aid, never a deployment: the timing
of the copy is ORT's AVX2 kernels on this CPU, not on an AVX2-only one.
"""
import importlib.util
import re
import shutil
import sys
from pathlib import Path

SUFFIX = "+no-avx512"
# MLAS's platform set-up: `test $0x10000, ebx-of-CPUID.7` (AVX512F) ; `je past_avx512` ; ... ;
# `test $0xe0, al` (XCR0 holds the opmask and ZMM state). Making the je a jmp skips every AVX-512 kernel.
AVX512F_BRANCH = re.compile(rb"\x41?\xf7[\xc0-\xc7]\x00\x00\x01\x00(\x74).{0,12}?\xa8\xe0", re.DOTALL)


def fail(message: str) -> None:
    sys.exit(f"ort-without-avx512: error: {message}")


def installed_package() -> Path:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        fail("onnxruntime is not installed in this Python: run it with the project's .venv/bin/python")
    return Path(spec.origin).parent


def patch_library(library: Path) -> None:
    data = bytearray(library.read_bytes())
    matches = list(AVX512F_BRANCH.finditer(data))
    if len(matches) != 1:
        fail(f"found {len(matches)} MLAS AVX-512F checks in {library.name} (expected 1; known to work with "
             "onnxruntime 1.32): this build is not supported, time AVX2 peers on an AVX2-only CPU instead")
    data[matches[0].start(1)] = 0xEB  # je rel8 -> jmp rel8
    library.write_bytes(data)


def mark_version(package: Path) -> None:
    init = package / "__init__.py"
    text = init.read_text()
    if not re.search(r"^__version__\s*=", text, flags=re.M):
        fail(f"no __version__ line in {init}: this onnxruntime layout is not supported")
    # Appended: the package sets __version__ more than once (the last from its build info).
    init.write_text(f"{text.rstrip()}\n\n__version__ += {SUFFIX!r}  # scripts/ort-without-avx512.py\n")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        fail("usage: ort-without-avx512.py DIR (an empty or new folder; prints DIR for PYTHONPATH)")
    target = Path(argv[0]).resolve()
    if target.exists() and any(target.iterdir()):
        fail(f"{target} is not empty: give a new folder")
    source = installed_package()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__"))
        libraries = sorted((staging / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
        if len(libraries) != 1:
            fail(f"expected one onnxruntime_pybind11_state library under {source / 'capi'}, found {len(libraries)}")
        patch_library(libraries[0])
        mark_version(staging / "onnxruntime")
        target.mkdir(parents=True, exist_ok=True)
        (staging / "onnxruntime").rename(target / "onnxruntime")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(target)


if __name__ == "__main__":
    main(sys.argv[1:])
