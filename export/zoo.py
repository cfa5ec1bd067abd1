"""Real networks from torchvision's model definitions, for benchmarks and `bndeploy export torchvision:NAME`.

Random weights (nothing is downloaded), then a few train-mode forward passes so every BatchNorm's running
statistics move off their defaults (mean 0, variance 1), as they would in a trained network.

torchvision from the package registry is built for torch's CUDA release: next to the CPU torch its
compiled ops (`torchvision::nms`, ...) do not load and `import torchvision` fails while registering
their fake implementations. The model definitions are pure Python; `import_torchvision` imports them
with that registration skipped, which only the detection ops (unused here) need.
"""

from __future__ import annotations

import torch
from torch import nn

from bndeploy.errors import BndeployError

ZOO = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
CALIBRATION_STEPS = 3
CALIBRATION_BATCH = 4
IMAGE_SHAPE = (3, 224, 224)


def import_torchvision():
    try:
        import torchvision  # noqa: F401

        return torchvision
    except ImportError as e:
        if "torchvision" in str(e) and "No module named" in str(e):
            raise BndeployError("torchvision is not installed: pip install 'bndeploy[zoo]'") from None
    except RuntimeError:
        pass  # its compiled ops failed to register (a CUDA torchvision beside the CPU torch)
    return _import_definitions_only()


def _import_definitions_only():
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision.models.<name>(weights=None) in eval mode, with calibrated BatchNorm statistics."""
    torchvision = import_torchvision()
    factory = getattr(torchvision.models, name, None)
    if factory is None or not callable(factory):
        raise BndeployError(f"torchvision has no model {name!r}; for example: {', '.join(ZOO)}")
    torch.manual_seed(seed)
    model = factory(weights=None)
    calibrate_batchnorm(model, seed)
    return model.eval()


def calibrate_batchnorm(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_STEPS):
            model(torch.randn((CALIBRATION_BATCH, *IMAGE_SHAPE), generator=generator))
