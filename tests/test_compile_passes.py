"""bndeploy's BatchNorm passes in isolation (Relax in, Relax out), and pins of upstream TVM behaviour.

The pins assert TVM 0.27's *wrong* behaviour on purpose: if one fails, TVM changed, and the
workaround it justifies should be revisited (the failure message says which).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import compile_cases as cases
from bndeploy.compile import passes

CPU = tvm.target.Target({"kind": "llvm"})


def imported(case_or_model):
    model = getattr(case_or_model, "model", case_or_model)
    return from_onnx(model, keep_params_in_input=False)


def ops_in(mod) -> list[str]:
    names = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: names.append(e.op.name) if isinstance(e, relax.Call) and hasattr(e.op, "name") else None
            )
    return names


def run_relax(mod, inputs: list[np.ndarray]) -> list[np.ndarray]:
    ex = tvm.compile(mod, target=CPU)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


# --------------------------------------------------------------------------------------------------
# Decisions and report


KIND_OF_ONNX_OP = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "Gemm": "Gemm/MatMul", "MatMul": "Gemm/MatMul"}


@pytest.mark.parametrize("case", cases.inference_cases(), ids=lambda c: c.name)
def test_fusion_report_decides_fold_per_case(case):
    kind = KIND_OF_ONNX_OP.get(case.into)
    report = passes.fusion_report(imported(case), ["bn"], {kind: ["op"]} if kind else None)
    assert [entry["folded"] for entry in report] == case.folded
    entry = report[0]
    assert entry["batchnorm"] == "bn"
    assert (entry["into"], entry["op"]) == (("op", kind) if case.into else (None, None))
    assert entry["reason"]


def test_report_explains_why_a_shared_conv_output_is_not_folded():
    case = cases.conv_bn_case("shared", conv_output_too=True)
    (entry,) = passes.fusion_report(imported(case), ["bn"], {"Conv": ["conv"]})
    assert entry["folded"] is False and "another consumer" in entry["reason"]


def test_report_explains_graph_input_params_and_training_mode():
    (params,) = passes.fusion_report(imported(cases.batchnorm_case(params_as_inputs=True)))
    assert "not constants" in params["reason"]
    (train,) = passes.fusion_report(imported(cases.training_case("t", conv=True)), ["bn"], {"Conv": ["conv"]})
    assert train == {"batchnorm": "bn", "into": "conv", "op": "Conv", "folded": False,
                     "reason": passes._TRAINING_REASON, "statistics": passes.SEPARATE_STATISTICS}


def test_report_falls_back_to_positional_names_when_counts_disagree():
    (entry,) = passes.fusion_report(imported(cases.conv_bn_case("c")), ["a", "b"], None)
    assert (entry["batchnorm"], entry["into"]) == ("batch_norm_0", "conv_0")


def test_report_says_what_the_fold_looked_through_and_why_an_axis_does_not_fold():
    (through,) = passes.fusion_report(imported(cases.matmul_bn_case("r", reshape_to=(5, 7, 1))))
    assert through["folded"] and through["reason"] == "folded into the Gemm/MatMul (through reshape)"
    (wrong,) = passes.fusion_report(imported(cases.matmul_bn_case("w", x_shape=(2, 5, 12), folded=False)))
    assert not wrong["folded"] and "normalises axis 1" in wrong["reason"] and "axis 2" in wrong["reason"]


@pytest.mark.parametrize("case", cases.linear_fold_cases(), ids=lambda c: c.name)
def test_folded_batchnorm_leaves_no_scale_and_shift(case):
    """A folded BN adds one bias add and nothing else: no multiply is left of it (a Gemm's alpha is the
    Gemm's own; its beta * C is folded into the new bias), so no scale-and-shift kernel remains."""
    before = imported(case)
    after = passes.rewrite_batchnorms(before)
    added = [op for op in set(ops_in(after)) if ops_in(after).count(op) > ops_in(before).count(op)]
    if case.folded == [True]:
        assert ops_in(after).count("relax.multiply") <= ops_in(before).count("relax.multiply")
        assert "relax.nn.batch_norm" not in ops_in(after) and added in ([], ["relax.add"])
    else:
        assert ops_in(after).count("relax.multiply") == ops_in(before).count("relax.multiply") + 1


# --------------------------------------------------------------------------------------------------
# Each pass alone


def test_fold_pass_leaves_conv_and_bias_add_only():
    mod = passes.fold_conv_batchnorm(imported(cases.conv_bn_case("c", activation="relu")))
    assert sorted(ops_in(mod)) == ["relax.add", "relax.nn.conv2d", "relax.nn.relu"]


def test_fold_pass_does_not_touch_shared_conv_or_training_bn():
    for case in (cases.conv_bn_case("s", conv_output_too=True), cases.training_case("t", conv=True)):
        before = imported(case)
        assert tvm_ffi.structural_equal(passes.fold_conv_batchnorm(before), before)


def test_scale_shift_pass_precomputes_constants():
    mod = passes.lower_inference_batchnorm(imported(cases.batchnorm_case()))
    assert sorted(ops_in(mod)) == ["relax.add", "relax.multiply"]


def test_scale_shift_pass_uses_the_formula_for_graph_input_params():
    mod = passes.lower_inference_batchnorm(imported(cases.batchnorm_case(params_as_inputs=True)))
    ops = ops_in(mod)
    assert "relax.nn.batch_norm" not in ops and "relax.rsqrt" in ops


@pytest.mark.parametrize("running_var", ["onnx", "torch"])
def test_training_decomposition_matches_onnx_spec(running_var):
    case = cases.training_case("t", running_var=running_var)
    mod = passes.decompose_training_batchnorm(imported(case), running_var)
    assert "relax.nn.batch_norm" not in ops_in(mod)
    got = run_relax(mod, [case.inputs["x"]])
    x = case.inputs["x"]
    params = {k: np.asarray(helper_array(case, f"bn.{k}"), np.float64) for k in ("scale", "bias", "mean", "var")}
    expected = cases.bn_training_reference(x, params, float(np.float32(1e-5)), float(np.float32(0.9)), running_var)
    bounds = cases.training_bounds(x, params, float(np.float32(1e-5)), float(np.float32(0.9)), expected[2])
    for value, reference, bound in zip(got, expected, bounds):
        assert np.all(np.abs(value - reference) <= bound)


def helper_array(case, name):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(i) for i in case.model.graph.initializer if i.name == name)


