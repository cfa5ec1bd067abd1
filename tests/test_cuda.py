"""CUDA artifacts: compiled device code (SASS + PTX), GPU-scheduled reductions, toolchain errors.

Compile and inspection tests run everywhere nvcc is installed (no GPU needed); execution tests skip
without a GPU. Run on a GPU machine, tests/gpu_check.py also times the kernels.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.script import relax as R

from bndeploy.compile import cuda
from bndeploy.errors import ArtifactError, BndeployError, UnsupportedModelError

# Realistic BatchNorm statistics: 32 images of 64 channels at 56x56, N*H*W = 100352 values per channel.
BN_SHAPE = (32, 64, 56, 56)
NHW = BN_SHAPE[0] * BN_SHAPE[2] * BN_SHAPE[3]
ONNX_MOMENTUM = 0.9

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA Toolkit) not installed")


def cuda_target(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def has_gpu(min_arch: str = "sm_80") -> bool:
    """A GPU that can run code built for min_arch (its SASS, or its PTX on newer GPUs)."""
    dev = tvm.cuda(0)
    return dev.exist and float(dev.compute_version) >= int(min_arch[3:]) / 10


# ------------------------------------------------------------------------------------------------
# Test modules


def conv_bias_relu_module(channels: int = 64, size: int = 56, batch: int = 1) -> tvm.IRModule:
    """Conv3x3(+bias) -> Relu from an ONNX graph, imported the way bndeploy imports models."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.05
    bias = rng.standard_normal(channels, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv_bias_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, size, size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return from_onnx(model, keep_params_in_input=False)


def train_batchnorm_module(shape=BN_SHAPE) -> tvm.IRModule:
    """Training-mode BatchNorm as bndeploy's passes decompose it (ONNX spec, two-pass variance)."""
    n, c, h, w = shape
    op, f32 = relax.op, "float32"
    x = relax.Var("x", R.Tensor(shape, f32))
    gamma, beta, run_mean, run_var = (relax.Var(name, R.Tensor((c,), f32)) for name in ("gamma", "beta", "rm", "rv"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, gamma, beta, run_mean, run_var]):
        with bb.dataflow():
            axes = [0, 2, 3]
            mean = bb.emit(op.mean(x, axes, keepdims=True))
            centered = bb.emit(op.subtract(x, mean))
            var = bb.emit(op.mean(op.multiply(centered, centered), axes, keepdims=True))
            inv_std = bb.emit(op.rsqrt(op.add(var, relax.const(1e-5, f32))))
            y = op.multiply(centered, op.multiply(inv_std, op.reshape(gamma, (1, c, 1, 1))))
            y = bb.emit(op.add(y, op.reshape(beta, (1, c, 1, 1))))
            updates = [
                bb.emit(op.add(op.multiply(run, relax.const(ONNX_MOMENTUM, f32)),
                               op.multiply(op.reshape(batch, [-1]), relax.const(1 - ONNX_MOMENTUM, f32))))
                for run, batch in ((run_mean, mean), (run_var, var))
            ]
            out = bb.emit_output(relax.Tuple([y, *updates]))
        bb.emit_func_output(out)
    return bb.get()


def relax_training_batchnorm_module(shape=BN_SHAPE) -> tvm.IRModule:
    """TVM's own relax.nn.batch_norm(training=True): legalized into one fused function."""
    c = shape[1]
    x = relax.Var("x", R.Tensor(shape, "float32"))
    params = [relax.Var(name, R.Tensor((c,), "float32")) for name in ("gamma", "beta", "rm", "rv")]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *params]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.batch_norm(x, *params, axis=1, training=True))
        bb.emit_func_output(out)
    return bb.get()


def train_batchnorm_reference(x, gamma, beta, rm, rv):
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    y = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    y = y * gamma[None, :, None, None] + beta[None, :, None, None]
    return y, rm * ONNX_MOMENTUM + mean * (1 - ONNX_MOMENTUM), rv * ONNX_MOMENTUM + var * (1 - ONNX_MOMENTUM)


