"""What the generated machine code of a CPU build does in its loops: vector FMAs and stack traffic.

A register-tiled kernel is only as good as its inner loop: the accumulators must stay in vector
registers (no stack stores and reloads) and the arithmetic must be vector FMAs. This reads LLVM's
assembly for the library (TVM's `inspect_source("asm")`, for any target, cross-compiled ones included)
and reports, for every loop (a label with a backward branch to it) that contains vector FMAs, how many
FMAs and how many stack accesses it has, and how many of those move vector registers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Per architecture: a vector FMA, a stack access, a vector register operand.
_PATTERNS = {
    # x86: rbp is an ordinary register in LLVM's frame-pointer-less code; the stack is what rsp addresses.
    "x86_64": (r"\bvfmadd\d+ps\b", r"\(%rsp[),]", r"%[xyz]mm\d+"),
    "aarch64": (r"\bfmla\s+v\d+\.4s", r"\[(sp|x29)\b", r"\b[qv]\d+\b"),
    "arm": (r"\b(vfma|vmla)\.f32\s+q\d+", r"\[sp\b", r"\b[qd]\d+\b"),
}
_LABEL = re.compile(r"^(\.?L[\w.$]+):")
_BRANCH = re.compile(r"^\s+(j\w+|b(?:\.\w+)?|b\w\w|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*(\.?L[\w.$]+)\s*$")


@dataclass(frozen=True)
class LoopStats:
    label: str
    instructions: int
    fmas: int
    stack_accesses: int
    vector_stack_accesses: int  # spills and reloads of vector registers
    innermost: bool  # no other loop inside it
    own_fmas: int = 0  # outside the loops nested in it
    own_vector_stack_accesses: int = 0
    own_body: tuple[str, ...] = field(default=(), repr=False, compare=False)  # its instructions outside nested loops


_FUNCTION = re.compile(r"^\s*\.type\s+([\w.$]+),\s*[@%]function")
_COMPUTE_SUFFIX = "_compute_"  # the kernel's body; its parallel loops follow as .L__tvm_parallel_lambda*


def kernel_assembly(asm: str) -> dict[str, str]:
    """The assembly of each kernel of a TVM CPU library, by kernel name: its body (`NAME_compute_`, or
    `NAME` when it has no wrapper) and the parallel-loop functions LLVM outlined from it, which follow it."""
    kernels: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        function = _FUNCTION.match(line)
        if function:
            name = function.group(1)
            if name.startswith(".L"):
                pass  # an outlined parallel loop: stays with the kernel before it
            elif name.endswith(_COMPUTE_SUFFIX):
                current = name[: -len(_COMPUTE_SUFFIX)]
            else:
                current = None  # a packed-call wrapper or a runtime helper
        if current is not None:
            kernels.setdefault(current, []).append(line)
    return {name: "\n".join(lines) for name, lines in kernels.items()}


def fma_pattern(arch: str) -> re.Pattern:
    """A vector FMA instruction of the architecture."""
    return re.compile(_PATTERNS[arch][0])


def arch_of_triple(triple: str) -> str:
    arch = triple.split("-")[0]
    if arch.startswith("x86_64"):
        return "x86_64"
    if arch.startswith("aarch64"):
        return "aarch64"
    if arch.startswith(("armv7", "arm")):
        return "arm"
    raise ValueError(f"no FMA/stack patterns for {triple!r}")


def _numbered(lines: list[str], start: int, stop: int):
    return [(index, lines[index]) for index in range(start, stop) if not _LABEL.match(lines[index].strip())]


# aarch64: x29 is the frame pointer only in a function that sets it from sp; a leaf function without a
# frame (an outlined parallel loop that calls nothing) may use it as an ordinary register.
_FRAME_POINTER_SETUP = re.compile(r"^\s*(mov|add)\s+x29,\s*sp\b")


def _stack_access_test(lines: list[str], arch: str, stack: re.Pattern):
    """(line index, line) -> whether the line accesses the stack."""
    if arch != "aarch64":
        return lambda _index, line: bool(stack.search(line))
    sp_only = re.compile(r"\[sp\b")
    frame_pointer = []  # per line: has its function set x29 from sp by then (its prologue comes first)
    has_frame = False
    for line in lines:
        has_frame = not _FUNCTION.match(line) and (has_frame or bool(_FRAME_POINTER_SETUP.match(line)))
        frame_pointer.append(has_frame)
    return lambda index, line: bool((stack if frame_pointer[index] else sp_only).search(line))


def fma_loops(asm: str, arch: str) -> list[LoopStats]:
    """Every loop of the assembly that issues vector FMAs, smallest first."""
    fma, stack, vector = (re.compile(p) for p in _PATTERNS[arch])
    lines = [line for line in asm.splitlines() if line.strip() and not line.lstrip().startswith(("#", "//", "@", ".cfi"))]
    on_stack = _stack_access_test(lines, arch, stack)
    labels: dict[str, int] = {}
    spans = []  # (label, first line, back-branch line)
    for index, line in enumerate(lines):
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = index
            continue
        branch = _BRANCH.match(line)
        if branch and branch.group(2) in labels:
            spans.append((branch.group(2), labels[branch.group(2)], index))
    loops = []
    for label, first, last in spans:
        nested = [(f, l) for _, f, l in spans if first <= f and l <= last and (f, l) != (first, last)]
        numbered = _numbered(lines, first + 1, last + 1)
        own = [(index, line) for index, line in numbered if not any(f <= index <= l for f, l in nested)]
        fmas = sum(1 for _, line in numbered if fma.search(line))
        if not fmas:
            continue
        stack_lines = [line for index, line in numbered if on_stack(index, line)]
        own_vector_stack = sum(1 for index, line in own if on_stack(index, line) and vector.search(line))
        loops.append(LoopStats(label, len(numbered), fmas, len(stack_lines),
                               sum(1 for line in stack_lines if vector.search(line)), not nested,
                               sum(1 for _, line in own if fma.search(line)), own_vector_stack,
                               tuple(line for _, line in own)))
    return sorted(loops, key=lambda loop: loop.instructions)
