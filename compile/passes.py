"""Relax graph rewrites for BatchNorm: each a dpl pattern plus a rewriter, applied by one small mutator.

Every ``relax.nn.batch_norm`` the ONNX importer produces is replaced by bndeploy's own arithmetic, so
no TVM batch-norm lowering is ever relied on (see shared/notes/bn-semantics.md for why):

1. inference BN after a linear op (Conv, ConvTranspose, Gemm/MatMul: constant weight, optional constant
   per-channel bias, constant BN params, no other consumer on the way; reshapes that keep the channel
   axis looked through) -> the op with folded weight and bias (fold_rules.py: one rule per kind of op);
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
from tvm.relax.dpl import is_op, wildcard

from bndeploy.errors import UnsupportedModelError

from .fold_rules import LINEAR_OPS, FoldTarget, constant_value, fold_target, linear_kind

RUNNING_VAR_MODES = ("onnx", "torch")

# What happens to a BN; the pass that handles each kind.
FOLD, SCALE_SHIFT, TRAINING = "fold", "scale_shift", "training"


# --------------------------------------------------------------------------------------------------
# Pattern


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
    target: FoldTarget | None = None  # the linear op feeding this BN (folded or not)
    bias: np.ndarray | None = None  # FOLD: the per-channel constant added between the op and the BN
    channel_axis: int = 1  # FOLD: the axis of the op's output the BN normalises
    through: list[relax.Call] = field(default_factory=list)  # reshapes between the op and the BN, BN side first


# Ops that move no data between channels, looked through between a linear op and its BN.
RESHAPE_OPS = ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims")


def use_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many bindings (and the function's result) use each variable."""
    counts: dict[relax.Var, int] = {}

    def count(expr):
        for var in relax.analysis.used_vars(expr):
            counts[var] = counts.get(var, 0) + 1

    for binding in bindings(func):
        count(binding.value)
    count(func.body.body)
    return counts


def bindings(func: relax.Function):
    """Every binding of ``func``'s body, block by block, in order."""
    for block in func.body.blocks:
        yield from block.bindings


@dataclass
class _Producer:
    """What feeds a BN: [linear op] [+ bias] [-> reshapes], with the vars on the way."""

    target: FoldTarget | None = None
    bias: relax.Expr | None = None  # what is added to the op's output
    bias_value: np.ndarray | None = None  # its value, when it is built from constants only
    through: list[relax.Call] = field(default_factory=list)
    chain: list[relax.Var] = field(default_factory=list)


def _call_of(var, var2val) -> relax.Call | None:
    value = var2val.get(var) if isinstance(var, relax.Var) else None
    return value if isinstance(value, relax.Call) and hasattr(value.op, "name") else None


def _producer(bn_call: relax.Call, var2val) -> _Producer:
    found = _Producer()
    value = bn_call.args[0]
    call = _call_of(value, var2val)
    while call is not None and call.op.name in RESHAPE_OPS:
        found.chain.append(value)
        found.through.append(call)
        value = call.args[0]
        call = _call_of(value, var2val)
    if call is None:
        return found
    found.chain.append(value)
    if call.op.name == "relax.add":
        for inner, bias in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            inner_call = _call_of(inner, var2val)
            if inner_call is not None and inner_call.op.name in LINEAR_OPS:
                found.chain.append(inner)
                found.target, found.bias = fold_target(inner_call, var2val), bias
                found.bias_value = constant_value(bias, var2val)
                return found
        return found
    found.target = fold_target(call, var2val)
    return found


def _static_shape(expr) -> list[int] | None:
    values = expr.ty.shape.values if hasattr(expr.ty, "shape") and expr.ty.shape is not None else None
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return [int(d) for d in values]


def _axis_before(call: relax.Call, axis: int) -> int | None:
    """The input axis of a reshape-like call that becomes its output's `axis`, all of it and only it,
    with the same elements before it (None when the reshape splits or merges that axis)."""
    out_shape, in_shape = _static_shape(call), _static_shape(call.args[0])
    if out_shape is None or in_shape is None:
        return None
    before = int(np.prod(out_shape[:axis]))
    for candidate, size in enumerate(in_shape):
        if size == out_shape[axis] and int(np.prod(in_shape[:candidate])) == before:
            return candidate
    return None


def _per_channel(bias: np.ndarray, out_ndim: int, axis: int, channels: int) -> np.ndarray | None:
    """A bias broadcast over the op's output as one value per channel of `axis` (None: it varies along
    another axis)."""
    shape = [1] * (out_ndim - bias.ndim) + list(bias.shape)
    if len(shape) != out_ndim or any(size != 1 for a, size in enumerate(shape) if a != axis):
        return None
    if shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)).copy()