def default_tvm_schedule(mod: tvm.IRModule, target) -> tvm.IRModule:
    """TVM 0.27's own CUDA legalization + dlight rules, without bndeploy's rule."""
    from tvm.relax.backend.cuda import pipeline

    with target:
        return tvm.transform.Sequential(pipeline.legalize_passes(target))(mod)


# ------------------------------------------------------------------------------------------------
# Built artifacts (module scope: each build is one child process of ~5-10 s)


@pytest.fixture(scope="module")
def train_bn_build(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA Toolkit) not installed")
    root = tmp_path_factory.mktemp("cuda-train-bn")
    info = cuda.build_cuda_library(train_batchnorm_module(), cuda_target("sm_80"), root / "model.so", root / "dump")
    return root, info


@pytest.fixture(scope="module")
def conv_builds(tmp_path_factory):
    """One conv->bias->relu library per architecture bndeploy's CUDA targets use."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA Toolkit) not installed")
    root = tmp_path_factory.mktemp("cuda-conv")
    mod = conv_bias_relu_module()
    return {
        arch: (root / f"{arch}.so", cuda.build_cuda_library(mod, cuda_target(arch), root / f"{arch}.so"))
        for arch in ("sm_80", "sm_87", "sm_90")
    }


# ------------------------------------------------------------------------------------------------
# Device code in the artifact


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_87", "sm_90"])
def test_conv_library_holds_sass_and_ptx(conv_builds, arch):
    path, info = conv_builds[arch]
    found = cuda.inspect_cuda_library(path)
    assert found["archs"] == [arch]
    assert found["ptx"] == ["compute_" + arch[3:]]
    assert info["archs"] == [arch]
    assert found["kernels"] == info["kernels"]
    assert any("conv2d" in k for k in found["kernels"]), found["kernels"]


@pytest.mark.slow
def test_train_batchnorm_library_holds_device_code(train_bn_build):
    root, info = train_bn_build
    found = cuda.inspect_cuda_library(root / "model.so")
    assert found["archs"] == ["sm_80"] and found["ptx"] == ["compute_80"]
    assert found["kernels"] == info["kernels"]
    assert any("mean" in k for k in found["kernels"]), found["kernels"]


@pytest.mark.slow
def test_train_batchnorm_reductions_use_shuffles_in_the_artifact(train_bn_build):
    """Every kernel that reduces (has an accumulator) combines threads with warp shuffles."""
    root, info = train_bn_build
    source = (root / "dump" / cuda.CUDA_SOURCE_NAME).read_text()
    kernels = _kernel_bodies(source)
    assert sorted(kernels) == info["kernels"]
    reducing = {name: body for name, body in kernels.items() if "_red" in body}
    assert reducing, "no reduction kernel found in the generated source"
    for name, body in reducing.items():
        assert "__shfl_down_sync" in body and "__shared__" in body, f"{name} reduces without thread cooperation"


def _kernel_bodies(source: str) -> dict[str, str]:
    """Kernel name -> text of its definition (up to the next kernel)."""
    pieces = re.split(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    return {name: body for name, body in zip(pieces[1::2], pieces[2::2]) if not body.split(")", 1)[1].startswith(";")}


def test_default_tvm_export_stores_cuda_source_not_device_code(tmp_path):
    """Upstream behaviour worked around here: without a driver, export_library keeps CUDA C source."""
    if cuda.real_driver_present():
        pytest.skip("a real CUDA driver is present: TVM compiles device code itself")
    mod = train_batchnorm_module(shape=(2, 4, 3, 3))
    executable = tvm.compile(mod, target=cuda_target("sm_80"))
    executable.export_library(str(tmp_path / "plain.so"))
    assert cuda.extract_fatbins(tmp_path / "plain.so") == []
    assert b"__global__" in (tmp_path / "plain.so").read_bytes()
    with pytest.raises(ArtifactError, match="no compiled CUDA device code"):
        cuda.inspect_cuda_library(tmp_path / "plain.so")


# ------------------------------------------------------------------------------------------------
# GPU scheduling (TIR level, no build)


def test_train_batchnorm_statistics_reduce_in_parallel():
    scheduled = cuda.schedule_for_cuda(train_batchnorm_module(), cuda_target("sm_80"))
    statistics = [r for r in cuda.module_reduction_schedules(scheduled) if r.output_extent == BN_SHAPE[1]]
    assert statistics, "no per-channel reduction found"
    for reduction in cuda.module_reduction_schedules(scheduled):
        assert reduction.serial_per_thread * 32 <= NHW, reduction
    assert cuda.serial_narrow_reductions(scheduled) == []


def test_tvm_default_schedule_reduces_batchnorm_serially():
    """Upstream: dlight's Fallback gives each channel one thread summing N*H*W values."""
    scheduled = default_tvm_schedule(relax_training_batchnorm_module(), cuda_target("sm_80"))
    serial = cuda.serial_narrow_reductions(scheduled)
    assert serial and all(r.serial_per_thread == NHW for r in serial)
    with pytest.raises(UnsupportedModelError, match="could not parallelise"):
        cuda.require_parallel_reductions(scheduled)


