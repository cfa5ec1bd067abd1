"""CPU code generation: Relax module (after bndeploy's graph passes) -> scheduled TVM executable."""

from __future__ import annotations

import tvm
from tvm import relax


def build_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> relax.Executable:
    """Compile a Relax module for an llvm target. Placeholder: TVM's default (unscheduled) pipeline."""
    return tvm.compile(mod, target=target)