def _fold_blocker(site_call, found: _Producer, uses) -> str | None:
    """Why this inference BN cannot be folded into the op before it; None when it can."""
    if not all(isinstance(p, Constant) for p in site_call.args[1:]):
        return "scale/bias/mean/var are not constants (graph inputs): rewritten to the elementwise formula"
    target = found.target
    if target is None:
        return "no Conv, ConvTranspose, Gemm or MatMul before it: rewritten to an elementwise scale and shift"
    if target.weight is None:
        return f"the {target.kind} weight is not a constant: rewritten to an elementwise scale and shift"
    shared = [str(v.name) for v in found.chain if uses.get(v, 0) > 1]
    if shared:
        return (
            f"the {target.kind} output ({', '.join(shared)}) has another consumer: folding would change it; "
            "rewritten to an elementwise scale and shift"
        )
    axis = int(site_call.attrs.axis)
    for call in found.through:
        axis = _axis_before(call, axis) if axis is not None else None
    channels = target.channel_axis()
    if channels is None or axis != channels:
        where = "an axis the reshapes on the way split or merge" if axis is None else f"axis {axis} of its output"
        return (f"the BatchNorm normalises {where}, but the {target.kind}'s output channels are "
                f"{'in a layout bndeploy does not fold' if channels is None else f'axis {channels}'}: "
                "rewritten to an elementwise scale and shift")
    if found.bias is not None and _bias_vector(found, channels) is None:
        return f"the bias between the {target.kind} and the BN is not a per-channel constant: rewritten to scale and shift"
    return None


def _bias_vector(found: _Producer, axis: int) -> np.ndarray | None:
    shape = _static_shape(found.target.call)
    if found.bias_value is None or shape is None:
        return None
    return _per_channel(found.bias_value, len(shape), axis, shape[axis])


def analyze_batchnorms(func: relax.Function) -> list[BatchNormSite]:
    """Every batch_norm binding of ``func`` in binding order, with the action chosen for it."""
    var2val = relax.analysis.get_var2val(func)
    uses = use_counts(func)
    sites = []
    for binding in bindings(func):
        call = binding.value
        if not batchnorm_pattern().match(call):
            continue
        found = _producer(call, var2val)
        if bool(call.attrs.training):
            sites.append(BatchNormSite(binding.var, call, TRAINING, _TRAINING_REASON, found.target))
            continue
        blocker = _fold_blocker(call, found, uses)
        if blocker is not None:
            sites.append(BatchNormSite(binding.var, call, SCALE_SHIFT, blocker, found.target))
            continue
        axis = found.target.channel_axis()
        bias = _bias_vector(found, axis) if found.bias is not None else None
        through = f" (through {', '.join(c.op.name.removeprefix('relax.') for c in found.through)})" if found.through else ""
        sites.append(BatchNormSite(binding.var, call, FOLD, f"folded into the {found.target.kind}{through}",
                                   found.target, bias, axis, found.through))
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


def fold_into_producer(bb: relax.BlockBuilder, site: BatchNormSite, remap) -> relax.Expr:
    """op(x, W) [+ b] [-> reshapes] -> BN  ==>  op(x, W * s) + ((b - mean) * s + beta) [-> reshapes],
    s = gamma / sqrt(var + eps), per output channel of the op (fold_rules.py says where they lie).

    Folding is done in float64 and rounded once to the weight dtype.
    """
    call, target = site.call, site.target
    gamma, beta, mean, var = _bn_constants(call)
    scale = gamma / np.sqrt(var + float(call.attrs.epsilon))
    bias = np.zeros_like(scale) if site.bias is None else site.bias
    op = target.rebuilt(bb, remap(target.call.args[target.data_index]), target.scaled_weight(scale))
    folded_bias = ((bias - mean) * scale + beta).astype(target.weight.dtype)
    out_ndim = len(target.call.ty.shape.values)
    y = bb.emit(relax.op.add(op, relax.const(folded_bias.reshape(_channel_shape(out_ndim, site.channel_axis, -1)))))
    for reshape in reversed(site.through):
        y = bb.emit(relax.Call(reshape.op, [y, *(remap(a) for a in reshape.args[1:])], reshape.attrs, reshape.ty_args))
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

    def __init__(self, mod, rewriters, item_names):
        super().__init__(mod)
        self.rewriters = rewriters
        self.item_names = item_names  # BN var -> {output index: name of the variable that takes that output}
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
        replacement = self._named_outputs(replacement, self.item_names.get(binding.var, {}))
        self.set_var_remap(binding.var, self.builder_.emit(replacement, name_hint=binding.var.name))

    def _named_outputs(self, replacement, names: dict[int, str]):
        """Bind each output the rewrite computed under the name of the variable that took that BN output (the
        ONNX tensor's, kernel_map.py), so `check --locate` still finds a BatchNorm's output after the rewrite;
        the unnamed binding it replaces is left unused and removed."""
        if not isinstance(replacement, relax.Tuple) or not names:
            return replacement
        fields = []
        for index, item in enumerate(replacement.fields):
            value = self.builder_.lookup_binding(item) if isinstance(item, relax.Var) and index in names else None
            fields.append(item if value is None else self.builder_.emit(value, name_hint=names[index]))
        return relax.Tuple(fields)


