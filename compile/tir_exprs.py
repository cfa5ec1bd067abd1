"""Queries and rewrites of TIR expressions that schedules and lowering passes share."""

from __future__ import annotations

import tvm_ffi
from tvm import tirx


def vars_in(expr) -> list:
    """The variables `expr` uses (repeats included)."""
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append))
    return found


def substitute(node, values: dict):
    """`node` with each variable that is a key of `values` replaced by its value."""
    return tvm_ffi.structural_map(node, (tirx.Var, lambda var: values.get(var, var)))
