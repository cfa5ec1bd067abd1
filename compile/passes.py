"""Relax graph rewrites for BatchNorm: each a dpl pattern plus a rewriter, applied by one small mutator.

Every ``relax.nn.batch_norm`` the ONNX importer produces is replaced by bndeploy's own arithmetic, so
no TVM batch-norm lowering is ever relied on (see shared/notes/bn-semantics.md for why):

1. inference BN after a convolution (constant weight, optional constant bias, constant BN params, no
   other consumer of the conv output) -> the convolution with folded weight and bias;
2. every other inference BN -> elementwise ``x * s + t`` (constants precomputed when possible);
3. training BN -> the ONNX-spec decomposition: batch mean, two-pass population variance, running
   statistics updated with the ONNX momentum (``running_var="torch"``: unbiased batch variance).

``analyze_batchnorms`` is the single place that decides what happens to each BN and why; the
fusion report and the three passes all read its decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.dpl import is_const, is_op, wildcard

from bndeploy.errors import UnsupportedModelError

CONV_OPS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d")
CONV_KERNEL_LAYOUTS = ("OIW", "OIHW", "OIDHW")
RUNNING_VAR_MODES = ("onnx", "torch")

# What happens to a BN; the pass that handles each kind.
FOLD, SCALE_SHIFT, TRAINING = "fold", "scale_shift", "training"


# --------------------------------------------------------------------------------------------------
# Patterns


def _any_conv(data, weight):
    pattern = is_op(CONV_OPS[0])(data, weight)
    for op in CONV_OPS[1:]:
        pattern = pattern | is_op(op)(data, weight)
    return pattern


@dataclass(frozen=True)
class ConvBatchNormPattern:
    """conv(x, W const) [-> add(reshape(b const) | b const)] -> batch_norm(all params const)."""

    data: object = field(default_factory=wildcard)
    weight: object = field(default_factory=is_const)
    bias: object = field(default_factory=is_const)
    gamma: object = field(default_factory=is_const)
    beta: object = field(default_factory=is_const)
    mean: object = field(default_factory=is_const)
    var: object = field(default_factory=is_const)

    def __post_init__(self):
        conv = _any_conv(self.data, self.weight)
        # The ONNX importer reshapes the 1-D conv bias to (1, C, 1, ...) before the add.
        bias_value = self.bias | is_op("relax.reshape")(self.bias, wildcard())
        bias_add = is_op("relax.add")(conv, bias_value)
        bn_input = bias_add | conv
        bn = is_op("relax.nn.batch_norm")(bn_input, self.gamma, self.beta, self.mean, self.var)
        for name, value in (("conv", conv), ("bias_add", bias_add), ("root", bn)):
            object.__setattr__(self, name, value)


def batchnorm_pattern():
    """Any batch_norm call; its operands are read from the call itself."""
    return is_op("relax.nn.batch_norm")(wildcard(), wildcard(), wildcard(), wildcard(), wildcard())


# --------------------------------------------------------------------------------------------------
# Analysis: what to do with each BN, and why


@dataclass
class BatchNormSite:
    """One batch_norm binding of the function and the decision taken for it."""

    var: relax.Var
    call: relax.Call
    action: str  # FOLD, SCALE_SHIFT or TRAINING
    reason: str
    conv_call: relax.Call | None = None  # the convolution feeding this BN (folded or not)
    conv_bias: Constant | None = None  # the constant bias added between conv and BN (FOLD only)


def _use_counts(func: relax.Function) -> dict[relax.Var, int]:
    counts: dict[relax.Var, int] = {}

    def count(expr):
        for var in relax.analysis.used_vars(expr):
            counts[var] = counts.get(var, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(func.body.body)
    return counts


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


def _resolve(expr, var2val):
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def _producing_conv(bn_call: relax.Call, var2val) -> tuple[relax.Call | None, list[relax.Var]]:
    """The conv feeding this BN (directly or through one add) and the intermediate vars on the way."""
    chain = []
    value = bn_call.args[0]
    for _ in range(2):
        if not isinstance(value, relax.Var) or value not in var2val:
            return None, chain
        chain.append(value)
        value = var2val[value]
        if isinstance(value, relax.Call) and value.op.name in CONV_OPS:
            return value, chain
        if not (isinstance(value, relax.Call) and value.op.name == "relax.add"):
            return None, chain
        value = value.args[0]
    return None, chain


def _fold_blocker(site_call, conv, chain, match, uses) -> str | None:
    """Why this inference BN cannot be folded into ``conv``; None when it can."""
    if not all(isinstance(p, Constant) for p in site_call.args[1:]):
        return "scale/bias/mean/var are not constants (graph inputs): rewritten to the elementwise formula"
    if conv is None:
        return "no convolution before it: rewritten to an elementwise scale and shift"
    if not isinstance(conv.args[1], Constant):
        return "the convolution weight is not a constant: rewritten to an elementwise scale and shift"
    shared = [str(v.name) for v in chain if uses.get(v, 0) > 1]
    if shared:
        return (
            f"the convolution output ({', '.join(shared)}) has another consumer: folding would change it; "
            "rewritten to an elementwise scale and shift"
        )
    if int(site_call.attrs.axis) != 1 or str(conv.attrs.kernel_layout) not in CONV_KERNEL_LAYOUTS:
        return "channel axis or kernel layout is not the ONNX one (NC..., OI...): rewritten to scale and shift"
    if match is None:
        return "the bias between convolution and BN is not a per-channel constant: rewritten to scale and shift"
    return None


def analyze_batchnorms(func: relax.Function) -> list[BatchNormSite]:
    """Every batch_norm binding of ``func`` in binding order, with the action chosen for it."""
    var2val = relax.analysis.get_var2val(func)
    uses = _use_counts(func)
    pattern = ConvBatchNormPattern()
    sites = []
    for binding in _bindings(func):
        call = binding.value
        if not batchnorm_pattern().match(call):
            continue
        conv, chain = _producing_conv(call, var2val)
        if bool(call.attrs.training):
            sites.append(BatchNormSite(binding.var, call, TRAINING, _TRAINING_REASON, conv))
            continue
        match = pattern.root.extract_matched_expr(call, var2val)
        blocker = _fold_blocker(call, conv, chain, match, uses)
        if blocker is None:
            bias = match[pattern.bias] if pattern.bias_add in match else None
            sites.append(BatchNormSite(binding.var, call, FOLD, "folded into the convolution", conv, bias))
        else:
            sites.append(BatchNormSite(binding.var, call, SCALE_SHIFT, blocker, conv))
    return sites


_TRAINING_REASON = (
    "training mode: normalises with batch statistics, which depend on the input; "
    "decomposed per the ONNX spec (batch mean, population variance, running-stat update)"
)


# --------------------------------------------------------------------------------------------------
# Rewriters: (block builder, site) -> replacement for the batch_norm call (a 3-tuple)


def _channel_shape(ndim: int, axis: int, channels) -> list:
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def _np(const: Constant) -> np.ndarray:
    return const.value.numpy()


def _bn_constants(call: relax.Call):
    """gamma, beta, mean, var as float64 arrays, honouring the call's scale/center flags."""
    gamma, beta, mean, var = (_np(a).astype(np.float64) for a in call.args[1:])
    if not bool(call.attrs.scale):
        gamma = np.ones_like(gamma)
    if not bool(call.attrs.center):
        beta = np.zeros_like(beta)
    return gamma, beta, mean, var