def test_bndeploy_schedule_parallelises_fused_training_batchnorm():
    scheduled = cuda.schedule_for_cuda(relax_training_batchnorm_module(), cuda_target("sm_80"))
    reductions = cuda.module_reduction_schedules(scheduled)
    assert {r.reduction_extent for r in reductions} == {NHW}
    assert all(r.serial_per_thread * 32 <= NHW for r in reductions), reductions


def test_narrow_matmul_is_not_a_serial_dot_product():
    """A 10-class head over 4096 features: dlight's Matmul would give one thread per output."""
    x = relax.Var("x", R.Tensor((32, 4096), "float32"))
    weight = relax.const(np.ones((4096, 10), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, weight))
        bb.emit_func_output(out)
    target = cuda_target("sm_80")
    assert cuda.serial_narrow_reductions(default_tvm_schedule(bb.get(), target))
    assert cuda.serial_narrow_reductions(cuda.schedule_for_cuda(bb.get(), target)) == []


def test_conv_is_scheduled_as_implicit_gemm():
    scheduled = cuda.schedule_for_cuda(conv_bias_relu_module(), cuda_target("sm_80"))
    convs = [func for gvar, func in scheduled.functions.items()
             if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gvar.name_hint]
    assert len(convs) == 1
    script = convs[0].script()
    assert 'scope="shared"' in script and 'thread="threadIdx' in script and 'thread="blockIdx' in script


# ------------------------------------------------------------------------------------------------
# Toolchain, stub and process hygiene


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(BndeployError, match=r"nvcc not found.*CUDA Toolkit"):
        cuda.check_cuda_toolchain()
    with pytest.raises(BndeployError, match="nvcc not found"):
        cuda.build_cuda_library(conv_bias_relu_module(4, 4), cuda_target("sm_80"), tmp_path / "m.so")
    assert not (tmp_path / "m.so").exists()


def test_nvcc_found_through_cuda_home(monkeypatch, tmp_path):
    fake = tmp_path / "toolkit" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    assert cuda.check_cuda_toolchain() == str(fake)


