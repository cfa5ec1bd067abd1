"""One-off check on a GPU machine (not a pytest module): python tests/gpu_check.py [--arch sm_90]

Builds bndeploy CUDA artifacts for Conv->BN (inference, folded), a training-mode BN, and a training-mode
Conv->BN->ReLU (batch statistics summed in the conv kernel's epilogue) through the real compile path
(ONNX -> bndeploy passes -> bndeploy.compile.cuda), runs them on cuda:0, compares every output with ONNX
Runtime on the CPU, and times them against PyTorch eager (cuDNN) on the GPU when available.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from bndeploy.compile import cuda
from bndeploy.compile.compiler import CompileSettings, load_source, lower_to_relax

SHAPE = (32, 64, 56, 56)
EPS, ONNX_MOMENTUM = 1e-5, 0.9


def bn_params(rng, c):
    return {"scale": rng.random(c, dtype=np.float32) + 0.5, "bias": rng.standard_normal(c, dtype=np.float32),
            "mean": rng.standard_normal(c, dtype=np.float32), "var": rng.random(c, dtype=np.float32) + 0.5}


def conv_bn_model(rng) -> tuple[onnx.ModelProto, dict]:
    c = SHAPE[1]
    weight = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.05
    params = bn_params(rng, c)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], epsilon=EPS, name="bn")]
    inits = [numpy_helper.from_array(weight, "w")] + [numpy_helper.from_array(v, k) for k, v in params.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(SHAPE))]
    return _model("conv_bn", nodes, inits, outputs), {"torch_weight": weight, **params}


def train_bn_model(rng) -> tuple[onnx.ModelProto, dict]:
    c = SHAPE[1]
    params = bn_params(rng, c)
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"],
                              ["y", "running_mean", "running_var"], epsilon=EPS, momentum=ONNX_MOMENTUM,
                              training_mode=1, name="bn")]
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(SHAPE))] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [c]) for name in ("running_mean", "running_var")]
    return _model("train_bn", nodes, inits, outputs), params


def train_conv_bn_relu_model(rng) -> tuple[onnx.ModelProto, dict]:
    c = SHAPE[1]
    weight = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.05
    params = bn_params(rng, c)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"],
                              ["b", "running_mean", "running_var"], epsilon=EPS, momentum=ONNX_MOMENTUM,
                              training_mode=1, name="bn"),
             helper.make_node("Relu", ["b"], ["y"])]
    inits = [numpy_helper.from_array(weight, "w")] + [numpy_helper.from_array(v, k) for k, v in params.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(SHAPE))] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [c]) for name in ("running_mean", "running_var")]
    return _model("train_cbr", nodes, inits, outputs), {"torch_weight": weight, **params}


def _model(name, nodes, inits, outputs) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))
    model = helper.make_model(helper.make_graph(nodes, name, [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def build_and_run(model: onnx.ModelProto, arch: str, x: np.ndarray, work: Path):
    onnx_path = work / f"{model.graph.name}.onnx"
    onnx.save(model, onnx_path)
    mod, _, _ = lower_to_relax(load_source(onnx_path), CompileSettings())
    library = work / f"{model.graph.name}-{arch}.so"
    info = cuda.build_cuda_library(mod, tvm.target.Target({"kind": "cuda", "arch": arch}), library)
    found = cuda.inspect_cuda_library(library)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), dev)
    x_dev = tvm.runtime.tensor(x, device=dev)
    out = vm["main"](x_dev)
    outputs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    ms = vm.time_evaluator("main", dev, number=20, repeat=3)(x_dev).mean * 1e3
    return outputs, ms, info, found


def torch_ms(name: str, x: np.ndarray, params: dict) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    t = {k: torch.from_numpy(v).cuda() for k, v in params.items()}
    xt = torch.from_numpy(x).cuda()

    def step():
        if name == "conv_bn":
            c = F.conv2d(xt, t["torch_weight"], padding=1)
            return F.batch_norm(c, t["mean"], t["var"], t["scale"], t["bias"], training=False, eps=EPS)
        if name == "train_cbr":
            c = F.conv2d(xt, t["torch_weight"], padding=1)
            return F.relu(F.batch_norm(c, t["mean"].clone(), t["var"].clone(), t["scale"], t["bias"], training=True,
                                       momentum=1 - ONNX_MOMENTUM, eps=EPS))
        return F.batch_norm(xt, t["mean"].clone(), t["var"].clone(), t["scale"], t["bias"], training=True,
                            momentum=1 - ONNX_MOMENTUM, eps=EPS)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 20 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="default: the GPU's own, e.g. sm_90")
    args = parser.parse_args()
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA GPU visible to TVM (tvm.cuda(0).exist is false)")
    arch = args.arch or "sm_" + dev.compute_version.replace(".", "")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * 2 + 0.5
    print(f"GPU {dev.device_name} ({arch}); x {SHAPE} float32")
    print(f"{'model':10} {'kernels':>7} {'bn stats in conv':>16} {'sass':>6} {'ptx':>11} {'max|tvm-ort|':>13} "
          f"{'tvm ms':>8} {'torch ms':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for make in (conv_bn_model, train_bn_model, train_conv_bn_relu_model):
            model, params = make(rng)
            expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {"x": x})
            got, ms, info, found = build_and_run(model, arch, x, Path(tmp))
            error = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected))
            reference = torch_ms(model.graph.name, x, params)
            print(f"{model.graph.name:10} {len(info['kernels']):>7} {len(info['statistics_fused']):>16} "
                  f"{','.join(found['archs']):>6} "
                  f"{','.join(found['ptx']):>11} {error:>13.2e} {ms:>8.3f} "
                  f"{'-' if reference is None else f'{reference:.3f}':>9}")


if __name__ == "__main__":
    main()
