"""Samples a check runs on: one feed (recorded, a file, a seed, the caller's arrays) or many, streamed one
at a time (a directory of .npz/.npy files or images, a user's data loader, a golden directory).

A sample that cannot be used (unreadable, wrong shape or dtype) is yielded with its ``error``, naming
its file, so a check reports it and goes on with the others: nothing else is lost.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from bndeploy.errors import BndeployError
from bndeploy.runtime.images import IMAGE_SUFFIXES, ImagePreprocessing, batch_size, image_input, images_in_batches
from bndeploy.runtime.inputs import load_inputs_file
from bndeploy.runtime.specs import TensorSpec

ARRAY_SUFFIXES = (".npz", ".npy")
# How many files a note lists by name before it says "and N more".
LISTED_FILES = 5


@dataclass
class Sample:
    name: str  # the file(s) or loader item it came from, as a report names it
    feed: dict[str, np.ndarray] | None
    error: str | None = None  # why it cannot be used (then feed is None)
    cast_floats: bool = False  # fp32 reference inputs, rounded for an fp16 artifact


class SampleSource:
    """Where a check's inputs come from: ``description`` (in words, for the report) and the samples."""

    description: str = ""
    many: bool = False  # several samples: a bad one is reported and skipped, not raised

    def __iter__(self) -> Iterator[Sample]:
        raise NotImplementedError

    def bind(self, specs: list[TensorSpec]) -> "SampleSource":
        """Told the artifact's inputs before iterating (images are shaped for them)."""
        return self

    def notes(self) -> list[str]:
        """What the report should say about the samples after they were read (files ignored, ...)."""
        return []


class OneSample(SampleSource):
    def __init__(self, feed: Mapping[str, np.ndarray], description: str, cast_floats: bool = False) -> None:
        self.feed = dict(feed)
        self.description = description
        self.cast_floats = cast_floats

    def __iter__(self) -> Iterator[Sample]:
        yield Sample("inputs", self.feed, cast_floats=self.cast_floats)


class InputsDir(SampleSource):
    """Every .npz/.npy file under ``directory`` (one sample each, a full feed), then its images in batches
    of the input's batch size, preprocessed as ``preprocess`` says. Sorted by relative path."""

    many = True

    def __init__(self, directory: str | Path, preprocess: ImagePreprocessing | str | None = None) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise BndeployError(f"inputs directory {self.directory} not found")
        if isinstance(preprocess, str):
            preprocess = ImagePreprocessing.parse(preprocess)
        self.preprocess = preprocess
        files = sorted(p for p in self.directory.rglob("*") if p.is_file() and not _hidden(p, self.directory))
        self.arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
        self.images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        self.ignored = [p for p in files if p not in self.arrays and p not in self.images]
        if not self.arrays and not self.images:
            raise BndeployError(
                f"{self.directory} holds no samples: put one .npz (keyed by input name) or .npy per sample, "
                f"or images ({', '.join(IMAGE_SUFFIXES)}) there"
            )
        if self.images and self.preprocess is None:
            raise BndeployError(
                f"{self.directory} holds {len(self.images)} images: say how to turn them into inputs with --preprocess "
                "(e.g. imagenet, or resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw)"
            )
        self.leftover: list[str] = []
        self.description = self._describe()
        self._specs: list[TensorSpec] | None = None

    def bind(self, specs: list[TensorSpec]) -> "InputsDir":
        self._specs = specs
        return self

    def __iter__(self) -> Iterator[Sample]:
        for path in self.arrays:
            yield self._array_sample(path)
        if self.images:
            for name, feed, error in images_in_batches(self.images, self.directory, self.preprocess, self._specs,
                                                       self.leftover):
                yield Sample(name, feed, error)

    def _array_sample(self, path: Path) -> Sample:
        name = self._relative(path)
        try:
            return Sample(name, load_inputs_file(path, self._specs or []))
        except BndeployError as e:
            return Sample(name, None, error=str(e))

    def notes(self) -> list[str]:
        notes = []
        if self.ignored:
            notes.append(f"ignored {len(self.ignored)} file(s) under {self.directory} that are neither arrays "
                         f"({', '.join(ARRAY_SUFFIXES)}) nor images: {self._listed(self.ignored)}")
        if self.leftover:
            batch = batch_size(image_input(self._specs or []))
            notes.append(f"not checked: the last {len(self.leftover)} image(s) ({', '.join(self.leftover)}) do not "
                         f"fill a batch of {batch} (the artifact's batch size)")
        return notes

    def _describe(self) -> str:
        parts = []
        if self.arrays:
            parts.append(f"{len(self.arrays)} array file(s)")
        if self.images:
            parts.append(f"{len(self.images)} image(s) preprocessed: {self.preprocess.describe()}")
        return f"from {self.directory}: {', '.join(parts)}"

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.directory))

    def _listed(self, paths: list[Path]) -> str:
        names = [self._relative(p) for p in paths[:LISTED_FILES]]
        return ", ".join(names) + (f" and {len(paths) - LISTED_FILES} more" if len(paths) > LISTED_FILES else "")


class DataLoader(SampleSource):
    """``file.py:function``: a function of no arguments returning an iterable of feed dicts (a generator
    is read one feed at a time). Item i is named ``function[i]`` in the report."""

    many = True

    def __init__(self, spec: str | Callable[[], Iterable[Mapping[str, np.ndarray]]]) -> None:
        if callable(spec):
            self.function, self.label = spec, getattr(spec, "__name__", "data loader")
        else:
            self.function, self.label = load_function(spec), spec
        self.description = f"from the data loader {self.label}"

    def __iter__(self) -> Iterator[Sample]:
        name = getattr(self.function, "__name__", "loader")
        try:
            items = iter(self.function())
            for index in itertools.count():
                item = next(items, _END)
                if item is _END:
                    return
                yield loader_sample(f"{name}[{index}]", item)
        except Exception as e:  # the user's code: whatever it raises ends the loader, reported by name
            yield Sample(f"{name}[...]", None, error=f"the data loader {self.label} raised {type(e).__name__}: {e}")


_END = object()


def loader_sample(name: str, item) -> Sample:
    if not isinstance(item, Mapping) or not all(isinstance(k, str) for k in item):
        return Sample(name, None, error=f"{name} is a {type(item).__name__}, not a dict of input name -> array")
    return Sample(name, {key: np.asarray(value) for key, value in item.items()})


def load_function(spec: str) -> Callable:
    """``path/to/file.py:function`` imported from its file (it need not be on sys.path)."""
    path_text, _, function = spec.rpartition(":")
    path = Path(path_text)
    if not path_text or not function or path.suffix != ".py":
        raise BndeployError(f"--data-loader {spec!r}: expected FILE.py:FUNCTION")
    if not path.is_file():
        raise BndeployError(f"--data-loader {spec!r}: {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"bndeploy_data_loader_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report what it raised, in one line
        raise BndeployError(f"--data-loader {spec!r}: importing {path} raised {type(e).__name__}: {e}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise BndeployError(f"--data-loader {spec!r}: {path} has no function {function!r}")
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
