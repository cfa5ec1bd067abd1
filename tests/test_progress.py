"""Progress of `bndeploy pipeline`: whole plain lines in CI or a pipe, rich's live display on a terminal."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest

from bndeploy.progress import LiveProgress, PlainProgress, progress_for

THREADS, STAGES = 8, 20
LINE = re.compile(r"^worker-(\d)/(\d+): stage (\d+) (\.\.\.|done in \d+\.\d s|failed after \d+\.\d s)$")


class SlowPipe(io.StringIO):
    """A pipe that takes one character at a time and lets other threads run in between: any writer that
    does not hand over a whole line in one call under a lock gets its lines mixed with another's."""

    def write(self, text: str) -> int:
        for char in text:
            super().write(char)
            time.sleep(0)  # give up the GIL: the next thread may write now
        return len(text)

    def isatty(self) -> bool:
        return False


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_stay_whole_when_threads_report_at_once():
    pipe = SlowPipe()
    progress = PlainProgress(pipe)
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        start.wait()
        for stage in range(STAGES):
            try:
                with progress.stage(f"worker-{index}/{stage}", f"stage {stage}"):
                    if stage % 7 == 3:
                        raise ValueError("a failing stage still reports its end")
            except ValueError:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = pipe.getvalue().splitlines()
    assert len(lines) == THREADS * STAGES * 2
    bad = [line for line in lines if not LINE.match(line)]
    assert not bad, bad[:5]
    for index in range(THREADS):
        for stage in range(STAGES):
            mine = [LINE.match(line).group(4) for line in lines if line.startswith(f"worker-{index}/{stage}:")]
            assert mine[0] == "..." and mine[1].startswith("failed after" if stage % 7 == 3 else "done in")


@pytest.mark.parametrize("stream, ci, plain", [
    (SlowPipe(), "", True),        # a pipe or a file
    (FakeTerminal(), "true", True),  # CI, even with a terminal
    (FakeTerminal(), "", False),   # an interactive terminal: the live display
])
def test_live_display_only_on_an_interactive_terminal(monkeypatch, stream, ci, plain):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("TERM", "xterm")
    progress = progress_for(stream)
    try:
        assert isinstance(progress, PlainProgress if plain else LiveProgress)
    finally:
        progress.close()


def test_live_display_shows_what_runs_and_its_elapsed_time():
    terminal = FakeTerminal()
    progress = LiveProgress(terminal)
    try:
        with progress.stage("conv-bn/train", "compile for cpu"):
            progress.refresh()
            running = terminal.getvalue()
            assert "conv-bn/train: compile for cpu" in running
            assert re.search(r"\d:\d\d:\d\d", running)  # the stage's elapsed time
    finally:
        progress.close()
    assert re.search(r"conv-bn/train: compile for cpu done in \d+\.\d s", terminal.getvalue())
