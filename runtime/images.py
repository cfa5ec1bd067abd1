"""Images as inputs: decoded with Pillow (``bndeploy[images]``), preprocessed as stated, batched.

The preprocessing is explicit and reported word for word: convert to RGB, resize (the shorter side to N,
or to HxW; bilinear), center crop, scale to [0, 1], subtract mean and divide by std per channel, lay out
as NCHW or NHWC, cast to the input's dtype. ``imagenet`` is torchvision's classic evaluation transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.extras import MissingDependencyError, missing_message
from bndeploy.runtime.specs import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
LAYOUTS = ("nchw", "nhwc")
SETTINGS_HELP = "resize=N|HxW, crop=N|HxW, mean=A/B/C, std=A/B/C, scale=F, layout=nchw|nhwc"


@dataclass(frozen=True)
class ImagePreprocessing:
    resize: tuple[int, ...] | None = None  # (shorter side,) or (height, width)
    crop: tuple[int, int] | None = None  # center crop (height, width)
    scale: float = 1 / 255  # 8-bit values to [0, 1]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "nchw"

    @classmethod
    def parse(cls, text: str) -> "ImagePreprocessing":
        """``imagenet`` (optionally followed by overrides) or ``key=value`` pairs separated by commas."""
        settings, items = cls(), [item.strip() for item in text.split(",") if item.strip()]
        if items and items[0] == "imagenet":
            settings, items = IMAGENET, items[1:]
        changes = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in _PARSERS:
                raise BndeployError(f"--preprocess: cannot read {item!r}; expected imagenet or {SETTINGS_HELP}")
            try:
                changes[key] = _PARSERS[key](value)
            except ValueError:
                raise BndeployError(f"--preprocess: bad value in {item!r}; expected {SETTINGS_HELP}") from None
        return replace(settings, **changes)

    def describe(self) -> str:
        steps = ["RGB"]
        if self.resize is not None:
            steps.append(f"resize {'shorter side to ' + str(self.resize[0]) if len(self.resize) == 1 else _hw(self.resize)}"
                         " (bilinear)")
        if self.crop is not None:
            steps.append(f"center crop {_hw(self.crop)}")
        steps.append("/255" if math.isclose(self.scale, 1 / 255) else f"x {self.scale:g}")
        steps.append(f"mean {_floats(self.mean)}, std {_floats(self.std)}")
        steps.append(self.layout.upper())
        return ", ".join(steps)

    def apply(self, path: Path) -> np.ndarray:
        """One image as float32 (C, H, W) or (H, W, C)."""
        image = _open_rgb(path)
        if self.resize is not None:
            image = image.resize(_resized_size(image.size, self.resize), _bilinear())
        if self.crop is not None:
            image = _center_crop(image, self.crop, path)
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.scale)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1) if self.layout == "nchw" else pixels


IMAGENET = ImagePreprocessing(resize=(256,), crop=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def images_in_batches(paths: list[Path], root: Path, preprocess: ImagePreprocessing, specs: list[TensorSpec] | None,
                      leftover: list[str]) -> Iterator[tuple[str, dict | None, str | None]]:
    """(name, feed, None) per batch of images for the artifact's single image input; (name, None, error) for a
    file that cannot be decoded or comes out in another shape (the batch fills up with the next images).
    Names of images that do not fill a last batch are appended to ``leftover``."""
    spec = image_input(specs or [])
    batch = batch_size(spec)
    wanted = tuple(spec.shape[1:])
    pending: list[tuple[str, np.ndarray]] = []
    for path in paths:
        name = str(path.relative_to(root))
        try:
            pixels = preprocess.apply(path)
        except BndeployError as e:
            yield name, None, str(e)
            continue
        if not _shape_fits(pixels.shape, wanted):
            yield name, None, (f"{name}: preprocessed to {list(pixels.shape)} ({preprocess.describe()}); "
                               f"the input {spec.describe()} takes {_dims(wanted)} per image")
            continue
        pending.append((name, pixels))
        if len(pending) == batch:
            yield _batch_name(pending), {spec.name: np.stack([p for _, p in pending]).astype(spec.dtype)}, None
            pending = []
    leftover.extend(name for name, _ in pending)


def batch_size(spec: TensorSpec) -> int:
    """Images per sample: the input's static batch dimension, or 1 when it is dynamic."""
    return spec.shape[0] if isinstance(spec.shape[0], int) else 1


def image_input(specs: list[TensorSpec]) -> TensorSpec:
    if len(specs) != 1 or len(specs[0].shape) != 4 or not np.issubdtype(np.dtype(specs[0].dtype), np.floating):
        from bndeploy.runtime.specs import describe_all

        raise BndeployError(f"images need an artifact with one 4-D float input; this one takes {describe_all(specs)}: "
                            "pass .npz files or a --data-loader instead")
    return specs[0]


def _open_rgb(path: Path):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingDependencyError(missing_message("images", f"reading images ({path.name})", ["PIL"])) from None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise BndeployError(f"{path.name}: not a readable image ({e})") from None


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


def _resized_size(size: tuple[int, int], resize: tuple[int, ...]) -> tuple[int, int]:
    """PIL's (width, height) after resizing: the shorter side to resize[0], or exactly (height, width)."""
    width, height = size
    if len(resize) == 2:
        return resize[1], resize[0]
    short = resize[0]
    if width <= height:
        return short, max(1, round(height * short / width))
    return max(1, round(width * short / height)), short


def _center_crop(image, crop: tuple[int, int], path: Path):
    width, height = image.size
    crop_h, crop_w = crop
    if crop_h > height or crop_w > width:
        raise BndeployError(f"{path.name}: {width}x{height} (after resizing) is smaller than the crop {_hw(crop)}")
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def _shape_fits(shape: tuple, wanted: tuple) -> bool:
    return len(shape) == len(wanted) and all(not isinstance(w, int) or w == s for s, w in zip(shape, wanted))


def _batch_name(pending: list[tuple[str, np.ndarray]]) -> str:
    names = [name for name, _ in pending]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} images)"


def _size(value: str) -> tuple[int, ...]:
    parts = tuple(int(v) for v in value.lower().split("x"))
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ValueError(value)
    return parts


def _crop(value: str) -> tuple[int, int]:
    size = _size(value)
    return size * 2 if len(size) == 1 else size


def _channels(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split("/"))


def _layout(value: str) -> str:
    if value.lower() not in LAYOUTS:
        raise ValueError(value)
    return value.lower()


_PARSERS = {"resize": _size, "crop": _crop, "mean": _channels, "std": _channels, "scale": float, "layout": _layout}


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _floats(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:g}" for v in values)


def _dims(shape: tuple) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + "]"
