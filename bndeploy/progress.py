"""Progress of long work (``bndeploy pipeline``): a live display on a terminal, whole plain lines elsewhere.

The work runs on several threads at once (CUDA builds overlap the CPU work), so every stage reports
through one object. On an interactive terminal that is rich's live display: one row per running stage with
a spinner and its elapsed time, and a line per finished stage above it. In CI or a pipe it is one whole
line per event (a stage starts; a stage ends, with its time), each written by one call under a lock, so
lines from different threads never mix.

    with progress.stage("conv-bn/train", "compile for cpu"):
        ...
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Protocol, TextIO


class Progress(Protocol):
    def stage(self, subject: str, what: str) -> contextlib.AbstractContextManager: ...

    def close(self) -> None: ...


def finished_line(subject: str, what: str, seconds: float, failed: bool) -> str:
    return f"{subject}: {what} {'failed after' if failed else 'done in'} {seconds:.1f} s"


class PlainProgress:
    """One whole line per event on ``stream``: "<subject>: <what> ..." then "... done in 1.2 s"."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, subject: str, what: str) -> Iterator[None]:
        self.line(f"{subject}: {what} ...")
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            self.line(finished_line(subject, what, time.perf_counter() - start, failed))

    def line(self, text: str) -> None:
        with self._lock:  # one write of the whole line: another thread's line can come only before or after
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        pass


class LiveProgress:
    """rich's live display: every running stage with a spinner and its elapsed time; finished stages above."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import Progress as RichProgress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=stream if stream is not None else sys.stderr)
        self._display = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                     console=console, transient=True)
        self._display.start()

    @contextlib.contextmanager
    def stage(self, subject: str, what: str) -> Iterator[None]:
        task = self._display.add_task(f"{subject}: {what}", total=None)
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            self._display.remove_task(task)
            self._display.console.print(finished_line(subject, what, time.perf_counter() - start, failed),
                                        markup=False, highlight=False)

    def refresh(self) -> None:
        self._display.refresh()

    def close(self) -> None:
        self._display.stop()


class NoProgress:
    """For API callers that want no output."""

    def stage(self, subject: str, what: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def progress_for(stream: TextIO | None = None) -> Progress:
    """A live display on an interactive terminal; plain lines in CI (``CI`` set), a pipe, a file or a dumb terminal."""
    stream = stream if stream is not None else sys.stderr
    in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    interactive = stream.isatty() and not in_ci and os.environ.get("TERM") != "dumb"
    return LiveProgress(stream) if interactive else PlainProgress(stream)
