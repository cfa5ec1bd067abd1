"""A wait on a device that may never answer, bounded: shared by the runtime's RPC client and the compile
stage's tuning on a board."""

from __future__ import annotations

import threading
import time
from typing import Callable

from bndeploy.errors import BndeployError

INNER_DEADLINE_SHARE = 0.9  # of the timeout, for the socket waits inside a run (the watchdog takes all)


def call_with_deadline(work: Callable[[float], object], timeout: float, what: str, longer: str = "--rpc-timeout"):
    """Run ``work(deadline)`` in a worker thread; give up after ``timeout`` seconds (``longer``: the option
    that raises it, named in the error).

    TVM's RPC client waits on its sockets without a timeout (a device that vanishes from the network
    never answers); TVM's FFI releases the GIL, so the caller gets its error on time and the stuck
    daemon thread is abandoned.
    """
    # The steps inside stop a little earlier, so their own, more specific timeout errors win.
    deadline = time.monotonic() + timeout * INNER_DEADLINE_SHARE
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work(deadline)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=target, name="bndeploy-rpc", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise BndeployError(
            f"{what}: no answer within {timeout:g} s (the device stopped answering, the network is down, "
            f"or the run needs longer: raise {longer})"
        )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]
