"""NHWC conv2d kernels with compile-time packed weights, register tiles sized from the target's vector ISA.

The CPU pipeline converts every conv2d to NHWC (channels contiguous), so a whole network runs in one
layout and no kernel transposes. Each conv2d with constant weights becomes a call to an unscheduled
TE kernel marked out-elementwise-fusable: TVM's FuseOps then fuses the elementwise chain after it (bias,
residual add, ReLU/ReLU6/SiLU/HardSwish, ...) into the same PrimFunc, and `schedule_conv` writes that
epilogue from the register tile, so a conv->BN->ReLU (->add) block reads and writes memory once.

Two kernel kinds, both tiling `pixel_block` output pixels (of the flattened OH*OW axis, so a 7x7 map
wastes no lanes on row ends) by `channel_block` output channels:
- direct (dense and grouped): the tile's accumulators stay in vector registers over the whole reduction
  (kh, kw, input channels of the group); per step one weight vector load per `lanes` channels and one
  broadcast input per pixel. A grouped conv's channel block lies inside one group (RegNet's 8- and
  16-channel groups take a half or a whole AVX-512 vector).
- interleaved (grouped, fewer output channels per group than a vector has lanes): the outputs of
  several groups share each vector, channel j of group g in lane j * groups_per_vector + g, and a padding
  copy stores each group's input channels interleaved the same way, so the inputs one step needs are
  consecutive floats read with one wide broadcast (64 bits for two groups). Where the conv producing the
  input writes it in that order already (interleave_inputs.py), the kernel reads it in place.
- paired (grouped, two groups a vector, its input not stored interleaved): one group per vector, its lanes
  (output channel, input channel of a pair), reading plain NHWC in place; the epilogue adds lane pairs.
- depthwise: vectors over channels, one FMA per tap and pixel, accumulators in registers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
from tvm import te, tirx

from .isa import VectorISA

CONV_BLOCK_ATTR = "bndeploy.conv"  # block annotation: "<kind>:<pixel_block>:<channel_block>"
CONV_FLOPS_ATTR = "bndeploy.conv_flops"  # block annotation: the conv's useful FLOPs (for profiles)
OUT_EWISE_FUSABLE = 4  # relax OpPatternKind.kOutEWiseFusable: FuseOps appends elementwise consumers
DIRECT, INTERLEAVED, PAIRED, DEPTHWISE = "direct", "interleaved", "paired", "depthwise"
MAX_CHANNEL_VECTORS = 4


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D convolution (or transposed convolution) over an NHWC input is: sizes, kernel, strides,
    padding and dilation, as the ONNX attributes give them."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class ConvSpec(ConvGeometry):
    """A 2-D convolution on NHWC data with OIHW weights (the ONNX weight layout)."""

    groups: int = 1
    # "NCHW": the kernel takes the NCHW tensor and its padding copy transposes it (a network's input,
    # which would otherwise be transposed by a kernel of its own first). "NC": a dense layer (matmul),
    # (width rows, in_channels) in and (width rows, out_channels) out: a 1x1 conv over a 1 x rows image.
    input_layout: str = "NHWC"
    # > 1: the NHWC input holds its channels in the order an interleaved tile of this many groups per vector
    # reads them (`interleaved_input_order`; its producer wrote them so), the last vector's missing groups
    # as padding channels; the kernel then reads its input in place, with no copy.
    input_groups_interleaved: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        n, h, w, c = self.batch, self.height, self.width, self.in_channels
        if self.input_layout == "NC":
            return (w, c)
        if self.input_groups_interleaved > 1:
            c = _ceil_to(self.groups, self.input_groups_interleaved) * self.in_per_group
        return (n, c, h, w) if self.input_layout == "NCHW" else (n, h, w, c)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.input_layout == "NC":
            return (self.width, self.out_channels)
        return (self.batch, self.out_height, self.out_width, self.out_channels)

    @staticmethod
    def dense(rows: int, in_features: int, out_features: int) -> "ConvSpec":
        return ConvSpec(1, 1, rows, in_features, out_features, (1, 1), input_layout="NC")

    @property
    def out_height(self) -> int:
        span = (self.kernel[0] - 1) * self.dilation[0] + 1
        return (self.height + self.padding[0] + self.padding[2] - span) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        span = (self.kernel[1] - 1) * self.dilation[1] + 1
        return (self.width + self.padding[1] + self.padding[3] - span) // self.strides[1] + 1

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    @property
    def padded(self) -> bool:
        return any(self.padding)

    @property
    def reduction_steps(self) -> int:
        """Multiply-adds per output value: the kernel's taps over the group's input channels."""
        return self.kernel[0] * self.kernel[1] * self.in_per_group

    @property
    def input_bytes(self) -> int:
        """The float32 input's size, as the network holds it."""
        return 4 * self.batch * self.height * self.width * self.in_channels

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.pixels * self.out_channels * self.reduction_steps


@dataclass(frozen=True)
class Tiling:
    kind: str  # DIRECT, INTERLEAVED, PAIRED or DEPTHWISE
    pixel_block: int  # output pixels per register tile
    channel_block: int  # output channels per register tile

    lanes: int = 0  # the vector width the channel block is computed in (0: the whole block)
    pixels_outer: bool = False  # direct: tiles of pixels outside channel blocks (see tile_order)

    @property
    def vector_lanes(self) -> int:
        return self.lanes or self.channel_block

    def annotation(self) -> str:
        order = "pixels-outer" if self.pixels_outer else "channels-outer"
        return f"{self.kind}:{self.pixel_block}:{self.channel_block}:{self.vector_lanes}:{order}"

    @staticmethod
    def from_annotation(text: str) -> "Tiling":
        kind, pixels, channels, lanes, order = str(text).split(":")
        return Tiling(kind, int(pixels), int(channels), int(lanes), order == "pixels-outer")


