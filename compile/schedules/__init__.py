"""bndeploy's CPU kernels and schedules: applied by `bndeploy.compile.cpu.build_cpu`, no tuning needed.

- conv2d.py: NCHW conv2d (+bias +ReLU) with compile-time packed weights, register-tiled for AVX-512.
- bn_stats.py: one-pass, numerically sound training-mode BatchNorm statistics.
- generic.py: parallel + vectorised schedules for every other (elementwise, reduction) kernel.
- relax_rewrite.py: routes Relax conv2d chains and batch statistics to those kernels.
"""

from .bn_stats import BatchStatsSpec, build_batch_stats_primfunc
from .conv2d import SCHEDULED_ATTR, ConvSpec, Tiling, build_conv2d_primfunc, choose_tiling, pack_weight
from .generic import schedule_cpu_kernels, schedule_func
from .relax_rewrite import rewrite_to_kernels

__all__ = [
    "SCHEDULED_ATTR",
    "BatchStatsSpec",
    "ConvSpec",
    "Tiling",
    "build_batch_stats_primfunc",
    "build_conv2d_primfunc",
    "choose_tiling",
    "pack_weight",
    "rewrite_to_kernels",
    "schedule_cpu_kernels",
    "schedule_func",
]