def fold_into_conv(bb: relax.BlockBuilder, site: BatchNormSite, remap) -> relax.Expr:
    """conv(x, W) [+ b] -> BN  ==>  conv(x, W * s) + ((b - mean) * s + beta), s = gamma / sqrt(var + eps).

    Folding is done in float64 and rounded once to the weight dtype.
    """
    call, conv = site.call, site.conv_call
    gamma, beta, mean, var = _bn_constants(call)
    scale = gamma / np.sqrt(var + float(call.attrs.epsilon))
    weight = _np(conv.args[1])
    bias = np.zeros_like(scale) if site.conv_bias is None else _np(site.conv_bias).astype(np.float64).reshape(-1)
    folded_weight = weight.astype(np.float64) * scale.reshape(_channel_shape(weight.ndim, 0, -1))
    folded_bias = (bias - mean) * scale + beta
    out_ndim = len(call.args[0].ty.shape.values)
    new_conv = bb.emit(relax.Call(conv.op, [remap(conv.args[0]), relax.const(folded_weight.astype(weight.dtype))], conv.attrs))
    bias_b = relax.const(folded_bias.astype(weight.dtype).reshape(_channel_shape(out_ndim, 1, -1)))
    y = bb.emit(relax.op.add(new_conv, bias_b))
    return relax.Tuple([y, call.args[3], call.args[4]])