def _tuple_item_names(func: relax.Function) -> dict:
    """var -> {index: name} for every ``name = var[index]`` binding."""
    names: dict = {}
    for binding in bindings(func):
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and isinstance(value.tuple_value, relax.Var):
            names.setdefault(value.tuple_value, {})[int(value.index)] = binding.var.name
    return names


def _rewrite(mod: tvm.IRModule, action: str, rewriter) -> tvm.IRModule:
    new_mod = mod
    for gvar, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        todo = {s.var: (rewriter, s) for s in analyze_batchnorms(func) if s.action == action}
        if not todo:
            continue
        mutator = _BatchNormRewriter(new_mod, todo, _tuple_item_names(func))
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
    """Pass 1: fold each eligible inference BN into the linear op before it."""
    return _rewrite(mod, FOLD, fold_into_producer)


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
                  op_names: dict[str, list[str]] | None = None) -> list[dict]:
    """One {batchnorm, into, op, folded, reason} entry per BN of ``mod`` (before the passes run): `into`
    names the linear op before the BN (folded or not), `op` its kind (fold_rules: Conv, ConvTranspose,
    MatMul for Gemm and MatMul).

    Relax keeps no ONNX node names; the importer emits nodes in ONNX graph order, so the k-th batch_norm
    binding is the k-th BatchNormalization node and the k-th op of a kind the k-th ONNX node of that kind
    (`op_names[kind]`). Names default to ``batch_norm_<k>`` / ``<kind>_<k>`` when the counts disagree.
    """
    report = []
    for func in _relax_functions(mod):
        sites = analyze_batchnorms(func)
        bn_names = _names_or_default(batchnorm_names, len(sites), "batch_norm")
        ops_by_kind: dict[str, list[relax.Call]] = {}
        for binding in bindings(func):
            kind = linear_kind(binding.value)
            if kind is not None:
                ops_by_kind.setdefault(kind, []).append(binding.value)
        for name, site in zip(bn_names, sites):
            into = kind = None
            if site.target is not None:
                kind = site.target.kind
                calls = ops_by_kind[kind]
                names = _names_or_default((op_names or {}).get(kind), len(calls), kind.lower().replace("/", "_"))
                into = names[_index_of(calls, site.target.call)]
            entry = {"batchnorm": name, "into": into, "op": kind, "folded": site.action == FOLD, "reason": site.reason}
            if site.action == TRAINING:
                entry["statistics"] = SEPARATE_STATISTICS
            report.append(entry)
    return report


SEPARATE_STATISTICS = "a one-pass statistics kernel of its own (reads the BN's input once more)"


def place_statistics(report: list[dict], fused_convs: list[str], device: str) -> list[dict]:
    """The fusion report for one target: each train-mode BN says where its batch statistics are summed,
    given the convs (by ONNX node name) whose kernels sum them in their epilogue on this target."""
    placed = []
    for entry in report:
        if "statistics" in entry:
            entry = {**entry, "statistics": _statistics_placement(entry, fused_convs, device)}
        placed.append(entry)
    return placed


def _statistics_placement(entry: dict, fused_convs: list[str], device: str) -> str:
    if entry.get("op") == "Conv" and entry.get("into") in fused_convs:
        return f"fused into {entry['into']}: summed in the conv kernel's epilogue"
    if entry.get("op") != "Conv":
        return f"{SEPARATE_STATISTICS}: no Conv before it"
    if device == "cuda":
        return (f"{SEPARATE_STATISTICS}: {entry['into']} is not a one-group float32 conv with constant weights "
                "and a static shape (what the CUDA conv + statistics kernel computes)")
    return (f"{SEPARATE_STATISTICS}: {entry['into']} has no register-tiled direct kernel on this target "
            "(depthwise convs, groups narrower than a vector, other dtypes) to add the sums to")


def _index_of(items, item) -> int:
    return next(i for i, x in enumerate(items) if x.same_as(item))


def _names_or_default(names, count, prefix):
    if names is not None and len(names) == count:
        return list(names)
    return [f"{prefix}_{k}" for k in range(count)]