def test_torch_running_var_refuses_one_value_per_channel():
    case = cases.training_case("t", shape=(1, 3, 1, 1))
    with pytest.raises(passes.UnsupportedModelError, match="n/\\(n-1\\)"):
        passes.decompose_training_batchnorm(imported(case), "torch")


def test_rewrite_leaves_a_graph_tvm_fuses_into_one_conv_kernel():
    """bndeploy's output is fusable: TVM's CPU legalize+fuse passes give one conv+bias+relu kernel."""
    mod = passes.rewrite_batchnorms(imported(cases.conv_bn_case("c", activation="relu")))
    with CPU, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(relax.backend.cpu_generic.legalize_passes(CPU))(mod)
    kernels = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == ["fused_conv2d_add_relu"]


# --------------------------------------------------------------------------------------------------
# Upstream pins (TVM 0.27)


def test_upstream_frontend_passes_onnx_momentum_unchanged_to_relax():
    """Our decomposition reads the relax momentum attribute as the ONNX M (fraction kept)."""
    case = cases.training_case("t", momentum=0.9)
    (site,) = passes.analyze_batchnorms(imported(case)["main"])
    assert float(site.call.attrs.momentum) == pytest.approx(0.9, abs=1e-7), (
        "TVM's ONNX importer no longer passes the ONNX momentum through unchanged: "
        "revisit passes.training_decomposition's momentum handling"
    )


def test_upstream_batch_norm_lowering_reverses_onnx_momentum():
    """Why we never let TVM lower a training BN: it treats the ONNX M as PyTorch's (fraction new)."""
    case = cases.training_case("t", momentum=0.9)
    got_mean = run_relax(imported(case), [case.inputs["x"]])[1]
    rm = helper_array(case, "bn.mean").astype(np.float64)
    batch_mean = case.inputs["x"].astype(np.float64).mean(axis=(0, 2, 3))
    torch_style = 0.1 * rm + 0.9 * batch_mean
    assert np.allclose(got_mean, torch_style, rtol=1e-5, atol=1e-5), (  # fp32 rounding of a 100-term mean
        "TVM's batch_norm lowering now follows the ONNX momentum: the workaround may be dropped"
    )
    assert not np.allclose(got_mean, case.expected["running_mean"], atol=1e-3)


def _train_conv_bn_y_only():
    case = cases.training_case("t", conv=True)
    graph = case.model.graph
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    del bn.output[1:]
    out = [o for o in graph.output if o.name == "y"]
    del graph.output[:]
    graph.output.extend(out)
    return case.model


def test_upstream_fold_batchnorm_to_conv2d_folds_training_bn():
    mod = relax.transform.FoldBatchnormToConv2D()(imported(_train_conv_bn_y_only()))
    assert "relax.nn.batch_norm" not in ops_in(mod), (
        "TVM's FoldBatchnormToConv2D no longer folds training-mode BN: upstream may be fixed, revisit"
    )


def test_upstream_fold_batchnorm_to_conv2d_misses_conv_with_bias():
    mod = relax.transform.FoldBatchnormToConv2D()(imported(cases.conv_bn_case("c", bias=True)))
    assert "relax.nn.batch_norm" in ops_in(mod), (
        "TVM's FoldBatchnormToConv2D now folds conv+bias -> BN: upstream may be fixed, revisit"
    )


def test_upstream_decompose_ops_for_inference_turns_training_bn_into_inference():
    mod = relax.transform.DecomposeOpsForInference()(imported(cases.training_case("t")))
    ops = ops_in(mod)
    assert "relax.nn.batch_norm" not in ops and "relax.mean" not in ops, (
        "DecomposeOpsForInference no longer rewrites training BN with running stats: revisit"
    )


def test_decompose_ops_for_inference_is_harmless_after_our_passes():
    """No batch_norm survives our passes, so a later pipeline running this pass changes nothing."""
    mod = passes.rewrite_batchnorms(imported(cases.training_case("t", conv=True, relu=True)))
    assert tvm_ffi.structural_equal(relax.transform.DecomposeOpsForInference()(mod), mod)
