"""Reference models shipped with bndeploy, each deterministic and with non-trivial BatchNorm state.

Every model comes from a ``ModelSpec``: a factory, the input shape it is exported with, and how its
reference input is made. BatchNorm running statistics are set from a seeded generator (or, for the
small CNN, learned), so inference mode is never the identity-like default of mean 0, variance 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from bndeploy.export import training


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    make_input: Callable[[tuple[int, ...], int], torch.Tensor] = field(default=None)  # (shape, seed) -> x

    def example_input(self, shape: tuple[int, ...] | None = None, seed: int = 0) -> torch.Tensor:
        shape = tuple(shape or self.input_shape)
        if self.make_input is not None:
            return self.make_input(shape, seed)
        return seeded_normal(shape, seed)


def seeded_normal(shape: tuple[int, ...], seed: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * std + mean


def randomize_batchnorm_state(module: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm seeded, clearly non-default affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            c = bn.num_features
            if bn.affine:
                bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(c, generator=gen))
                bn.running_var.copy_(0.25 + 2.0 * torch.rand(c, generator=gen))
                bn.num_batches_tracked.fill_(10)
    return module


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(seed)
        return randomize_batchnorm_state(build(), seed + 1).eval()

    return factory


class ConvBN(nn.Module):
    """Conv -> BatchNorm (-> ReLU): the block the compile stage folds."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False, relu: bool = False, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv = conv(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.bn = norm(cout)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU, conv-BN, shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvBN(cin, cout, stride=stride, relu=True),
            ConvBN(cout, cout),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else ConvBN(cin, cout, 1, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A small ResNet for 3x16x16 images: stem + three basic blocks (32, 64, 128 channels), ~0.3 M parameters."""

    def __init__(self, num_classes: int = training.NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.stem = ConvBN(3, widths[0], relu=True)
        self.stages = nn.Sequential(
            BasicBlock(widths[0], widths[0], 1),
            BasicBlock(widths[0], widths[1], 2),
            BasicBlock(widths[1], widths[2], 2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[2], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class ConvClasses(nn.Module):
    """One conv of every class real CNNs use, each -> BatchNorm -> ReLU, then pooling and a Linear layer:
    7x7/2 stem, 3x3, 3x3/2, 1x1, depthwise 3x3, 3x3/2 and 5x5/2, grouped (8 channels per group)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            ConvBN(3, 16, 7, stride=2, padding=3, relu=True),
            ConvBN(16, 16, relu=True),
            ConvBN(16, 32, stride=2, relu=True),
            ConvBN(32, 32, 1, padding=0, relu=True),
            ConvBN(32, 32, groups=32, relu=True),
            ConvBN(32, 32, stride=2, groups=32, relu=True),
            ConvBN(32, 32, 5, stride=2, padding=2, groups=32, relu=True),
            ConvBN(32, 32, groups=4, relu=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))


class DCGANGenerator(nn.Module):
    """A DCGAN-style generator: ConvTranspose -> BN -> ReLU (twice), then ConvTranspose -> Tanh."""

    def __init__(self, latent: int = 64, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.ConvTranspose2d(width // 2, 3, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPHead(nn.Module):
    """A projection / classifier head: Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, features: int = 128, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained_tiny_resnet() -> nn.Module:
    return training.trained(TinyResNet, "tiny-resnet").eval()


def _dataset_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return training.synthetic_images(shape[0], seed=1000 + seed, size=shape[2])[0]


REFERENCE_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("seed-bn2d", "nn.BatchNorm2d(3) on (5, 3, 2, 2): the seed example",
                  _seeded(lambda: nn.BatchNorm2d(3, affine=True)), (5, 3, 2, 2)),
        ModelSpec("bn1d", "nn.BatchNorm1d(6) on (5, 6, 7)", _seeded(lambda: nn.BatchNorm1d(6)), (5, 6, 7)),
        ModelSpec("bn3d", "nn.BatchNorm3d(3) on (4, 3, 3, 4, 4)", _seeded(lambda: nn.BatchNorm3d(3)), (4, 3, 3, 4, 4)),
        ModelSpec("conv-bn", "Conv2d(3, 8, 3, bias=False) -> BatchNorm2d(8)",
                  _seeded(lambda: ConvBN(3, 8)), (2, 3, 8, 8)),
        ModelSpec("conv-bias-bn-relu", "Conv2d(3, 8, 3, bias=True) -> BatchNorm2d(8) -> ReLU",
                  _seeded(lambda: ConvBN(3, 8, bias=True, relu=True)), (2, 3, 8, 8)),
        ModelSpec("conv-bn-grouped", "Conv2d(8, 8, 3, groups=2) -> BatchNorm2d(8)",
                  _seeded(lambda: ConvBN(8, 8, groups=2)), (2, 8, 8, 8)),
        ModelSpec("conv-bn-depthwise", "Conv2d(8, 8, 3, groups=8) -> BatchNorm2d(8)",
                  _seeded(lambda: ConvBN(8, 8, groups=8, bias=True)), (2, 8, 8, 8)),
        ModelSpec("conv-bn-strided", "Conv2d(4, 8, 3, stride=2, dilation=2, padding=2) -> BatchNorm2d(8)",
                  _seeded(lambda: ConvBN(4, 8, stride=2, dilation=2, padding=2)), (2, 4, 9, 9)),
        ModelSpec("conv-classes", "every conv class (stem, 3x3, 3x3/2, 1x1, depthwise 3x3 and 5x5, grouped) -> BN -> ReLU, "
                  "Linear head", _seeded(ConvClasses), (2, 3, 32, 32)),
        ModelSpec("dcgan-generator", "DCGAN-style generator: ConvTranspose2d -> BN -> ReLU (x2) -> ConvTranspose2d -> Tanh",
                  _seeded(DCGANGenerator), (4, 64, 1, 1)),
        ModelSpec("mlp-head", "Linear(128, 256) -> BatchNorm1d -> ReLU -> Linear(256, 10)", _seeded(MLPHead), (8, 128)),
        ModelSpec("tiny-resnet", "small ResNet (conv-BN-ReLU basic blocks, ~0.3 M parameters) trained on synthetic images",
                  _trained_tiny_resnet, (8, 3, 16, 16), _dataset_input),
    ]
}

# The embedded default of `bndeploy pipeline`: the seed layer, the conv->BN blocks and the small CNN.
DEFAULT_PIPELINE_MODELS = ("seed-bn2d", "conv-bn", "conv-bias-bn-relu", "conv-bn-depthwise", "tiny-resnet")
