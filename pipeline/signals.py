"""SIGTERM as an exception, and short stretches of code that a signal must not cut in half.

A scheduler or a sweep stops a process with SIGTERM; raising `Terminated` (a
KeyboardInterrupt) lets the code that opened a run close it as KILLED. A few places must not
be interrupted part-way even so: between creating a run and entering the `try` that ends it,
while ending it, and between starting a child process and recording it for clean-up. A
signal there would leave a run RUNNING or a process orphaned; `held()` delays it instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run can be closed as KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (only the main thread gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Delay SIGINT and SIGTERM until the block ends, then act on the first as usual.

    Only for blocks that take a moment (a database write, a process start): a signal waits
    that long, never longer.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            _deliver(caught[0], previous[caught[0]])


def _deliver(signum: int, handler) -> None:
    """Do what `handler`, the one in place before `held()`, would have done on `signum`."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action: the process ends by this signal
