"""`bndeploy bench`: bndeploy's CPU build against ONNX Runtime and PyTorch eager, same process.

Each row: median over interleaved rounds (every implementation runs once per round, so shared or
throttled cores slow all of them alike), ratio to ONNX Runtime, achieved GFLOP/s or GB/s, and the
physical bound: GEMM peak measured with torch in the same run for convs, memory bandwidth measured
with a parallel numpy copy in the same run for BatchNorm (bytes moved / bandwidth).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bndeploy.timing import interleaved_medians_ms

log = logging.getLogger(__name__)

CONV_SUITE = [(1, 64, 56), (8, 128, 28), (1, 256, 14)]
BN_SHAPE = (32, 64, 56, 56)
EPS = 1e-5


@dataclass
class Row:
    case: str
    shape: str
    ms: dict[str, float]
    work: float  # FLOP for convs, bytes for BatchNorm
    unit: str  # "GFLOP/s" or "GB/s"
    bound_ms: float
    notes: list[str] = field(default_factory=list)

    def rate(self, impl: str) -> float:
        return self.work / (self.ms[impl] * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# timing


def parallel_copier(dst: np.ndarray, src: np.ndarray, threads: int):
    """A callable copying src to dst on `threads` threads (np.copyto releases the GIL): the memory
    bound must use every core the measured runtimes use, or a 2-thread kernel beats its own "bound"."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads)
    pieces = list(zip(np.array_split(dst.reshape(-1), threads), np.array_split(src.reshape(-1), threads)))
    return lambda: list(pool.map(lambda pair: np.copyto(*pair), pieces))


