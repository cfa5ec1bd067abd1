"""Target names -> TargetSpec, raw JSON, errors, cross toolchains and the ELF check."""

from __future__ import annotations

import shutil

import onnx
import pytest

import compile_cases as cases
from bndeploy.compile import CompileSettings, compile_model
from bndeploy.compile.targets import (EM_AARCH64, EM_X86_64, TARGETS, known_target_names, read_elf_identity,
                                      resolve_target, verify_library_machine)
from bndeploy.errors import BndeployError


def test_host_cpu_is_detected():
    spec = resolve_target("cpu")
    assert spec.device == "cpu" and spec.tvm["kind"] == "llvm" and spec.tvm["mcpu"] not in ("", "generic")
    assert spec.tvm_target().kind.name == "llvm"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_named_target_is_valid_tvm(name):
    spec = resolve_target(name)
    assert spec.name == name and spec.tvm_target().kind.name == ("cuda" if spec.device == "cuda" else "llvm")
    assert spec.triple and spec.elf_identity() is not None


def test_cuda_names_map_to_archs():
    assert resolve_target("cuda").archs == ("sm_80",)
    assert {resolve_target(f"cuda-sm{a}").tvm["arch"] for a in (75, 80, 86, 87, 89, 90)} == {
        "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90"}
    orin = resolve_target("cuda-sm87")
    assert orin.triple.startswith("aarch64") and orin.cross.compiler == "aarch64-linux-gnu-gcc"


def test_sm72_is_refused_with_the_reason():
    with pytest.raises(BndeployError, match="sm_72 .*removed in CUDA 13"):
        resolve_target("cuda-sm72")
    with pytest.raises(BndeployError, match="removed in CUDA 13"):
        resolve_target('{"kind": "cuda", "arch": "sm_72"}')


def test_raw_json_is_accepted():
    spec = resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}')
    assert spec.device == "cpu" and spec.cross.debian_package == "gcc-aarch64-linux-gnu"
    assert spec.name == "llvm-neoverse-n1"


@pytest.mark.parametrize("bad", ["pentium", "{not json", '{"kind": "vulkan"}'])
def test_unknown_targets_list_the_known_ones(bad):
    with pytest.raises(BndeployError) as error:
        resolve_target(bad)
    if bad == "pentium":
        assert all(name in str(error.value) for name in known_target_names())


def test_armv7_uses_hard_float():
    assert resolve_target("armv7").tvm["mfloat-abi"] == "hard"


def test_missing_cross_compiler_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    onnx.save(cases.batchnorm_case().model, tmp_path / "m.onnx")
    with pytest.raises(BndeployError, match="apt-get install gcc-riscv64-linux-gnu"):
        compile_model(tmp_path / "m.onnx", ["riscv64"], tmp_path / "out", CompileSettings())
    assert not (tmp_path / "out").exists()


def test_elf_check_refuses_a_host_library_for_an_arm_target(tmp_path):
    onnx.save(cases.batchnorm_case().model, tmp_path / "m.onnx")
    (artifact,) = compile_model(tmp_path / "m.onnx", ["cpu"], tmp_path / "out", CompileSettings())
    assert read_elf_identity(artifact / "model.so") == (EM_X86_64, 64)
    with pytest.raises(BndeployError, match="ELF machine 62"):
        verify_library_machine(artifact / "model.so", resolve_target("cortex-a72"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs Debian gcc-aarch64-linux-gnu")
def test_cross_compiles_for_jetson_orin_cpu(tmp_path):
    onnx.save(cases.conv_bn_case("c", activation="relu").model, tmp_path / "m.onnx")
    (artifact,) = compile_model(tmp_path / "m.onnx", ["cortex-a78ae"], tmp_path / "out", CompileSettings())
    assert read_elf_identity(artifact / "model.so") == (EM_AARCH64, 64)
