"""The libraries a device's owner approved (``bndeploy device serve --allow``): sha256 digests read from
hash files (``sha256sum`` format), artifact directories, their artifact.json, or folders of artifacts.

The sources are re-read when one of them changes (checked before every session) or on request (SIGHUP).
A source that cannot be read at start is an error; one that breaks later approves nothing until it is
fixed (fail closed), and the server says so in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bndeploy.errors import BndeployError
from bndeploy.layout import ARTIFACT_MANIFEST, recorded_library_sha256

DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def read_sources(sources: tuple[Path, ...]) -> frozenset[str]:
    """Every approved sha256 (lower-case hex) the sources name."""
    digests: set[str] = set()
    for source in sources:
        digests |= read_source(source)
    return frozenset(digests)


def read_source(source: Path) -> set[str]:
    if source.name == ARTIFACT_MANIFEST and source.is_file():
        return {recorded_library_sha256(source.parent)}
    if source.is_dir():
        manifests = artifact_manifests(source)
        if not manifests:
            raise BndeployError(f"--allow {source}: a folder without any {ARTIFACT_MANIFEST} below it")
        return {recorded_library_sha256(m.parent) for m in manifests}
    if source.is_file():
        return read_hash_file(source)
    raise BndeployError(f"--allow {source}: no such file or folder")


def artifact_manifests(folder: Path) -> list[Path]:
    return sorted(folder.rglob(ARTIFACT_MANIFEST))


def read_hash_file(path: Path) -> set[str]:
    """Lines of ``HASH [FILE]`` (``sha256sum``'s output); blank lines and ``#`` comments skipped."""
    digests = set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BndeployError(f"--allow {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not DIGEST.fullmatch(words[0]):
            raise BndeployError(f"--allow {path}:{number}: {words[0][:20]!r} is not a sha256 (64 hex digits, "
                                "as `sha256sum model.so` prints)")
        digests.add(words[0].lower())
    return digests


def fingerprint(sources: tuple[Path, ...]) -> tuple:
    """What changes when a source does: each file's (path, mtime, size), folders' artifact.json included."""
    files: list[Path] = []
    for source in sources:
        files += artifact_manifests(source) if source.is_dir() else [source]
    stamps = []
    for path in files:
        try:
            st = path.stat()
            stamps.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((str(path), None, None))
    return tuple(stamps)


@dataclass
class Allowlist:
    """The approved digests, kept current with their sources; ``log`` gets one line per reload."""

    sources: tuple[Path, ...]
    log: Callable[[str], None] = print
    _digests: frozenset[str] = field(default=frozenset(), init=False)
    _stamp: tuple = field(default=(), init=False)
    _reload_requested: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.sources = tuple(Path(s).absolute() for s in self.sources)
        self._stamp = fingerprint(self.sources)
        self._digests = read_sources(self.sources)  # errors at start stop the server

    def request_reload(self) -> None:
        """Re-read the sources before the next session even if none changed (SIGHUP)."""
        self._reload_requested = True

    def digests(self) -> frozenset[str]:
        """The approved digests now: re-read first when a source changed or a reload was requested."""
        stamp = fingerprint(self.sources)
        if stamp != self._stamp or self._reload_requested:
            self._stamp, self._reload_requested = stamp, False
            try:
                self._digests = read_sources(self.sources)
                self.log(f"bndeploy device: allowlist reloaded: {len(self._digests)} approved libraries")
            except BndeployError as e:
                self._digests = frozenset()
                self.log(f"bndeploy device: allowlist unreadable, approving nothing until it is fixed: {e}")
        return self._digests
