"""bndeploy's CPU kernels and schedules: applied by `bndeploy.compile.cpu.build_cpu`, no tuning needed.

- isa.py: the target's vector ISA (lanes, registers, FMA pipes): what every tile is sized from.
- conv2d.py: NHWC conv2d kernels (direct, grouped, depthwise) with packed weights and the tile model.
- conv_schedule.py: the register-tiled schedule of a conv kernel fused with its epilogue.
- bn_stats.py: one-pass, numerically sound training-mode BatchNorm statistics.
- generic.py: parallel + vectorised schedules for every other (elementwise, reduction) kernel.
- relax_rewrite.py: channels-last layout; routes Relax conv2d and batch statistics to those kernels.
- interleave_inputs.py: a conv feeding a grouped conv writes its channels in the order that conv reads.
"""

from .bn_stats import BatchStatsSpec, build_batch_stats_primfunc
from .conv2d import ConvSpec, Tiling, choose_tiling, conv2d_compute, pack_weight
from .generic import SCHEDULED_ATTR, TUNED_ATTR, schedule_cpu_kernels, schedule_func
from .interleave_inputs import interleave_grouped_inputs
from .isa import VectorISA, isa_for_target
from .relax_rewrite import convert_to_channels_last, rewrite_to_kernels

__all__ = [
    "SCHEDULED_ATTR",
    "TUNED_ATTR",
    "BatchStatsSpec",
    "ConvSpec",
    "Tiling",
    "VectorISA",
    "build_batch_stats_primfunc",
    "choose_tiling",
    "conv2d_compute",
    "convert_to_channels_last",
    "interleave_grouped_inputs",
    "isa_for_target",
    "pack_weight",
    "rewrite_to_kernels",
    "schedule_cpu_kernels",
    "schedule_func",
]
