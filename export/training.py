"""A synthetic image data set that ships as code, and a short deterministic training run.

The data set: each of ``NUM_CLASSES`` classes is a seeded smooth colour pattern; a sample is its class
pattern, randomly shifted, plus noise, on a non-zero background level. Learning it in a few seconds moves
every BatchNorm's running statistics far from the defaults (mean 0, variance 1), which is the point: an
export or compile bug in the running statistics then shows up as a large error.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SIZE = 16
TRAIN_STEPS = 60
BATCH = 64


def _class_patterns(size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    coarse = torch.randn(NUM_CLASSES, 3, 4, 4, generator=gen)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def synthetic_images(count: int, seed: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (count, 3, size, size) with labels, the same for the same seed on every machine."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=gen)
    shifts = torch.randint(-2, 3, (count, 2), generator=gen)
    patterns = _class_patterns(size)[labels]
    images = torch.stack([torch.roll(p, tuple(s.tolist()), dims=(1, 2)) for p, s in zip(patterns, shifts)])
    noise = 0.3 * torch.randn(images.shape, generator=gen)
    return 4.0 * images + noise + 3.0, labels


def train(model: nn.Module, steps: int = TRAIN_STEPS, seed: int = 0) -> nn.Module:
    """Train in place with SGD on fresh synthetic batches; deterministic for a given seed and machine."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        images, labels = synthetic_images(BATCH, seed=seed * 100_000 + step)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, count: int = 512, seed: int = 99) -> float:
    images, labels = synthetic_images(count, seed=seed)
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).float().mean().item()


def cache_dir() -> Path:
    return Path(os.environ.get("BNDEPLOY_CACHE", Path.home() / ".cache" / "bndeploy"))


def trained(build: Callable[[], nn.Module], name: str) -> nn.Module:
    """The model from ``build`` after ``train``; the weights are cached per code version and torch version."""
    key = hashlib.sha256(
        (inspect.getsource(build) + inspect.getsource(train) + inspect.getsource(synthetic_images)
         + torch.__version__).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.pt"
    torch.manual_seed(0)
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    with torch.random.fork_rng():
        train(model)
    _save_atomically(model.state_dict(), path)
    return model.eval()


def _save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