def _ceil_to(value: int, block: int) -> int:
    return -(-value // block) * block


def channel_blocks(spec: ConvSpec, tiling: Tiling) -> int:
    """Channel blocks of a direct conv's output (the last one padded with zero-weight channels)."""
    return -(-spec.out_channels // tiling.channel_block)


def padded_channels(spec: ConvSpec, tiling: Tiling) -> int:
    """Output channels of the accumulators and the packed weight: whole channel blocks."""
    return channel_blocks(spec, tiling) * tiling.channel_block


# --------------------------------------------------------------------------------------------------
# Register tile model


# Cycles a tile costs besides its reduction steps: computing its input addresses, loop control, and the
# epilogue's loads, arithmetic and stores per accumulator. A rough figure, but it keeps tiny tiles (a
# depthwise tile of a few pixels, whose reduction is only its taps) from looking free.
TILE_SETUP_CYCLES = 24
EPILOGUE_CYCLES_PER_ACCUMULATOR = 2


@dataclass(frozen=True)
class TileCost:
    """A register tile's predicted cost: `steps` reduction steps of `fmas` vector FMAs and `loads` vector
    or broadcast loads each, then its setup and epilogue."""

    accumulators: int  # vector registers holding the tile
    fmas: float  # per step, in full-width FMA slots
    loads: int  # per step
    steps: int
    useful: float  # share of the tile's lanes that compute real outputs (padded pixels and channels waste)
    chain: int = 1  # FMAs each accumulator takes one after the other per step (a kernel row's taps)

    def cycles(self, isa: VectorISA) -> float:
        step = max(self.fmas / isa.fma_pipes, self.loads / isa.load_ports, self.chain * isa.fma_latency)
        return self.steps * step + TILE_SETUP_CYCLES + EPILOGUE_CYCLES_PER_ACCUMULATOR * self.accumulators

    def efficiency(self, isa: VectorISA) -> float:
        """Useful FMAs per cycle over the FMA pipes' peak."""
        return self.useful * self.fmas * self.steps / (self.cycles(isa) * isa.fma_pipes)



EFFICIENCY_TIE = 0.01  # the model is not more precise than this: such candidates are equals


def best_tiling(candidates: list[tuple[Tiling, TileCost]], isa: VectorISA) -> Tiling | None:
    """The most efficient tile; among those within EFFICIENCY_TIE of it, the fewest loads per FMA, then
    the most accumulators."""
    if not candidates:
        return None
    top = max(cost.efficiency(isa) for _, cost in candidates)
    equals = [(tiling, cost) for tiling, cost in candidates if cost.efficiency(isa) >= top - EFFICIENCY_TIE]
    return min(equals, key=lambda pair: (pair[1].loads / pair[1].fmas, -pair[1].accumulators))[0]


def _channel_blocks(isa: VectorISA) -> list[int]:
    """Whole vectors, then halves, quarters, ... of a vector down to 4 lanes (an 8-channel group on
    AVX-512 takes a ymm, ResNeXt's 4-channel groups an xmm: without them such a conv had no tile and fell
    to TVM's generic kernel). A block of several vectors is computed one register-wide vector at a time
    (LLVM splits a 48-lane vector into shuffles and stack traffic, not into three registers)."""
    parts = [isa.lanes >> shift for shift in range(1, isa.lanes.bit_length()) if isa.lanes >> shift >= 4]
    return [vectors * isa.lanes for vectors in range(1, MAX_CHANNEL_VECTORS + 1)] + parts


def _direct_blocks(isa: VectorISA) -> list[tuple[int, int]]:
    """(channel block, lanes of the vectors it is computed in) for direct convs: `_channel_blocks`, and where
    half-width vectors cost half a full one, blocks of an odd number of them (24 channels as three ymm)."""
    blocks = [(block, min(isa.lanes, block)) for block in _channel_blocks(isa)]
    if isa.half_width_fmas > 1:
        half = isa.lanes // 2
        blocks += [(halves * half, half) for halves in range(3, 2 * MAX_CHANNEL_VECTORS, 2)]
    return blocks


def _vector_slots(isa: VectorISA, lanes: int) -> float:
    """Full-width FMA slots one FMA on a vector of `lanes` takes."""
    return max(lanes / isa.lanes, 1 / isa.half_width_fmas)


def _fits_groups(spec: ConvSpec, channel_block: int) -> bool:
    """A grouped conv's channel block lies inside one group: its input channels are that group's.
    (A block spanning groups would need zero weights for the other groups' inputs, and 0 * NaN = NaN
    would leak a NaN input into every group of the block.)"""
    return spec.groups == 1 or spec.out_per_group % channel_block == 0


def direct_tiling(spec: ConvSpec, isa: VectorISA) -> Tiling | None:
    """The register tile (pixels x channel vectors) the cost model rates best on this ISA.

    Registers: accumulators + one weight vector per channel vector + the broadcast must fit the register
    file. Per reduction step the tile issues one FMA per accumulator and loads its weight vectors and one
    broadcast per pixel; the step takes the longest of FMA issue, load issue and FMA latency. Efficiency
    is useful FMAs per cycle (lanes wasted on padded pixels, padded channels and partial vectors count as
    lost) over the FMA peak; ties go to fewer loads per FMA, then more accumulators."""
    candidates = _direct_candidates(spec, isa, isa.tile_budget)
    if spec.groups > 1:
        return _row_aligned_if_close(spec, candidates, isa, isa.tile_budget - BORDER_TEST_REGISTERS)
    if _short_spatial_reduction(spec):
        return _row_aligned_if_close(spec, candidates, isa, isa.tile_budget)
    return best_tiling(candidates, isa)


# A tile's pixels get their input rows and columns once per tile: a division by the output width per pixel
# where the tile crosses a row end, nothing more where it lies within a row (TVM's simplifier sees the row
# is the tile's). Over a reduction this short that index arithmetic is a large share of a tile's work:
# a network's 3x3 stem (3 channels in, 27 steps; 3 -> 32, stride 2, 224x224, AVX2 code, AMD EPYC Zen 4)
# ran at 47% of the FMA peak in the model's 6-pixel tiles and 81% in 4-pixel ones, four to 112 columns.
# The 7x7 stem's 147 steps run at 83-100% in tiles that cross rows.
SHORT_REDUCTION_STEPS = 64


def _short_spatial_reduction(spec: ConvSpec) -> bool:
    """A dense conv whose input pixel is not its output pixel (a spatial kernel, a stride or padding) and whose
    reduction is under SHORT_REDUCTION_STEPS steps."""
    spatial = spec.kernel != (1, 1) or spec.strides != (1, 1) or spec.padded
    return spatial and spec.reduction_steps < SHORT_REDUCTION_STEPS


def _direct_candidates(spec: ConvSpec, isa: VectorISA, registers: int) -> list[tuple[Tiling, TileCost]]:
    candidates = []
    for channel_block, lanes in _direct_blocks(isa):
        if not _fits_groups(spec, channel_block):
            continue
        vectors = -(-channel_block // lanes)
        slots = _vector_slots(isa, lanes)
        lane_use = channel_block / (vectors * lanes) * (lanes / isa.lanes) / slots  # real lanes per slot's
        max_rows = (registers - vectors - isa.broadcast_registers) // vectors
        channel_use = spec.out_channels / _ceil_to(spec.out_channels, channel_block)
        for rows in range(1, min(max_rows, spec.pixels) + 1):
            useful = lane_use * channel_use * spec.pixels / _ceil_to(spec.pixels, rows)
            cost = TileCost(rows * vectors, rows * vectors * slots, rows + vectors, spec.reduction_steps, useful)
            candidates.append((Tiling(DIRECT, rows, channel_block, lanes), cost))
    return candidates


def row_aligned(pixel_block: int, out_height: int, out_width: int) -> bool:
    """Whether every tile of the flattened output pixels lies within one row, or is whole rows: each of
    its pixels' row and column is then the tile's row plus a constant."""
    if pixel_block <= out_width:
        return out_width % pixel_block == 0
    return pixel_block % out_width == 0 and out_height % (pixel_block // out_width) == 0


# A grouped conv's row-aligned tile reads the zero border through a condition in its input loads
# (conv_schedule.py), which takes a register beside the tile's: without it, AVX2's 14-pixel tile (16 of 16
# registers) spilled 4 vectors per reduction step and ran at 42-50% of the FMA peak, against 75% as 7 pixels.
BORDER_TEST_REGISTERS = 1

# A grouped conv's row-aligned tile is taken over a tile of the same channel block the model rates up to
# this much better: the model does not see that the others read a padded copy of the input, a pass of its
# own. Measured (AMD EPYC Zen 4, 2 threads): 48 channels in groups of 8 on 56x56, AVX-512 code, 28-pixel
# tiles 0.116 ms against 0.195 for the model's 30; 128 channels in groups of 16, stride 2 to 14x14, 14-pixel
# tiles 0.037 ms against 0.052 for 28; 440 channels in groups of 8 on 7x7, 7-pixel tiles 0.020 ms against
# 0.022 for 25. A dense conv with a short reduction takes it over the same margin (SHORT_REDUCTION_STEPS):
# the model does not see a tile's index arithmetic either.
ROW_ALIGNED_MIN_EFFICIENCY = 0.85


def _row_aligned_if_close(spec: ConvSpec, candidates: list[tuple[Tiling, TileCost]], isa: VectorISA,
                          registers: int) -> Tiling | None:
    """The best of the row-aligned tiles (of `registers` registers) of the best tile's channel block, if the
    model rates it within ROW_ALIGNED_MIN_EFFICIENCY of the best tile; else the best tile."""
    best = best_tiling(candidates, isa)
    if best is None:
        return None
    aligned = [(tiling, cost)
               for tiling, cost in _direct_candidates(spec, isa, registers)
               if row_aligned(tiling.pixel_block, spec.out_height, spec.out_width)
               and tiling.channel_block == best.channel_block]
    if not aligned:
        return best
    top = max(cost.efficiency(isa) for _, cost in candidates)
    if max(cost.efficiency(isa) for _, cost in aligned) < ROW_ALIGNED_MIN_EFFICIENCY * top:
        return best
    return best_tiling(aligned, isa)


# Cache a tile loop can count on keeping its reused operand in: below a core's L2 on every CPU class
# bndeploy targets (512 KiB on Zen 2/3, 1-2 MiB on newer x86, 512 KiB-1 MiB on Cortex-A7x).
REUSE_CACHE_BYTES = 512 * 1024


def pixels_outer(spec: ConvSpec, channel_block: int, pixel_block: int) -> bool:
    """Loop order of a direct conv's tiles by the memory traffic each causes.

    Channel blocks outer: each block's weights are read once, but the input is swept once per block
    (from memory when it does not stay in cache). Pixel tiles outer: each tile's inputs are read once
    for all its channel blocks, but all weights are swept once per tile (from memory when they do not
    stay in cache). A 1x1 expansion over a large image (MobileNet: 16 -> 96 channels on 112x112 at
    batch 8, a 6.4 MB input and 6 KB of weights) wants pixels outer; a 3x3 conv of a small image with
    MBs of weights wants channels outer."""
    weights = 4 * spec.reduction_steps * spec.out_channels
    inputs = spec.input_bytes
    blocks, tiles = -(-spec.out_channels // channel_block), -(-spec.pixels // pixel_block) * spec.batch
    channels_first = weights + inputs * (1 if inputs <= REUSE_CACHE_BYTES else blocks)
    pixels_first = inputs + weights * (1 if weights <= REUSE_CACHE_BYTES else tiles)
    return pixels_first < channels_first


def depthwise_tiling(spec: ConvSpec, isa: VectorISA) -> Tiling | None:
    """Channels in vectors (a block must divide the channel count: inputs have no padded channels),
    pixels along one output row (`pixel_block` of them per tile). LLVM unrolls the taps of a kernel row and reuses each loaded input vector for every
    tap that reads it, so a row of `rows` pixels keeps `(rows - 1) * stride + kw` input vectors live
    beside its accumulators and the tap's weight vector: all of them must fit the register file (seen
    otherwise: loaded inputs spilled to the stack and reloaded). Per kernel row the tile issues
    rows * kw FMAs and loads its inputs once and kw weight vectors, per channel vector."""
    candidates = []
    kw, stride = spec.kernel[1], spec.strides[1]
    blocks = [b for b in _channel_blocks(isa) if spec.out_channels % b == 0]
    for channel_block in blocks:
        vectors = -(-channel_block // isa.lanes)
        lane_use = channel_block / (vectors * isa.lanes)
        for rows in range(1, spec.out_width + 1):
            inputs = (rows - 1) * stride + (kw - 1) * spec.dilation[1] + 1
            if vectors * (rows + inputs + 1) + isa.depthwise_spare_registers > isa.tile_budget:
                break
            useful = lane_use * spec.out_width / _ceil_to(spec.out_width, rows)
            cost = TileCost(rows * vectors, rows * vectors * kw, (inputs + kw) * vectors, spec.kernel[0], useful)
            candidates.append((Tiling(DEPTHWISE, rows, channel_block, min(isa.lanes, channel_block)), cost))
    return best_tiling(candidates, isa)


# Output channels per group an interleaved tile takes at least: groups of 8 on AVX-512 and of 4 on both x86
# classes (ResNeXt's). Smaller groups, which NEON's 4 lanes would interleave, keep the direct tile.
MIN_INTERLEAVED_LANES = 4


def groups_per_vector(spec: ConvSpec, isa: VectorISA) -> int:
    """Groups whose output channels share one vector in an interleaved tile; 1 where the direct tile serves.

    A group of 8 output channels fills only half of an AVX-512 vector, and a direct tile's blocks may not
    span groups (`_fits_groups`), so its FMAs ran at most at half the peak: RegNet's grouped convs, 104
    channels in groups of 8 on 28x28, at 45% of AVX-512's FMA peak on AMD EPYC Zen 5 (2 threads). Where
    a half-width FMA costs half a full one (Zen 4: `half_width_fmas`), the direct tile loses nothing."""
    per_group = spec.out_per_group
    if spec.groups == 1 or spec.depthwise or spec.input_layout == "NC" or per_group < MIN_INTERLEAVED_LANES:
        return 1
    if isa.lanes % per_group or spec.groups < isa.lanes // per_group:
        return 1
    if _vector_slots(isa, per_group) * isa.lanes <= per_group:
        return 1
    return isa.lanes // per_group


def interleaved_tiling(spec: ConvSpec, isa: VectorISA) -> Tiling | None:
    """Tiles of one vector (`groups_per_vector` groups) by pixels: part of an output row (a divisor of its
    width) or whole rows (the last tile's missing rows computed on zeros and not written). A reduction step
    is one kernel row and input channel: its kw weight vectors stay in registers while the tile's input
    pixels are broadcast one after the other, each feeding the FMAs of every tap that reads it
    (conv_schedule.py). So the tile takes the registers but the kw weights and two broadcasts (one loading
    while the other feeds its FMAs), and per step issues kw FMAs per pixel and loads kw weight vectors and
    each input pixel of its rows once.

    Broadcast once per tap instead (a step per tap and channel), the tile issued a broadcast per FMA, and
    four groups' inputs are a 128-bit broadcast, which Zen 5 runs through an FP pipe beside the FMAs
    (28 FMAs each with such a broadcast: 5.6 FMAs/ns on one core, against 7.8 with 64-bit broadcasts).
    Measured, AVX-512 code on 2 threads of an AMD EPYC Zen 5, kernels alone reading in place: 128 channels
    in groups of 4 on 56x56 59% of the FMA peak -> 76-78%, on 28x28 61% -> 81-83%; 104 channels in groups of
    8 on 28x28 80% -> 85%."""
    per_vector = groups_per_vector(spec, isa)
    if per_vector == 1:
        return None
    useful_groups = spec.groups / _ceil_to(spec.groups, per_vector)
    (kh, kw), (_, stride), (_, dilation) = spec.kernel, spec.strides, spec.dilation
    width, candidates = spec.out_width, []
    # Read in place, the tile's loads test the border (BORDER_TEST_REGISTERS).
    registers = isa.tile_budget - kw - 2 * isa.broadcast_registers
    registers -= BORDER_TEST_REGISTERS if spec.input_groups_interleaved > 1 else 0
    for pixels in range(1, registers + 1):
        within_row = pixels <= width and width % pixels == 0
        if not (within_row or pixels % width == 0):
            continue
        rows, columns = tile_rows_and_columns(pixels, width)
        inputs = rows * ((columns - 1) * stride + (kw - 1) * dilation + 1)
        useful = useful_groups * spec.out_height / _ceil_to(spec.out_height, rows)
        cost = TileCost(pixels, pixels * kw, inputs + kw, kh * spec.in_per_group, useful, chain=kw)
        candidates.append((Tiling(INTERLEAVED, pixels, isa.lanes, isa.lanes), cost))
    return best_tiling(candidates, isa)


# An interleaved conv reads an input already stored in interleaved order (ConvSpec.input_groups_interleaved)
# in place, its zero border through conditions in the tile's loads, where its producer's output is still in
# cache: a tile reading in place waits on each line it first touches, where the copy streams them. Measured
# in RegNetY-400MF at batch 8 (AMD EPYC Zen 5, AVX-512 code, 2 threads), in place against the copy, with a
# broadcast per tap: 104 channels 28x28 (a 2.8 MB input) 0.46 ms against 0.51; 104 channels 56x56 -> 28x28
# (11 MB) 0.72 ms against 0.45; 48 channels 112x112 -> 56x56 (19 MB) 2.16 ms against 1.47. With a step per
# kernel row (interleaved_tiling), the whole network with every grouped conv in place: 19.9 ms against 18.9.
# How many pixels read the border does not matter since a step broadcasts each input pixel once: kernels
# alone, same CPU, in place against the copy with 27% of the pixels on the border (440 channels 14x14 ->
# 7x7) 68% of the FMA peak against 47%, with 49% (7x7) 79% against 67%, with 75% (4x4) 72% against 55%. (A
# broadcast per tap tested the border per FMA: 7x7 ran at 28-46% in place, and maps with more than a third
# of their pixels on the border took the copy.)
MAX_IN_PLACE_INPUT_BYTES = 4 * 1024 * 1024


def in_place_groups_per_vector(spec: ConvSpec, isa: VectorISA) -> int:
    """Groups per vector of the interleaved order this conv reads its input in place in, when its producer
    stores it so (compile/schedules/interleave_inputs.py); 1: it reads its input as it is.

    Read in place, a tile's loads test the border, which takes a register: where that shrinks the tile, the
    copy is the faster (AVX2, 128 channels in groups of 4 on 22x22: 2-pixel tiles in place at 56% of the FMA
    peak, 11-pixel tiles reading the copy at 79%; on 56x56 both take 8 pixels, in place at 81%, the copy at
    69%; AMD EPYC Zen 5, 2 threads)."""
    per_vector = groups_per_vector(spec, isa)
    return per_vector if per_vector > 1 and _in_place_tiling(spec, isa, per_vector) is not None else 1


def _in_place_tiling(spec: ConvSpec, isa: VectorISA, per_vector: int) -> Tiling | None:
    """The interleaved tile reading `spec`'s input in place as `per_vector` groups a vector, where that is
    faster than the copy: an NHWC input of at most MAX_IN_PLACE_INPUT_BYTES, and a tile the border test's
    register does not shrink below the copy's."""
    if spec.input_layout != "NHWC" or spec.input_bytes > MAX_IN_PLACE_INPUT_BYTES:
        return None
    copying = interleaved_tiling(spec, isa)
    in_place = interleaved_tiling(replace(spec, input_groups_interleaved=per_vector), isa)
    return in_place if copying is not None and in_place.pixel_block >= copying.pixel_block else None


# Output channels per group a paired tile takes at least: with fewer, its reduction (input channels of the
# group in pairs) is too short for the epilogue's lane-pair sums (groups of 4, AVX2 code, see paired_tiling).
MIN_PAIRED_GROUP = 8


def paired_tiling(spec: ConvSpec, isa: VectorISA) -> Tiling | None:
    """The paired tile, where an interleaved conv of 2 groups per vector would copy an input it could read
    in place (its producer does not store it interleaved): one group per vector, its lanes (output channel
    j, input channel p of a pair) as j * 2 + p, so a step broadcasts two consecutive input channels of one
    group as they lie in plain NHWC (64 bits, as the interleaved tile's two groups) and the epilogue adds
    each lane pair. Its pixels are the in-place interleaved tile's (the border tested in the loads).

    Kernels alone, 2 threads of an AMD EPYC Zen 5, % of the FMA loop, the copy -> this tile (the in-place
    interleaved tile, for a producer that stores the input so), AVX-512 code, groups of 8: 104 channels
    stride 2 to 14x14 42% -> 66% (67%), 48 stride 2 to 28x28 61% -> 75% (81%), 208 stride 2 to 14x14 59% ->
    73% (83%), 440 stride 2 to 7x7 45% -> 65% (65%), 440 on 7x7 55% -> 67% (68%), 104 on 28x28 70% -> 86%
    (84%), at batch 8 76% -> 90% (89%), 208 on 14x14 71% -> 80% (84%), 48 on 56x56 83% -> 87% (92%). AVX2's
    groups of 4 (4 steps a tile on 3x3) moved both ways: 128 channels on 56x56 68% -> 61%, 256 on 14x14 61%
    -> 51%, 128 stride 2 42% -> 55%, 64 on 28x28 63% -> 73%: they keep the copy (MIN_PAIRED_GROUP), as do
    AVX-512's groups of 4, whose 4 groups a vector are no pair."""
    if spec.input_groups_interleaved > 1 or groups_per_vector(spec, isa) != 2 or spec.in_per_group % 2:
        return None
    if spec.out_per_group < MIN_PAIRED_GROUP:
        return None
    in_place = _in_place_tiling(spec, isa, 2)
    return None if in_place is None else replace(in_place, kind=PAIRED)


def tile_rows_and_columns(pixel_block: int, out_width: int) -> tuple[int, int]:
    """(output rows, columns) of an interleaved tile: part of a row, or whole rows."""
    return max(pixel_block // out_width, 1), min(pixel_block, out_width)


def choose_tiling(spec: ConvSpec, isa: VectorISA, batch_statistics: bool = False) -> Tiling | None:
    """The kernel and register tile for a conv; `batch_statistics`: its tiles also sum the statistics of a
    train-mode BatchNorm (conv_stats.py), which only the direct kernel does."""
    if isa.lanes < 4:
        return None  # no vector unit to tile for: TVM's generic kernel
    if spec.depthwise:
        return depthwise_tiling(spec, isa)
    interleaved = None if batch_statistics else interleaved_tiling(spec, isa)
    if interleaved is not None:
        return paired_tiling(spec, isa) or interleaved
    tiling = direct_tiling(spec, isa)
    if tiling is None:
        return None
    return replace(tiling, pixels_outer=pixels_outer(spec, tiling.channel_block, tiling.pixel_block))


# --------------------------------------------------------------------------------------------------
# Weight packing


def pack_weight(weight: np.ndarray, spec: ConvSpec, tiling: Tiling) -> np.ndarray:
    """OIHW weights in the order the kernel reads them.

    direct: (ceil(O/cb), KH, KW, I/groups, cb): per (tap, input channel of the block's group) one
    contiguous vector of the block's output channels; padded channels (O not a multiple of cb) are zero.
    interleaved: as direct, a block's vector holding `groups_per_vector` groups, channel j of its group g
    in lane j * groups_per_vector + g; the lanes of groups past the last are zero.
    paired: a block per group, its vector's lane j * 2 + p output channel j's weight of input channel p of
    each pair (`_pack_paired`).
    depthwise: (KH, KW, C): per tap one contiguous vector of channels.
    """
    if tiling.kind == DEPTHWISE:
        return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0))
    if tiling.kind == PAIRED:
        return _pack_paired(weight, spec, tiling)
    cb = tiling.channel_block
    out_channels, in_per_group, kh, kw = weight.shape
    padded = np.zeros((_ceil_to(out_channels, cb), in_per_group, kh, kw), weight.dtype)
    padded[:out_channels] = weight
    if tiling.kind == INTERLEAVED:
        per_vector, blocks = _interleaved_blocks(spec, tiling)
        padded = padded[interleaved_order(blocks, per_vector, spec.out_per_group)]
    return np.ascontiguousarray(padded.reshape(-1, cb, in_per_group, kh, kw).transpose(0, 3, 4, 2, 1))


def _pack_paired(weight: np.ndarray, spec: ConvSpec, tiling: Tiling) -> np.ndarray:
    """(groups, KH, KW, input pairs of a group, lanes): lane j * 2 + p holds output channel j's weight of
    the pair's input channel p."""
    pairs = tiling.channel_block // spec.out_per_group
    _, in_per_group, kh, kw = weight.shape
    grouped = weight.reshape(spec.groups, spec.out_per_group, in_per_group // pairs, pairs, kh, kw)
    return np.ascontiguousarray(grouped.transpose(0, 4, 5, 2, 1, 3).reshape(spec.groups, kh, kw, -1, tiling.channel_block))


def interleaved_order(vectors: int, per_vector: int, per_group: int) -> np.ndarray:
    """Channel j of group g of vector b at position (b * per_group + j) * per_vector + g: the value at each
    position is the channel's index in group order (indices past the real channels: the missing groups of
    the last vector). An interleaved tile's lanes hold its output channels so, and read input channels so."""
    channels = np.arange(vectors * per_vector * per_group).reshape(vectors, per_vector, per_group)
    return channels.transpose(0, 2, 1).reshape(-1)


def interleaved_input_order(spec: ConvSpec, per_vector: int) -> np.ndarray:
    """The input channel at each position of an input stored for an interleaved tile of `per_vector`
    groups per vector (ConvSpec.input_groups_interleaved); positions of missing groups hold >= in_channels."""
    return interleaved_order(-(-spec.groups // per_vector), per_vector, spec.in_per_group)


def interleaved_input_positions(spec: ConvSpec, per_vector: int) -> np.ndarray:
    """The position of each input channel in an input stored in `interleaved_input_order`."""
    return np.argsort(interleaved_input_order(spec, per_vector))[:spec.in_channels]


def _interleaved_blocks(spec: ConvSpec, tiling: Tiling) -> tuple[int, int]:
    """(groups per vector, vectors the groups fill; the last may hold fewer)."""
    per_vector = tiling.channel_block // spec.out_per_group
    return per_vector, -(-spec.groups // per_vector)


# --------------------------------------------------------------------------------------------------
# TE definitions


def _i64(*values: int):
    # Relax's legalised kernels use int64 shapes; FuseTIR merges buffers only when their types agree.
    return tuple(tirx.IntImm("int64", int(v)) for v in values)


def _padded_input(data, spec: ConvSpec, extra_right: int = 0, extra_bottom: int = 0, name: str = "pad"):
    """NHWC input with its zero border (and `extra_right` more zero columns and `extra_bottom` more zero rows,
    read by the padded tail of a tiled output), or the input itself when there is no border at all."""
    if not spec.padded and not extra_right and not extra_bottom:
        assert spec.input_layout == "NHWC", "an NCHW input is transposed by the padding copy"
        return data
    n, h, w, c = spec.batch, spec.height, spec.width, spec.in_channels
    pt, pl, pb, pr = spec.padding
    return te.compute(
        _i64(n, h + pt + pb + extra_bottom, w + pl + pr + extra_right, c),
        lambda i, y, x, j: _zero_outside(spec, y, x, _read_unpadded(data, spec, i, y, x, j)),
        name=name,
    )


def _zero_outside(spec: ConvSpec, y, x, value):
    """`value` at padded input position (y, x) inside the input, zero on its border."""
    pt, pl, _, _ = spec.padding
    # likely: lets LoopPartition split a row of tiles into border and branch-free inner tiles (it
    # partitions a loop on a likely condition linear in the loop's variable, not on a conjunction)
    inside = tirx.all(*[tirx.likely(t) for t in (y >= pt, y < pt + spec.height, x >= pl, x < pl + spec.width)])
    return tirx.if_then_else(inside, value, tirx.const(0.0, "float32"))


def _read_unpadded(data, spec: ConvSpec, i, y, x, c):
    """The input's channel c at padded position (y, x), in its layout (NHWC, or a network's NCHW input)."""
    pt, pl, _, _ = spec.padding
    return data[i, c, y - pt, x - pl] if spec.input_layout == "NCHW" else data[i, y - pt, x - pl, c]


def _input_position(spec: ConvSpec, p, rkh, rkw):
    """(row, column) of the padded input that output pixel p (flattened, tail clamped) reads at a tap."""
    last = tirx.IntImm("int64", spec.pixels - 1)
    pixel = tirx.min(p, last)
    ow = tirx.IntImm("int64", spec.out_width)
    (sh, sw), (dh, dw) = spec.strides, spec.dilation
    return pixel // ow * sh + rkh * dh, pixel % ow * sw + rkw * dw


def conv2d_compute(spec: ConvSpec, tiling: Tiling):
    """PrimFunc(data, packed weight) -> out NHWC; unscheduled, for FuseOps to extend."""
    if tiling.kind == DEPTHWISE:
        return _depthwise_compute(spec, tiling)
    if tiling.kind == INTERLEAVED:
        return _interleaved_compute(spec, tiling)
    if tiling.kind == PAIRED:
        return _paired_compute(spec, tiling)
    return _direct_compute(spec, tiling)


def _direct_compute(spec: ConvSpec, tiling: Tiling):
    """Accumulators over (batch, flattened output pixel, channel): a tile of pixels may span rows, as its
    pixels' input addresses are computed once per tile, outside the long reduction."""
    conv = direct_conv(spec, tiling)
    return te.create_prim_func([conv.data, conv.weight, conv.out]).with_attr("op_pattern", OUT_EWISE_FUSABLE)


@dataclass(frozen=True)
class DirectConv:
    """The tensors of a direct conv: its input, the zero-bordered input it reads (`source`), the packed
    weight, the accumulators (N, pixels padded to whole tiles, channels padded to whole blocks) and the
    NHWC output."""

    data: te.Tensor
    source: object
    weight: te.Tensor
    accumulators: te.Tensor
    out: te.Tensor


def direct_conv(spec: ConvSpec, tiling: Tiling, pixel_tiles: int = 0) -> DirectConv:
    """A direct conv's tensors; conv_stats.py adds batch statistics to the same ones. `pixel_tiles`: the
    accumulators' tiles per image (default: as many as cover the pixels; more are clamped copies of the last
    pixel, never written out)."""
    data = te.placeholder(_i64(*spec.input_shape), "float32", name="data")
    source = _padded_input(data, spec) if spec.input_layout != "NC" else _as_image(data)
    blocks = channel_blocks(spec, tiling)
    kh, kw = spec.kernel
    weight = te.placeholder(_i64(blocks, kh, kw, spec.in_per_group, tiling.channel_block), "float32",
                            name="weight_packed")
    accumulate = direct_accumulation(spec, tiling, source, weight)
    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    pixels = max(pixel_tiles * tiling.pixel_block, _ceil_to(spec.pixels, tiling.pixel_block))
    conv = te.compute(_i64(spec.batch, pixels, padded_channels(spec, tiling)), accumulate, name="conv", attrs=attrs)
    if spec.input_layout == "NC":
        out = te.compute(_i64(*spec.output_shape), lambda x, o: conv[0, x, o], name="conv_out")
    else:
        ow = tirx.IntImm("int64", spec.out_width)
        out = te.compute(_i64(*spec.output_shape), lambda i, y, x, o: conv[i, y * ow + x, o], name="conv_out")
    return DirectConv(data, source, weight, conv, out)


def direct_accumulation(spec: ConvSpec, tiling: Tiling, source, weight):
    """(i, p, o) -> te.sum of output pixel p (flattened), channel o, over new reduction axes.

    For a dense conv without horizontal dilation, one kernel row's taps and input channels form a single
    reduction axis (kw * C_in + ic): in NHWC the inputs a pixel reads along it are consecutive floats, and
    so are the packed weights, so the innermost loop runs KW times longer with the same body (a 3x3 conv's
    reduction is 3 loops of 3 * C_in instead of 9 of C_in; a 7x7 stem's 7 of 21 instead of 49 of 3)."""
    kh, kw = spec.kernel
    group_inputs = spec.in_per_group
    cb64 = tirx.IntImm("int64", tiling.channel_block)
    per_group, in_group = tirx.IntImm("int64", spec.out_per_group), tirx.IntImm("int64", group_inputs)
    rkh = te.reduce_axis(_i64(0, kh), name="rkh")
    if spec.groups == 1 and spec.dilation[1] == 1:
        rkwc = te.reduce_axis(_i64(0, kw * group_inputs), name="rkwc")

        def accumulate(i, p, o):
            y, x = _input_position(spec, p, rkh, rkwc // in_group)
            return te.sum(source[i, y, x, rkwc % in_group] * weight[o // cb64, rkh, rkwc // in_group, rkwc % in_group, o % cb64],
                          axis=[rkh, rkwc])
        return accumulate

    rkw = te.reduce_axis(_i64(0, kw), name="rkw")
    ric = te.reduce_axis(_i64(0, group_inputs), name="ric")

    def accumulate_grouped(i, p, o):
        y, x = _input_position(spec, p, rkh, rkw)
        start = o // per_group * in_group if spec.groups > 1 else 0  # the first input of o's group
        return te.sum(source[i, y, x, start + ric] * weight[o // cb64, rkh, rkw, ric, o % cb64], axis=[rkh, rkw, ric])
    return accumulate_grouped


def _interleaved_compute(spec: ConvSpec, tiling: Tiling):
    """A direct conv whose accumulator vectors each hold `groups_per_vector` groups, channel j of group g in
    lane j * groups_per_vector + g. Its padding copy ("pad") interleaves the groups' input channels the same
    way, (n, y, x, vector, input channel of the group, group of the vector), so the inputs a pixel's lanes
    read at one step are consecutive; `conv_out` puts the channels back in order. Its pixels are (row, column),
    not flattened: a tile within a row then reads its inputs at constant offsets from one address, which
    LLVM needs to see to load each pixel's lanes with one broadcast (flattened pixels of 56-wide rows in
    28-pixel tiles: 16 scalar loads per pixel and step, 9 GFLOP/s). An input already stored in that order
    (ConvSpec.input_groups_interleaved) is read in place instead, with no copy."""
    per_vector, blocks = _interleaved_blocks(spec, tiling)
    lanes, per_group, in_group = tiling.channel_block, spec.out_per_group, spec.in_per_group
    data = te.placeholder(_i64(*spec.input_shape), "float32", name="data")
    kh, kw = spec.kernel
    rows = _ceil_to(spec.out_height, tile_rows_and_columns(tiling.pixel_block, spec.out_width)[0])  # whole tiles
    if spec.input_groups_interleaved > 1:
        assert spec.input_groups_interleaved == per_vector, "the input is interleaved for another tile"
        source = _InterleavedInPlace(data, spec, in_group, per_vector)
    else:
        source = _interleaving_copy(data, spec, blocks, per_vector, rows)
    weight = te.placeholder(_i64(blocks, kh, kw, in_group, lanes), "float32", name="weight_packed")
    lanes64, per_vector64, per_group64 = _i64(lanes, per_vector, per_group)
    # A step is one kernel row and input channel; the schedule runs the row's taps inside the tile.
    rkh, ric = te.reduce_axis(_i64(0, kh), name="rkh"), te.reduce_axis(_i64(0, in_group), name="ric")
    rkw = te.reduce_axis(_i64(0, kw), name="rkw")
    (sh, sw), (dh, dw) = spec.strides, spec.dilation

    def accumulate(i, y, x, b, j, g):
        return te.sum(source[i, y * sh + rkh * dh, x * sw + rkw * dw, b, ric, g] * weight[b, rkh, rkw, ric, j * per_vector64 + g],
                      axis=[rkh, ric, rkw])

    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    conv = te.compute(_i64(spec.batch, rows, spec.out_width, blocks, per_group, per_vector), accumulate,
                      name="conv", attrs=attrs)

    def in_order(i, y, x, o):
        return conv[i, y, x, o // lanes64, o % per_group64, o % lanes64 // per_group64]

    out = te.compute(_i64(*spec.output_shape), in_order, name="conv_out")
    return te.create_prim_func([data, weight, out]).with_attr("op_pattern", OUT_EWISE_FUSABLE)


def _paired_compute(spec: ConvSpec, tiling: Tiling):
    """A grouped conv whose accumulator vectors each hold one group, output channel j's sum over the pair's
    input channel p in lane j * pairs + p (the reduction steps go over pairs of input channels); `conv_out`
    adds each lane pair. It reads its plain NHWC input in place, the zero border through a condition, with
    the interleaved tile's (row, column) pixels (`paired_tiling`)."""
    lanes, per_group, in_group = tiling.channel_block, spec.out_per_group, spec.in_per_group
    pairs = lanes // per_group
    data = te.placeholder(_i64(*spec.input_shape), "float32", name="data")
    kh, kw = spec.kernel
    rows = _ceil_to(spec.out_height, tile_rows_and_columns(tiling.pixel_block, spec.out_width)[0])  # whole tiles
    weight = te.placeholder(_i64(spec.groups, kh, kw, in_group // pairs, lanes), "float32", name="weight_packed")
    in_group64, pairs64, per_group64 = _i64(in_group, pairs, per_group)
    rkh, ric = te.reduce_axis(_i64(0, kh), name="rkh"), te.reduce_axis(_i64(0, in_group // pairs), name="ric")
    rkw = te.reduce_axis(_i64(0, kw), name="rkw")
    (sh, sw), (dh, dw) = spec.strides, spec.dilation

    def accumulate(i, y, x, g, j, p):
        y_in, x_in = y * sh + rkh * dh, x * sw + rkw * dw
        value = _read_unpadded(data, spec, i, y_in, x_in, g * in_group64 + ric * pairs64 + p)
        return te.sum(_zero_outside(spec, y_in, x_in, value) * weight[g, rkh, rkw, ric, j * pairs64 + p],
                      axis=[rkh, ric, rkw])

    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    conv = te.compute(_i64(spec.batch, rows, spec.out_width, spec.groups, per_group, pairs), accumulate,
                      name="conv", attrs=attrs)

    def in_order(i, y, x, o):
        lane_pair = [conv[i, y, x, o // per_group64, o % per_group64, p] for p in _i64(*range(pairs))]
        return functools.reduce(lambda a, b: a + b, lane_pair)

    out = te.compute(_i64(*spec.output_shape), in_order, name="conv_out")
    return te.create_prim_func([data, weight, out]).with_attr("op_pattern", OUT_EWISE_FUSABLE)


def _interleaving_copy(data, spec: ConvSpec, blocks: int, per_vector: int, rows: int):
    """The padding copy ("pad") of an interleaved conv's input, (n, y, x, vector, input channel of the
    group, group of the vector)."""
    n, h, w, groups, in_group = spec.batch, spec.height, spec.width, spec.groups, spec.in_per_group
    pt, pl, pb, pr = spec.padding

    def read(i, y, x, c):
        return _read_unpadded(data, spec, i, y, x, c)

    def interleave(i, y, x, b, k, g):
        value = read(i, y, x, (b * per_vector + g) * in_group + k)
        if groups % per_vector:
            # The last vector, short of groups: the missing groups' lanes read the last group's inputs. Their
            # outputs are never written, so a NaN there reaches no real output, and no lane needs a test (a
            # test per lane would leave the copy unvectorised). The vector's index is a constant here, so
            # each lane's channel is too, and the copy reads them with one load (tir_pipeline.window_loads).
            last_group = tirx.min((blocks - 1) * per_vector + g, groups - 1) * in_group + k
            value = tirx.if_then_else(b * per_vector + per_vector <= groups, value, read(i, y, x, last_group))
        return _zero_outside(spec, y, x, value)

    (sh, _), (dh, _) = spec.strides, spec.dilation
    padded_height = max(h + pt + pb, (rows - 1) * sh + (spec.kernel[0] - 1) * dh + 1)
    return te.compute(_i64(n, padded_height, w + pl + pr, blocks, in_group, per_vector), interleave, name="pad")


class _InterleavedInPlace:
    """An input stored in interleaved order read as the interleaving copy's (n, y, x, vector, input channel
    of the group, group of the vector), the zero border through a condition (no copy)."""

    def __init__(self, data, spec: ConvSpec, in_group: int, per_vector: int):
        self._data, self._spec, self._in_group, self._per_vector = data, spec, in_group, per_vector

    def __getitem__(self, index):
        i, y, x, b, k, g = index
        in_group64, per_vector64 = _i64(self._in_group, self._per_vector)
        channel = (b * in_group64 + k) * per_vector64 + g
        return _zero_outside(self._spec, y, x, _read_unpadded(self._data, self._spec, i, y, x, channel))


class _as_image:
    """A dense layer's (rows, features) input indexed as the NHWC image (1, 1, rows, features)."""

    def __init__(self, data):
        self._data = data

    def __getitem__(self, index):
        _, _, x, c = index
        return self._data[x, c]


def _depthwise_compute(spec: ConvSpec, tiling: Tiling):
    """Accumulators over (batch, row, column padded to whole tiles, channel): a tile is part of one output
    row, so its pixels' inputs sit at constant offsets from one address (no per-pixel index arithmetic,
    which would cost more than a depthwise tile's few FMAs)."""
    data = te.placeholder(_i64(*spec.input_shape), "float32", name="data")
    kh, kw = spec.kernel
    (sh, sw), (dh, dw) = spec.strides, spec.dilation
    width = _ceil_to(spec.out_width, tiling.pixel_block)
    pt, pl, pb, pr = spec.padding
    extra_right = max(0, (width - 1) * sw + (kw - 1) * dw + 1 - (spec.width + pl + pr))
    source = _padded_input(data, spec, extra_right)
    rkh = te.reduce_axis(_i64(0, kh), name="rkh")
    rkw = te.reduce_axis(_i64(0, kw), name="rkw")
    weight = te.placeholder(_i64(kh, kw, spec.out_channels), "float32", name="weight_packed")
    attrs = {CONV_BLOCK_ATTR: tiling.annotation(), CONV_FLOPS_ATTR: spec.flops}
    conv = te.compute(
        _i64(spec.batch, spec.out_height, width, spec.out_channels),
        lambda i, y, x, c: te.sum(source[i, y * sh + rkh * dh, x * sw + rkw * dw, c] * weight[rkh, rkw, c], axis=[rkh, rkw]),
        name="conv", attrs=attrs)
    out = te.compute(_i64(spec.batch, spec.out_height, spec.out_width, spec.out_channels),
                     lambda i, y, x, c: conv[i, y, x, c], name="conv_out")
    return te.create_prim_func([data, weight, out]).with_attr("op_pattern", OUT_EWISE_FUSABLE)
