"""Small shared file helpers: hashing, JSON files and atomic directory writes (the format itself: bndeploy.layout)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from bndeploy.errors import BndeployError


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail early, before any work, when ``out`` exists (without force) or its parent is not writable."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise BndeployError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise BndeployError(f"{out} exists and is not a directory")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BndeployError(f"cannot create output directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise BndeployError(f"output directory {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    On any error (or KeyboardInterrupt) the temporary directory is removed, so ``out`` is either the
    old complete directory, the new complete one, or absent: never half-written. A second writer racing
    for the same ``out`` without force loses with a clear error instead of mixing files.
    """
    out = check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _replace_directory(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise BndeployError(f"{out} was created by another process while this one worked; nothing written")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, old / out.name)
            os.rename(new, out)
        except OSError:
            # Another forced writer moved its directory in between: it wins whole, this one stops.
            raise BndeployError(f"{out} was replaced by another process while this one worked; nothing written") from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(new, out)
        except OSError:
            # Another writer renamed its directory into place between our check and rename.
            raise BndeployError(f"{out} was created by another process while this one worked; nothing written") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one rename, so a
    reader (or a run resumed after an interruption) never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent.absolute())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