def scale_shift(bb: relax.BlockBuilder, site: BatchNormSite, remap) -> relax.Expr:
    """Inference BN without a conv to fold into: y = x * s + t."""
    call = site.call
    x = remap(call.args[0])
    ndim, axis = len(x.ty.shape.values), int(call.attrs.axis)
    dtype = str(x.ty.dtype)
    if all(isinstance(a, Constant) for a in call.args[1:]):
        gamma, beta, mean, var = _bn_constants(call)
        scale = gamma / np.sqrt(var + float(call.attrs.epsilon))
        shift = beta - mean * scale
        s = relax.const(scale.astype(dtype).reshape(_channel_shape(ndim, axis, -1)))
        t = relax.const(shift.astype(dtype).reshape(_channel_shape(ndim, axis, -1)))
        y = bb.emit(relax.op.add(bb.emit(relax.op.multiply(x, s)), t))
    else:
        gamma, beta, mean, var = (_broadcastable(bb, remap(a), ndim, axis) for a in call.args[1:])
        gamma, beta = _apply_affine_flags(call, gamma, beta, dtype)
        eps = relax.const(float(call.attrs.epsilon), dtype)
        s = bb.emit(relax.op.multiply(gamma, relax.op.rsqrt(relax.op.add(var, eps))))
        y = bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(x, mean), s), beta))
    return relax.Tuple([y, remap(call.args[3]), remap(call.args[4])])


def _broadcastable(bb, vec, ndim, axis):
    return bb.emit(relax.op.reshape(vec, _channel_shape(ndim, axis, -1)))


def _apply_affine_flags(call, gamma, beta, dtype):
    if not bool(call.attrs.scale):
        gamma = relax.const(1.0, dtype)
    if not bool(call.attrs.center):
        beta = relax.const(0.0, dtype)
    return gamma, beta