def measure_bandwidth(nbytes: int, rounds: int, threads: int) -> float:
    """GB/s of a parallel copy (read + write) of `nbytes`: the memory bound used for BatchNorm."""
    src = np.ones(nbytes // 4, np.float32)
    ms = interleaved_medians_ms({"copy": parallel_copier(np.empty_like(src), src, threads)}, rounds, 3)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_gemm_peak(threads: int) -> float:
    """GFLOP/s of a 2048^3 fp32 torch matmul: a practical FMA peak of this machine."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = interleaved_medians_ms({"mm": lambda: a @ b}, 5, 2)["mm"]
    return 2 * 2048**3 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# implementations


def host_target():
    """Exactly what `bndeploy compile --target cpu` builds for, so the bench measures what users get."""
    from bndeploy.compile.targets import host_cpu_target

    return host_cpu_target().tvm_target()


def ort_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def tvm_runner(mod):
    import tvm
    from tvm import relax

    from bndeploy.compile.cpu import build_cpu

    start = time.perf_counter()
    vm = relax.VirtualMachine(build_cpu(mod, host_target()), tvm.cpu())
    compile_s = time.perf_counter() - start

    def run(*arrays):
        return vm["main"](*arrays)

    return run, compile_s


# ---------------------------------------------------------------------------------------------
# cases


def conv_case(n: int, c: int, hw: int, threads: int, rounds: int, peak: float) -> Row:
    """Conv3x3 C->C pad 1 -> BatchNorm (eval) -> ReLU; bndeploy and ORT get the BN folded."""
    import onnx
    import torch
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw), dtype=np.float32)
    module = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
    bn = module[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    module.eval()
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    weight = module[0].weight.detach().numpy() * scale[:, None, None, None]
    bias = (bn.bias.detach().numpy() - bn.running_mean.numpy() * scale).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv_bn_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    run, compile_s = tvm_runner(from_onnx(model, keep_params_in_input=False))
    session = ort_session(model, threads)
    xt, x_torch = tvm.runtime.tensor(x), torch.from_numpy(x)
    torch.set_num_threads(threads)
    with torch.no_grad():
        expected = module(x_torch).numpy()
        error = float(np.abs(run(xt).numpy() - expected).max())
        ms = interleaved_medians_ms(
            {
                "bndeploy": lambda: run(xt),
                "onnxruntime": lambda: session.run(None, {"x": x}),
                "torch": lambda: module(x_torch),
            },
            rounds, 5,
        )
    flops = 2.0 * n * c * c * 9 * hw * hw
    return Row("conv3x3+bn+relu", f"{n},{c},{hw}", ms, flops, "GFLOP/s", flops / peak / 1e6,
               [f"compile {compile_s:.1f} s", f"max|err| vs torch {error:.1e}"])


def bn_relax_module(shape, training: bool):
    """Relax BatchNorm as bndeploy's graph passes emit it: inference as per-channel scale/shift,
    training as mean, variance = mean((x - mean)^2), normalise, running-statistic updates."""
    from tvm import relax

    c = shape[1]
    rng = np.random.default_rng(1)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    running_mean, running_var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    per_channel = lambda v: relax.const(v.reshape(1, c, 1, 1))  # noqa: E731
    with bb.function("main", [x]):
        with bb.dataflow():
            if not training:
                scale = gamma / np.sqrt(running_var + EPS)
                out = bb.emit_output(relax.op.add(relax.op.multiply(x, per_channel(scale)), per_channel(beta - running_mean * scale)))
            else:
                axes = [0, 2, 3]
                mean = bb.emit(relax.op.mean(x, axes, keepdims=True))
                centered = bb.emit(relax.op.subtract(x, mean))
                var = bb.emit(relax.op.mean(relax.op.square(centered), axes, keepdims=True))
                inv_std = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(EPS, "float32"))))
                y = bb.emit(relax.op.add(relax.op.multiply(relax.op.multiply(centered, inv_std), per_channel(gamma)), per_channel(beta)))
                momentum = relax.const(0.9, "float32")
                keep = lambda run, batch: relax.op.add(  # noqa: E731
                    relax.op.multiply(relax.const(run), momentum),
                    relax.op.multiply(relax.op.reshape(batch, (c,)), relax.const(0.1, "float32")))
                out = bb.emit_output(relax.Tuple([y, bb.emit(keep(running_mean, mean)), bb.emit(keep(running_var, var))]))
        bb.emit_func_output(out)
    return bb.get(), (gamma, beta, running_mean, running_var)


def bn_onnx_model(shape, training: bool, params):
    from onnx import TensorProto, helper, numpy_helper

    gamma, beta, running_mean, running_var = params
    outputs = ["y", "rm", "rv"] if training else ["y"]
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], outputs, epsilon=EPS, momentum=0.9,
                            training_mode=int(training))
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(a, n) for a, n in zip(params, ["g", "b", "m", "v"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def bn_case(training: bool, threads: int, rounds: int) -> Row:
    import torch
    import tvm

    shape = BN_SHAPE
    mod, params = bn_relax_module(shape, training)
    run, compile_s = tvm_runner(mod)
    session = ort_session(bn_onnx_model(shape, training, params), threads)
    x = (np.random.default_rng(2).standard_normal(shape, dtype=np.float32) * 2 + 3).astype(np.float32)
    xt, x_torch = tvm.runtime.tensor(x), torch.from_numpy(x)
    bn = torch.nn.BatchNorm2d(shape[1], eps=EPS, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(params[0]))
        bn.bias.copy_(torch.from_numpy(params[1]))
        bn.running_mean.copy_(torch.from_numpy(params[2]))
        bn.running_var.copy_(torch.from_numpy(params[3]))
    bn.train(training)
    torch.set_num_threads(threads)
    out = run(xt)
    y = (out[0] if training else out).numpy()
    copy_dst = np.empty_like(x)
    with torch.no_grad():
        expected = session.run(None, {"x": x})[0]
        ms = interleaved_medians_ms(
            {"bndeploy": lambda: run(xt), "onnxruntime": lambda: session.run(None, {"x": x}), "torch": lambda: bn(x_torch),
             "copy": parallel_copier(copy_dst, x, threads)},  # the bandwidth bound, measured in the same rounds
            rounds, 3,
        )
    passes = 3 if training else 2  # training reads x twice (statistics, normalise), writes y once
    nbytes = float(passes * x.nbytes)
    bandwidth = 2 * x.nbytes / (ms.pop("copy") * 1e-3)
    return Row(f"batchnorm2d {'train' if training else 'infer'}", ",".join(map(str, shape)), ms, nbytes, "GB/s",
               nbytes / bandwidth * 1e3, [f"compile {compile_s:.1f} s", f"max|err| vs ORT {float(np.abs(y - expected).max()):.1e}"])


# ---------------------------------------------------------------------------------------------
# report


def format_table(rows: list[Row], context: dict) -> str:
    impls = ["bndeploy", "onnxruntime", "torch"]
    header = ["case", "shape"] + [f"{i} ms" for i in impls] + ["bndeploy/ORT", "bndeploy rate", "bound ms", "% of bound", "notes"]
    lines = [header]
    for r in rows:
        lines.append([r.case, r.shape] + [f"{r.ms[i]:.3f}" for i in impls] + [
            f"{r.ms['bndeploy'] / r.ms['onnxruntime']:.2f}x", f"{r.rate('bndeploy'):.0f} {r.unit}",
            f"{r.bound_ms:.3f}", f"{100 * r.bound_ms / r.ms['bndeploy']:.0f}%", "; ".join(r.notes)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    foot = (f"threads {context['threads']}, {context['rounds']} interleaved rounds (medians); measured here: "
            f"GEMM peak {context['gemm_peak_gflops']:.0f} GFLOP/s (torch 2048^3 matmul), "
            f"memory bandwidth {context['bandwidth_gbs']:.1f} GB/s (parallel numpy copy, read+write; BatchNorm bounds use "
            "the copy timed in their own rounds). "
            "Shared cores make absolute times noisy; compare ratios.")
    return "\n".join(text + ["", foot])


def run_suite(suite: str, threads: int, rounds: int) -> tuple[list[Row], dict]:
    bandwidth = measure_bandwidth(int(np.prod(BN_SHAPE)) * 4, rounds, threads)
    peak = measure_gemm_peak(threads)
    rows = []
    convs = CONV_SUITE if suite == "default" else CONV_SUITE[:1]
    for n, c, hw in convs:
        rows.append(conv_case(n, c, hw, threads, rounds, peak))
    if suite != "conv":
        rows.append(bn_case(False, threads, rounds))
        rows.append(bn_case(True, threads, rounds))
    return rows, {"threads": threads, "rounds": rounds, "gemm_peak_gflops": peak, "bandwidth_gbs": bandwidth}


def main(args) -> int:
    threads = args.threads or os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    rows, context = run_suite(args.suite, threads, args.rounds)
    print(format_table(rows, context))
    if args.json:
        from bndeploy.files import write_json

        write_json(args.json, {"context": context, "rows": [asdict(r) for r in rows]})
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark bndeploy CPU builds against ONNX Runtime and torch")
    parser.add_argument("--suite", choices=["default", "quick", "conv"], default="default",
                        help="default: three convs + BatchNorm inference/training; quick: one conv + BatchNorm; conv: convs only")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=0, help="threads for every implementation (default: all cores)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.set_defaults(func=main)
