"""Predicted throughput of a CPU library's register tiles, by LLVM's machine-code analyser (llvm-mca).

For CPUs no board here can time (the ARM edge CPUs), a kernel's speed is shown by static analysis: the
hottest loop of each kernel (the one with the most vector FMAs of its own, `kernel_asm.fma_loops`) goes
through llvm-mca with a scheduling model of the target core, which gives cycles per iteration in steady
state. Predicted FLOP per cycle is the loop's FMAs x lanes x 2 over those cycles; the peak is what the same
model gives for a loop of independent FMAs of the same width, so the percentage compares like with like.

Limits, stated wherever a prediction is printed: llvm-mca assumes every load hits L1 and every branch is
predicted; it sees one loop, not the kernel's border loops, epilogue or parallel launch; and its model of
a core may be a relative's (LLVM 14 models Cortex-A72 to A78 and Neoverse N1 with Cortex-A57's scheduling
model; it has none for Carmel or Cortex-A78AE, which fall back to `FALLBACK_MODEL_CPU`).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass

from bndeploy.errors import BndeployError

from .kernel_asm import arch_of_triple, fma_loops, fma_pattern, kernel_assembly

MCA_ITERATIONS = 200

# The core whose scheduling model stands in when LLVM has none for the target's CPU.
FALLBACK_MODEL_CPU = {"aarch64": "neoverse-n1", "arm": "cortex-a57", "x86_64": "skylake-avx512"}

# Per architecture, by the widest register operand the loop's FMAs use: (pattern, lanes, an FMA into
# accumulator {acc}, independent accumulators for the peak loop).
_VECTOR_WIDTHS = {
    "x86_64": [(re.compile(r"%zmm"), 16, "vfmadd231ps %zmm30, %zmm31, %zmm{acc}", 24),
               (re.compile(r"%ymm"), 8, "vfmadd231ps %ymm14, %ymm15, %ymm{acc}", 12),
               (re.compile(r"%xmm"), 4, "vfmadd231ps %xmm14, %xmm15, %xmm{acc}", 12)],
    "aarch64": [(re.compile(r"\.4s"), 4, "fmla v{acc}.4s, v30.4s, v31.4s", 24)],
    "arm": [(re.compile(r"\bq\d+"), 4, "vfma.f32 q{acc}, q14, q15", 12)],
}
_BRANCH = re.compile(r"^\s*(j\w+|b(\.\w+)?|b\w\w|cbn?z|tbn?z)\s")
_TOTAL_CYCLES = re.compile(r"^Total Cycles:\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class LoopPrediction:
    kernel: str
    loop: str  # the loop's label in the assembly
    fmas: int  # vector FMAs per iteration
    lanes: int
    cycles: float  # per iteration, llvm-mca steady state
    peak_fmas_per_cycle: float  # the same model, independent FMAs of the same width
    model_cpu: str  # the scheduling model llvm-mca used

    @property
    def flop_per_cycle(self) -> float:
        return 2 * self.lanes * self.fmas / self.cycles

    @property
    def peak_flop_per_cycle(self) -> float:
        return 2 * self.lanes * self.peak_fmas_per_cycle

    @property
    def percent_of_peak(self) -> float:
        return 100 * self.flop_per_cycle / self.peak_flop_per_cycle


def llvm_mca() -> str:
    for name in ("llvm-mca", *(f"llvm-mca-{v}" for v in range(20, 13, -1))):
        found = shutil.which(name)
        if found:
            return found
    raise BndeployError("llvm-mca not found: install Debian's `llvm` package (.ci/install-edge does) to predict throughput")


def mca_cycles_per_iteration(instructions: list[str], triple: str, cpu: str) -> float:
    """Steady-state cycles of one iteration of a straight-line loop body (branches dropped: llvm-mca
    treats them as predicted, and the loop's own back-branch would need its label)."""
    body = "\n".join(line for line in instructions if not _BRANCH.match(line))
    result = subprocess.run([llvm_mca(), f"-mtriple={triple}", f"-mcpu={cpu}", f"-iterations={MCA_ITERATIONS}"],
                            input=body, capture_output=True, text=True)
    cycles = _TOTAL_CYCLES.search(result.stdout)
    if result.returncode != 0 or cycles is None or "not a recognized processor" in result.stderr:
        raise _NoModel(result.stderr.strip().splitlines()[0] if result.stderr.strip() else "llvm-mca failed")
    return int(cycles.group(1)) / MCA_ITERATIONS


class _NoModel(Exception):
    pass


@functools.lru_cache(maxsize=None)
def model_cpu(triple: str, cpu: str) -> str:
    """`cpu` when llvm-mca has a scheduling model for it, else the fallback for the architecture."""
    probe = [_VECTOR_WIDTHS[arch_of_triple(triple)][0][2].format(acc=0)]
    try:
        mca_cycles_per_iteration(probe, triple, cpu)
        return cpu
    except _NoModel:
        return FALLBACK_MODEL_CPU[arch_of_triple(triple)]


def _width_of(fma_lines: list[str], arch: str) -> tuple[int, str, int]:
    """(lanes, FMA template, independent accumulators) of the widest vector the FMAs use."""
    for pattern, lanes, template, accumulators in _VECTOR_WIDTHS[arch]:
        if any(pattern.search(line) for line in fma_lines):
            return lanes, template, accumulators
    raise ValueError("no vector FMA of a known width")


@functools.lru_cache(maxsize=None)  # one llvm-mca run per model and vector width, not per kernel
def peak_fmas_per_cycle(triple: str, cpu: str, template: str, accumulators: int) -> float:
    return accumulators / mca_cycles_per_iteration([template.format(acc=a) for a in range(accumulators)], triple, cpu)


def predict_kernels(asm: str, triple: str, cpu: str, only: str = "") -> list[LoopPrediction]:
    """The hottest FMA loop of every kernel (whose name contains `only`) in a library's assembly."""
    arch = arch_of_triple(triple)
    model = model_cpu(triple, cpu)
    fma = fma_pattern(arch)
    predictions = []
    for kernel, text in kernel_assembly(asm).items():
        loops = fma_loops(text, arch) if only in kernel else []
        if not loops:
            continue
        tile = max(loops, key=lambda loop: loop.own_fmas)
        lanes, template, accumulators = _width_of([l for l in tile.own_body if fma.search(l)], arch)
        cycles = mca_cycles_per_iteration(list(tile.own_body), triple, model)
        peak = peak_fmas_per_cycle(triple, model, template, accumulators)
        predictions.append(LoopPrediction(kernel, tile.label, tile.own_fmas, lanes, cycles, peak, model))
    return predictions


def format_predictions(rows: list[tuple[str, LoopPrediction]]) -> str:
    """A table of (case, prediction) rows, labelled as a prediction with its method."""
    header = ["case", "kernel", "FMAs/iter", "cycles/iter", "FLOP/cycle", "model peak", "% of peak", "model"]
    lines = [[case, p.kernel, str(p.fmas), f"{p.cycles:.2f}", f"{p.flop_per_cycle:.1f}",
              f"{p.peak_flop_per_cycle:.1f}", f"{p.percent_of_peak:.0f}%", p.model_cpu] for case, p in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.append("PREDICTED by llvm-mca (hottest loop of each kernel, steady state, loads assumed to hit L1, branches "
               "predicted); not a measurement")
    return "\n".join(out)
