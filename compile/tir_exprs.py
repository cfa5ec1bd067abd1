"""Queries and rewrites of TIR that schedules and lowering passes share."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds


def vars_in(expr) -> list:
    """The variables `expr` uses (repeats included)."""
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append))
    return found


def loads_in(node) -> list[TensorLoad]:
    """The tensor loads in `node` (an expression or statement), in walk order, repeats included."""
    found = []
    tvm_ffi.structural_walk(node, (TensorLoad, found.append))
    return found


def element_bytes(buffer) -> int:
    """Bytes of one element of `buffer` (a Buffer or buffer type)."""
    return tvm.runtime.DataType(buffer.dtype).bits // 8


def substitute(node, values: dict):
    """`node` with each variable that is a key of `values` replaced by its value."""
    return tvm_ffi.structural_map(node, (tirx.Var, lambda var: values.get(var, var)))


def const_like(expr, value: int) -> tirx.PrimExpr:
    """`value` as a constant of `expr`'s type."""
    return tirx.const(value, str(expr.ty.dtype))


def block_nests(stmt) -> list:
    """(the loops enclosing it below `stmt`, outermost first; the realize) of every block under `stmt`,
    in program order, nested blocks and a block's init included."""
    nests = []

    def visit(node, loops):
        if isinstance(node, tirx.For):
            loops = loops + [node]
        if isinstance(node, s_tir.SBlockRealize):
            nests.append((loops, node))
        for child in _child_stmts(node):
            visit(child, loops)

    visit(stmt, [])
    return nests


def _child_stmts(stmt) -> list:
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    children = (getattr(stmt, name, None) for name in ("block", "body", "then_case", "else_case", "init"))
    return [child for child in children if isinstance(child, tirx.Stmt)]


def bindings_of(realize) -> dict:
    """Each block variable of `realize`'s block -> the value it is bound to."""
    return {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}


def reduction_bindings(realize) -> list:
    """The values `realize` binds its block's reduction variables to (none: not a reduction update)."""
    return [value for iv, value in zip(realize.block.iter_vars, realize.iter_values)
            if iv.iter_type == tirx.IterVar.CommReduce]


def loops_driving(loops: list, values: list) -> list:
    """The `loops` whose variables occur in `values`."""
    used = [var for value in values for var in vars_in(value)]
    return [loop for loop in loops if any(loop.loop_var.same_as(var) for var in used)]
