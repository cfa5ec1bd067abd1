"""`bndeploy profile ARTIFACT`: where a compiled artifact spends its time, kernel by kernel.

Each kernel's time comes from TVM's VM instrumentation (a callback around every kernel call), as the
median over rounds of its total per run. Like the uninstrumented timing, each round starts after a
pause and an untimed run, then averages as many back-to-back runs as fill about `SAMPLE_S`: the rounds
spread over seconds, and a small artifact's kernels are timed in the steady state, not in the slow
first runs after a pause. Its work comes from artifact.json (`kernel_costs`: useful
FLOPs and the bytes of its tensors, recorded at compile time), and the bounds of this machine are
measured here: the FMA peak by the kernel every CPU artifact carries for that purpose (same ISA and
compiler as its kernels), the memory bandwidth by a parallel copy. A kernel's bound is the larger of
its FLOPs at peak and its bytes at bandwidth; "% of bound" is how close the median round runs to that,
"best round" how close the fastest round came (on a shared vCPU a neighbour's load can slow a kernel's
rounds by half while the FMA loop, which touches no memory, keeps its speed).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bndeploy.machine import cpu_description, measure_bandwidth, usable_cpus
from bndeploy.runtime.artifact import Artifact, load_artifact
from bndeploy.runtime.check import choose_inputs
from bndeploy.timing import SPIN_PAUSE_S, calls_per_sample, interleaved_medians_ms

VM_BUILTIN_PREFIX = "vm."


@dataclass
class MachineBounds:
    peak_gflops: float | None  # fp32 FMA peak of the artifact's ISA on this machine
    bandwidth_gbs: float
    peak_source: str

    def bound_ms(self, flops: int, nbytes: int) -> float | None:
        times = [nbytes / self.bandwidth_gbs / 1e6]
        if self.peak_gflops and flops:
            times.append(flops / self.peak_gflops / 1e6)
        return max(times)

    def percent_of_bound(self, flops: int, nbytes: int, ms: float) -> float | None:
        """How close work of `flops` and `nbytes` done in `ms` comes to this machine's bound for it."""
        bound = self.bound_ms(flops, nbytes)
        return 100 * bound / ms if bound and ms else None


@dataclass
class KernelProfile:
    name: str
    calls: int  # per run
    ms: float  # per run: median over rounds of the kernel's total time in one run
    flops: int  # per run
    nbytes: int  # per run
    kind: str = ""
    best_ms: float = 0.0  # per run: the fastest round's

    def rate(self) -> str:
        if self.flops and self.ms:
            return f"{self.flops / self.ms / 1e6:.1f} GFLOP/s"
        if self.nbytes and self.ms:
            return f"{self.nbytes / self.ms / 1e6:.1f} GB/s"
        return "-"