def training_decomposition(running_var: str):
    """Rewriter for a training BN, per the ONNX spec (opset 15 BatchNormalization, training_mode=1).

    ``running_var="torch"`` uses the unbiased batch variance n/(n-1) in the variance update (as
    PyTorch's BatchNorm does); y always uses the population variance, as both torch and ONNX do.
    Statistics are computed in float32 even for a float16 input.
    """
    if running_var not in RUNNING_VAR_MODES:
        raise UnsupportedModelError(f"running_var must be one of {RUNNING_VAR_MODES}, got {running_var!r}")

    def rewrite(bb: relax.BlockBuilder, site: BatchNormSite, remap) -> relax.Expr:
        call = site.call
        x = remap(call.args[0])
        in_dtype = str(x.ty.dtype)
        ndim, axis = len(x.ty.shape.values), int(call.attrs.axis)
        reduce_axes = [a for a in range(ndim) if a != axis]
        # The importer hands relax the ONNX momentum M unchanged (pinned by a test): fraction kept.
        momentum = float(call.attrs.momentum)
        x32 = x if in_dtype == "float32" else bb.emit(relax.op.astype(x, "float32"))
        gamma, beta, run_mean, run_var = (_as_f32(bb, remap(a)) for a in call.args[1:])
        gamma, beta = _apply_affine_flags(call, gamma, beta, "float32")

        mean = bb.emit(relax.op.mean(x32, reduce_axes, keepdims=True))
        centered = bb.emit(relax.op.subtract(x32, mean))
        # Two-pass variance: mean of squared deviations, never E[x^2] - E[x]^2.
        var = bb.emit(relax.op.mean(relax.op.multiply(centered, centered), reduce_axes, keepdims=True))
        inv_std = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(float(call.attrs.epsilon), "float32"))))
        shape = _channel_shape(ndim, axis, -1)
        y = relax.op.multiply(centered, relax.op.multiply(inv_std, relax.op.reshape(gamma, shape)))
        y = bb.emit(relax.op.add(y, relax.op.reshape(beta, shape)))
        if in_dtype != "float32":
            y = bb.emit(relax.op.astype(y, in_dtype))

        batch_mean = bb.emit(relax.op.reshape(mean, [-1]))
        batch_var = bb.emit(relax.op.reshape(var, [-1]))
        if running_var == "torch":
            batch_var = bb.emit(relax.op.multiply(batch_var, relax.const(_bessel(x, reduce_axes), "float32")))
        new_mean = _momentum_update(bb, run_mean, batch_mean, momentum)
        new_var = _momentum_update(bb, run_var, batch_var, momentum)
        return relax.Tuple([y, _back_to(bb, new_mean, call.args[3]), _back_to(bb, new_var, call.args[4])])

    return rewrite


def _bessel(x: relax.Expr, reduce_axes: list[int]) -> float:
    dims = [x.ty.shape.values[a] for a in reduce_axes]
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        raise UnsupportedModelError(
            "running_var='torch' needs a static input shape on a training BatchNormalization "
            "(n/(n-1) is a compile-time constant); use running_var='onnx' or export with static shapes"
        )
    n = int(np.prod([int(d) for d in dims]))
    if n < 2:
        raise UnsupportedModelError(
            f"training BatchNormalization reduces {n} value per channel: the unbiased variance n/(n-1) "
            "is undefined (PyTorch refuses this too)"
        )
    return n / (n - 1)


def _momentum_update(bb, running, batch, momentum: float):
    """ONNX: running * M + batch * (1 - M)."""
    kept = relax.op.multiply(running, relax.const(momentum, "float32"))
    return bb.emit(relax.op.add(kept, relax.op.multiply(batch, relax.const(1.0 - momentum, "float32"))))


def _as_f32(bb, expr):
    return expr if str(expr.ty.dtype) == "float32" else bb.emit(relax.op.astype(expr, "float32"))


def _back_to(bb, expr, like):
    dtype = str(like.ty.dtype)
    return expr if dtype == "float32" else bb.emit(relax.op.astype(expr, dtype))


# --------------------------------------------------------------------------------------------------
# Passes


@relax.expr_functor.mutator
class _BatchNormRewriter(relax.PyExprMutator):
    """Replace the batch_norm bindings listed in ``rewriters`` (var -> (rewriter, site))."""

    def __init__(self, mod, rewriters):
        super().__init__(mod)
        self.rewriters = rewriters
        self.error: Exception | None = None  # errors raised in here reach Python as FFI RuntimeErrors

    def visit_var_binding_(self, binding):
        entry = self.rewriters.get(binding.var)
        if entry is None:
            return super().visit_var_binding_(binding)
        rewriter, site = entry
        try:
            replacement = rewriter(self.builder_, site, self.visit_expr)
        except UnsupportedModelError as e:
            self.error = e
            raise
        self.set_var_remap(binding.var, self.builder_.emit(replacement, name_hint=binding.var.name))


