"""ONNX models below opset 14, converted in memory before import: the rest of bndeploy sees opset 14+.

BatchNormalization-14 is the first version that states its mode (`training_mode`); its older forms are
mapped exactly or refused:
- opsets 9-13: the same inference semantics (Y only); converted by onnx.version_converter.
- opsets 7-8: `spatial=1` (the default) is the same; `spatial=0` (statistics per activation, not per
  channel) is refused.
- before 14, training mode was implied by extra outputs (running mean/var, saved mean/var). ONNX Runtime
  refuses such nodes ("output size not in allowed output sizes"), so there is no reference to check them
  against: they are refused, with the way out (export at opset 14+).
- before 7, BatchNormalization carried `is_test` and `consumed_inputs`, and other operators a `broadcast`
  attribute: bndeploy does not convert opsets that old.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, version_converter

from bndeploy.errors import UnsupportedModelError

OLDEST_OPSET = 7
CONVERTED_OPSET = 14


def ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def convert_old_opset(model: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, dict | None]:
    """(the model at opset 14 or later, the conversion's record or None when none was needed). The model
    has passed `refuse_unsupported_opset`."""
    opset = ai_onnx_opset(model)
    if opset is None or opset >= CONVERTED_OPSET:
        return model, None
    try:
        converted = version_converter.convert_version(model, CONVERTED_OPSET)
    except Exception as e:  # the converter raises RuntimeError/ConvertError with the C++ assertion text
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{path}: converting ONNX opset {opset} to {CONVERTED_OPSET} failed "
                                    f"(onnx.version_converter: {detail})") from None
    return converted, {"from_opset": opset, "to_opset": CONVERTED_OPSET,
                       "by": f"onnx.version_converter (onnx {onnx.__version__})"}


def refuse_unsupported_opset(model: onnx.ModelProto, path: Path) -> None:
    """Refuse, with the reason and the way out, an opset newer than this onnx package knows (it could not even
    be checked), one too old to convert, or an old BatchNormalization form bndeploy does not map. Runs before
    onnx's own checker, whose message for these would not say what to do."""
    opset = ai_onnx_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise UnsupportedModelError(
            f"{path}: ONNX opset {opset} is newer than this onnx package knows ({newest}): upgrade onnx "
            f"(pip install -U onnx) or convert the model down (onnx.version_converter)")
    if opset is None or opset >= CONVERTED_OPSET:
        return
    if opset < OLDEST_OPSET:
        raise UnsupportedModelError(
            f"{path}: ONNX opset {opset} is older than {OLDEST_OPSET}, the oldest bndeploy converts "
            f"(BatchNormalization's is_test/consumed_inputs era): re-export the model at opset 14 or later")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            _refuse_old_batchnorm_form(node, opset, path)


def _refuse_old_batchnorm_form(node: onnx.NodeProto, opset: int, path: Path) -> None:
    name = node.name or node.output[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("spatial", 1) == 0:
        raise UnsupportedModelError(
            f"{path}: BatchNormalization {name!r} (opset {opset}) has spatial=0, statistics per activation "
            "instead of per channel (removed in opset 9): bndeploy compiles per-channel BatchNorm only")
    if sum(1 for output in node.output if output) > 1:
        raise UnsupportedModelError(
            f"{path}: BatchNormalization {name!r} (opset {opset}) has training outputs: before opset 14 train "
            "mode is implied by them, and ONNX Runtime refuses such nodes, so nothing can check them; export "
            "at opset 14 or later for train mode (bndeploy export writes opset 20)")