@needs_nvcc
@pytest.mark.parametrize("target", [{"kind": "cuda", "arch": "sm_72"}, {"kind": "cuda"}], ids=["sm_72", "no-arch"])
def test_architecture_nvcc_cannot_build_is_refused_before_building(target, tmp_path):
    with pytest.raises(BndeployError, match=r"cannot build CUDA architecture sm_\d+; it builds .*sm_80"):
        cuda.build_cuda_library(conv_bias_relu_module(4, 4), tvm.target.Target(target), tmp_path / "m.so")
    assert not (tmp_path / "m.so").exists()


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None, reason="needs gcc and nm")
def test_driver_stub_exports_every_driver_symbol_tvm_imports(tmp_path):
    stub_dir = cuda.ensure_driver_stub(tmp_path)
    library = stub_dir / "libcuda.so.1"
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout
    needed = cuda.driver_symbols(cuda.tvm_cuda_runtime_path())
    assert "cuModuleLoadData" in needed and "cuLaunchKernelEx" in needed
    assert set(needed) <= {line.split()[-1] for line in exported.splitlines()}
    soname = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    assert "[libcuda.so.1]" in soname
    mtime = library.stat().st_mtime_ns
    assert cuda.ensure_driver_stub(tmp_path) == stub_dir and library.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_build_leaves_this_process_usable_for_cpu_work(train_bn_build):
    """The stub and the compile callback live in the build's child process only."""
    callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    if not cuda.real_driver_present():
        assert tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None
        assert not tvm.cuda(0).exist
    x = relax.Var("x", R.Tensor((3,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(relax.op.multiply(x, relax.const(2.0, "float32")))
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    result = vm["main"](tvm.runtime.tensor(np.arange(3, dtype="float32"))).numpy()
    np.testing.assert_array_equal(result, [0.0, 2.0, 4.0])
    assert tvm_ffi.get_global_func("tvm_callback_cuda_compile").same_as(callback)


def test_inspect_refuses_a_library_without_device_code(tmp_path):
    (tmp_path / "empty.so").write_bytes(b"\x7fELF not really")
    with pytest.raises(ArtifactError, match="no compiled CUDA device code"):
        cuda.inspect_cuda_library(tmp_path / "empty.so")
    with pytest.raises(ArtifactError, match="not found"):
        cuda.inspect_cuda_library(tmp_path / "missing.so")


def test_gencode_flags_carry_sass_and_ptx():
    assert cuda.gencode_flags("sm_90a") == [
        "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_90a,code=compute_90a",
    ]
    with pytest.raises(BndeployError, match="arch"):
        cuda.gencode_flags("compute_80")


# ------------------------------------------------------------------------------------------------
# Execution (GPU only)


@pytest.mark.gpu
@pytest.mark.slow
def test_train_batchnorm_runs_on_the_gpu(train_bn_build):
    if not has_gpu("sm_80"):
        pytest.skip("no CUDA GPU of compute capability 8.0 or newer")
    root, _ = train_bn_build
    rng = np.random.default_rng(1)
    c = BN_SHAPE[1]
    inputs = [rng.standard_normal(BN_SHAPE, dtype=np.float32) * 3 + 1] + [
        rng.standard_normal(c, dtype=np.float32) for _ in range(3)
    ] + [rng.random(c, dtype=np.float32) + 0.5]
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(root / "model.so")), dev)
    outputs = vm["main"](*[tvm.runtime.tensor(a, device=dev) for a in inputs])
    for got, want in zip(outputs, train_batchnorm_reference(*inputs)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.slow
def test_conv_runs_on_the_gpu(conv_builds):
    if not has_gpu("sm_80"):
        pytest.skip("no CUDA GPU of compute capability 8.0 or newer")
    path, _ = conv_builds["sm_80"]
    x = np.random.default_rng(2).standard_normal((1, 64, 56, 56), dtype=np.float32)
    cpu = relax.VirtualMachine(tvm.compile(conv_bias_relu_module(), target=tvm.target.Target({"kind": "llvm"})),
                               tvm.cpu())
    want = cpu["main"](tvm.runtime.tensor(x)).numpy()
    dev = tvm.cuda(0)
    got = relax.VirtualMachine(tvm.runtime.load_module(str(path)), dev)["main"](tvm.runtime.tensor(x, device=dev))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64 cross compiler not installed")
def test_jetson_orin_artifact_has_aarch64_host_code_and_sm87_device_code(exported, tmp_path):
    """cuda-sm87's host is the Orin's aarch64 CPU: the library must be linked by the cross toolchain
    (the host linker failed with 'file in wrong format' before) and carry sm_87 SASS + PTX."""
    from bndeploy.compile import CompileSettings, compile_model
    from bndeploy.compile.targets import read_elf_identity

    artifact = compile_model(exported("conv-bn")["inference"] / "model.onnx", ["cuda-sm87"], tmp_path / "orin",
                             CompileSettings())[0]
    assert read_elf_identity(artifact / "model.so") == (183, 64)  # EM_AARCH64, ELFCLASS64
    info = cuda.inspect_cuda_library(artifact / "model.so")
    assert info["archs"] == ["sm_87"] and info["ptx"] == ["compute_87"]
    assert info["kernels"]