def _rewrite(mod: tvm.IRModule, action: str, rewriter) -> tvm.IRModule:
    new_mod = mod
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        todo = {s.var: (rewriter, s) for s in analyze_batchnorms(func) if s.action == action}
        if not todo:
            continue
        mutator = _BatchNormRewriter(new_mod, todo)
        try:
            new_func = mutator.visit_expr(func)
        except Exception:
            if mutator.error is not None:
                raise mutator.error from None
            raise
        new_mod = _updated(new_mod, gvar, new_func)
    return mod if new_mod is mod else _tidy(new_mod)


def _updated(mod: tvm.IRModule, gvar, func) -> tvm.IRModule:
    functions = dict(mod.functions.items())
    functions[gvar] = func
    return tvm.IRModule(functions, attrs=mod.attrs)


def _tidy(mod: tvm.IRModule) -> tvm.IRModule:
    """Forward tuple items of the replaced calls and drop the now-unused original conv/BN bindings."""
    return tvm.transform.Sequential(
        [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()]
    )(mod)


def fold_conv_batchnorm(mod: tvm.IRModule) -> tvm.IRModule:
    """Pass 1: fold each eligible inference BN into its convolution."""
    return _rewrite(mod, FOLD, fold_into_conv)


def lower_inference_batchnorm(mod: tvm.IRModule) -> tvm.IRModule:
    """Pass 2: every remaining inference BN -> elementwise scale and shift."""
    return _rewrite(mod, SCALE_SHIFT, scale_shift)


def decompose_training_batchnorm(mod: tvm.IRModule, running_var: str = "onnx") -> tvm.IRModule:
    """Pass 3: every training BN -> bndeploy's ONNX-spec decomposition."""
    return _rewrite(mod, TRAINING, training_decomposition(running_var))


def rewrite_batchnorms(mod: tvm.IRModule, running_var: str = "onnx") -> tvm.IRModule:
    """All three passes, in the order that lets folding see the untouched conv -> BN chains."""
    mod = fold_conv_batchnorm(mod)
    mod = lower_inference_batchnorm(mod)
    mod = decompose_training_batchnorm(mod, running_var)
    assert_no_batchnorm(mod)
    return mod


def assert_no_batchnorm(mod: tvm.IRModule) -> None:
    """After bndeploy's passes no relax.nn.batch_norm may reach TVM's own lowering."""
    left = [s.var.name for f in _relax_functions(mod) for s in analyze_batchnorms(f)]
    if left:
        raise UnsupportedModelError(f"batch_norm left after bndeploy's passes (a bug): {', '.join(left)}")


def _relax_functions(mod: tvm.IRModule):
    return [f for f in mod.functions.values() if isinstance(f, relax.Function)]


# --------------------------------------------------------------------------------------------------
# Fusion report


def fusion_report(mod: tvm.IRModule, batchnorm_names: list[str] | None = None,
                  conv_names: list[str] | None = None) -> list[dict]:
    """One {batchnorm, conv, folded, reason} entry per BN of ``mod`` (before the passes run).

    Relax keeps no ONNX node names; the importer emits nodes in ONNX graph order, so the k-th
    batch_norm (conv) binding is the k-th BatchNormalization (Conv) node. Names default to
    ``batch_norm_<k>`` / ``conv_<k>`` when not given or when the counts disagree.
    """
    report = []
    for func in _relax_functions(mod):
        sites = analyze_batchnorms(func)
        convs = [b.value for b in _bindings(func) if isinstance(b.value, relax.Call) and b.value.op.name in CONV_OPS]
        bn_names = _names_or_default(batchnorm_names, len(sites), "batch_norm")
        cv_names = _names_or_default(conv_names, len(convs), "conv")
        for name, site in zip(bn_names, sites):
            conv_name = None
            if site.conv_call is not None:
                conv_name = cv_names[_index_of(convs, site.conv_call)]
            report.append({"batchnorm": name, "conv": conv_name, "folded": site.action == FOLD, "reason": site.reason})
    return report


def _index_of(items, item) -> int:
    return next(i for i, x in enumerate(items) if x.same_as(item))


def _names_or_default(names, count, prefix):
    if names is not None and len(names) == count:
        return list(names)
    return [f"{prefix}_{k}" for k in range(count)]