@dataclass
class Profile:
    artifact: str
    target: str
    cpu: str
    threads: int
    rounds: int
    runs_per_round: int  # back-to-back runs each round averages
    run_ms: float  # median time of one whole run, not instrumented
    bounds: MachineBounds
    kernels: list[KernelProfile] = field(default_factory=list)

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    def share(self, kernel: KernelProfile) -> float:
        return kernel.ms / self.kernel_ms if self.kernel_ms else 0.0

    def class_shares(self) -> dict[str, float]:
        """Share of kernel time per kernel class, largest first."""
        shares: dict[str, float] = {}
        for kernel in self.kernels:
            shares[kernel.kind] = shares.get(kernel.kind, 0.0) + self.share(kernel)
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    def percent_of_bound(self, kernel: KernelProfile, best: bool = False) -> float | None:
        """The median round's (or with `best`, the fastest round's) time against the kernel's bound."""
        return self.bounds.percent_of_bound(kernel.flops, kernel.nbytes, kernel.best_ms if best else kernel.ms)

    def table(self, top: int | None = None) -> str:
        header = ("kernel", "class", "calls", "ms", "share", "rate", "% of bound", "best round")
        rows = [header]
        for kernel in self.kernels[:top]:
            rows.append((kernel.name, kernel.kind, str(kernel.calls), f"{kernel.ms:.3f}", f"{100 * self.share(kernel):.1f}%",
                         kernel.rate(), format_percent(self.percent_of_bound(kernel)),
                         format_percent(self.percent_of_bound(kernel, best=True))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        hidden = len(self.kernels) - len(rows) + 1
        if hidden > 0:
            lines.append(f"... {hidden} more kernels (--top 0 shows all)")
        peak = f"{self.bounds.peak_gflops:.0f} GFLOP/s ({self.bounds.peak_source})" if self.bounds.peak_gflops else "not measured"
        classes = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in self.class_shares().items())
        return "\n".join([
            f"{self.artifact} (target {self.target}) on {self.cpu}, {self.threads} threads",
            f"one run: {self.run_ms:.3f} ms (median of {self.rounds} rounds of {self.runs_per_round}); kernels {self.kernel_ms:.3f} ms instrumented",
            f"bounds measured here: FMA peak {peak}, memory {self.bounds.bandwidth_gbs:.1f} GB/s (parallel copy)",
            f"time by class: {classes}",
            "",
            *lines,
        ])

    def as_dict(self) -> dict:
        data = asdict(self)
        for entry, kernel in zip(data["kernels"], self.kernels):
            entry["share"] = self.share(kernel)
            entry["percent_of_bound"] = self.percent_of_bound(kernel)
            entry["percent_of_bound_best_round"] = self.percent_of_bound(kernel, best=True)
        data["kernel_ms"] = self.kernel_ms
        data["class_shares"] = self.class_shares()
        return data


def format_percent(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "-"


def kernel_class(name: str) -> str:
    """A kernel's class, from the name TVM gives the fused function of its first op."""
    if "bndeploy_conv2d_depthwise" in name:
        return "conv depthwise"
    if "bndeploy_conv2d_direct" in name:
        return "conv"
    if "bndeploy_conv2d_winograd" in name:
        return "conv winograd"  # its FLOPs are the direct conv's: its rate may pass the FMA peak
    if "conv" in name:
        return "conv (generic TVM)"
    if "batch_stats" in name:
        return "batchnorm statistics"
    if "pool" in name:
        return "pooling"
    if "matmul" in name or "dense" in name:
        return "matmul"
    if name.startswith(("transpose", "fused_transpose", "layout_transform", "reshape")):
        return "layout"
    if name.startswith(("mean", "fused_mean", "sum", "max", "variance")):
        return "reduction"
    return "elementwise"


def profile(artifact_dir, inputs=None, seed: int | None = None, rounds: int = 10, device: str | None = None) -> Profile:
    artifact = load_artifact(artifact_dir, device)
    feeds, _, _ = choose_inputs(artifact, inputs, seed)
    return profile_loaded(artifact, feeds, rounds)


def profile_loaded(artifact: Artifact, feeds: dict, rounds: int = 10) -> Profile:
    runs_per_round = calls_per_sample(lambda: artifact.run(feeds))
    run_ms = interleaved_medians_ms({"run": lambda: artifact.run(feeds)}, rounds, runs_per_round)["run"]
    times, calls = _kernel_times(artifact, feeds, rounds, runs_per_round)
    costs = artifact.manifest.get("kernel_costs") or {}
    kernels = []
    for name, samples in times.items():
        cost = costs.get(name, {})
        per_run = calls[name] // (rounds * runs_per_round)
        kernels.append(KernelProfile(name, per_run, statistics.median(samples), cost.get("flops", 0) * per_run,
                                     cost.get("bytes", 0) * per_run, kernel_class(name), min(samples)))
    kernels.sort(key=lambda k: -k.ms)
    return Profile(str(artifact.directory), artifact.target_name, cpu_description(), usable_cpus(), rounds, runs_per_round, run_ms,
                   measure_bounds(artifact), kernels)


def _kernel_times(artifact: Artifact, feeds: dict, rounds: int,
                  runs_per_round: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per kernel: its time in one run, for each round (the mean over the round's runs); its calls in all."""
    per_round: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    started: dict[str, float] = {}
    current: dict[str, float] = {}

    def instrument(func, name, before_run, result, *args):
        if name.startswith(VM_BUILTIN_PREFIX):
            return 0
        if before_run:
            started[name] = time.perf_counter()
        else:
            current[name] = current.get(name, 0.0) + (time.perf_counter() - started[name]) * 1e3
            calls[name] = calls.get(name, 0) + 1
        return 0

    for _ in range(rounds):
        time.sleep(SPIN_PAUSE_S)  # rounds spread over seconds see a shared vCPU's slow and fast phases
        artifact.run(feeds)  # the first run after a pause is slow, and not instrumented
        current.clear()
        with artifact.instrumented(instrument):
            for _ in range(runs_per_round):
                artifact.run(feeds)
        per_round.append({name: total / runs_per_round for name, total in current.items()})
    names = {name for totals in per_round for name in totals}
    return {name: [totals.get(name, 0.0) for totals in per_round] for name in names}, calls


def measure_bounds(artifact: Artifact, samples: int = 7, spacing_s: float = 0.15) -> MachineBounds:
    """The FMA peak is the fastest of `samples` runs of the artifact's FMA loop spread over about a second:
    on shared machines a vCPU can run at half speed for a second at a time, and a peak is a maximum."""
    bandwidth = max(measure_bandwidth() for _ in range(2))
    entry = artifact.manifest.get("fma_peak") or {}
    kernel = artifact.library_function(entry["symbol"]) if entry.get("symbol") else None
    if kernel is None:
        return MachineBounds(None, bandwidth, "this artifact carries no FMA-peak kernel")
    import numpy as np
    import tvm.runtime

    x = tvm.runtime.tensor(np.ones(entry["x_shape"], np.float32))
    out = tvm.runtime.tensor(np.zeros(entry["out_shape"], np.float32))
    rates = spaced_rates(lambda: kernel(x, out), entry["flops"], samples, spacing_s)
    return MachineBounds(max(rates) / 1e9, bandwidth, f"{entry['isa']} FMA loop")


def spaced_rates(run, flops: float, samples: int, spacing_s: float) -> list[float]:
    """FLOP/s of `samples` timed calls of `run`, `spacing_s` apart. Each timed call follows an untimed one:
    the first run of a kernel after a pause can wait for the thread pool's sleeping workers (timed so, the
    FMA loop on an AMD EPYC Zen 5 with 2 vCPUs ran at 261-273 GFLOP/s, against 540-557 back to back)."""
    rates = []
    for _ in range(samples):
        time.sleep(spacing_s)
        run()
        start = time.perf_counter()
        run()
        rates.append(flops / (time.perf_counter() - start))
    return rates


def save_json(profile_result: Profile, path: Path) -> None:
    from bndeploy.files import write_json

    write_json(path, profile_result.as_dict())
