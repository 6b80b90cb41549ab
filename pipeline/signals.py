"""Stop signals as an exception, and short stretches of code that a signal must not cut in half.

A user (Ctrl-C: SIGINT, Ctrl-\\: SIGQUIT), a closed terminal or SSH session (SIGHUP), a
scheduler or a sweep (SIGTERM) stops a process with a signal; raising `Terminated` (a
KeyboardInterrupt) lets the code that opened a run close it as KILLED, and the process exits
with 128 + the signal's number, as a shell reports a process killed by that signal.

Python swallows an exception raised inside a `__del__` method or a garbage-collection
callback (it prints `Exception ignored in ...` and carries on), and a signal's handler can run
there. So the handler also records the signal: `raise_if_received()` at the end of a run turns
a swallowed stop into KILLED after all.

A few places must not be interrupted part-way even so: between creating a run and entering
the `try` that ends it, while ending it, while writing a retrain decision, and between
starting a child process and recording it for clean-up. A signal there would leave a run
RUNNING, a decision half-written or a process orphaned; `held()` delays it instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

# SIGHUP and SIGQUIT are POSIX only.
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)
HELD = STOP_SIGNALS
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# A stop signal this soon after the first is part of the same request, already in hand: a
# Ctrl-C reaches every process of the group and `mlflow run` then sends SIGTERM as well; a
# closed terminal sends SIGHUP, and the parent's death SIGTERM. Raising again would cut short
# the very clean-up the first one started. A signal after that raises again.
REPEAT_WINDOW_S = 5.0

_received: int | None = None  # the first stop signal since the outermost stop_signals_raise()
_last_raised = 0.0  # time.monotonic() of the last one raised
_deferring = False  # inside `deferred`
_deferred: list[int] = []  # stop signals that arrived there


class Terminated(KeyboardInterrupt):
    """A stop signal, turned into an exception so the run can be closed as KILLED."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """128 + the signal's number: what a shell reports for a process that signal ended
    (SIGHUP 129, SIGINT 130, SIGQUIT 131, SIGTERM 143)."""
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name


def received() -> int | None:
    """The first stop signal this process got while `stop_signals_raise()` was in force."""
    return _received


def raise_if_received() -> None:
    """Raise `Terminated` if a stop signal arrived, even one whose exception was swallowed."""
    if _received is not None:
        raise Terminated(_received)


def _raise_terminated(signum, frame):
    global _received, _last_raised
    if _deferring:  # inside `deferred`: raised when it ends
        _deferred.append(signum)
        return
    now = time.monotonic()
    if _received is not None and now - _last_raised < REPEAT_WINDOW_S:
        return
    if _received is None:
        _received = signum
    _last_raised = now
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM, SIGHUP and SIGQUIT raise `Terminated`.

    A signal this process was started ignoring stays ignored: `nohup` ignores SIGHUP so
    that a run outlives its terminal, and a shell starts background jobs ignoring SIGINT.
    Only the main thread gets signals. Nested blocks share the outermost one's record of
    what was received.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:  # an outer block is in force
        yield
        return
    global _received
    _received = None
    previous = {
        sig: signal.signal(sig, _raise_terminated)
        for sig in STOP_SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def held(deliver: bool = True) -> Iterator[list[int]]:
    """Delay stop signals until the block ends, then act on the first as usual.

    Only for blocks that take a moment (a database write, a process start): a signal waits
    that long, never longer. With `deliver=False` the caller takes over: the signals that
    arrived are in the yielded list, and nothing else happens to them.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    if deliver and _deferring and signal.getsignal(signal.SIGTERM) is _raise_terminated:
        # Inside `deferred`: a stop signal already waits for the end of that block, right
        # after this one. Swapping the handlers would only add 8 system calls (the loop's
        # hand-over of every 50 steps runs here).
        yield caught
        return
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in HELD}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught and deliver:
            _deliver(caught[0], previous[caught[0]])


class _Deferred:
    """See `deferred`; a class, not a generator, because it runs on every training step."""

    def __enter__(self) -> None:
        global _deferring
        _deferring = True

    def __exit__(self, *exc) -> None:
        global _deferring
        _deferring = False
        if _deferred:
            signum = _deferred[0]
            _deferred.clear()
            _raise_terminated(signum, None)


deferred = _Deferred()
"""`with signals.deferred:` a stop signal that arrives inside the block raises `Terminated`
when the block ends. `held()` for hot paths: it swaps no handlers (~0.1 us instead of ~10),
so it works only within `stop_signals_raise()`. The training step uses it around the
optimizer's update, so a signal never leaves weights half-updated or a step half-counted:
the state a stop-signal checkpoint saves is always one between two steps."""


def _deliver(signum: int, handler) -> None:
    """Do what `handler`, the one in place before `held()`, would have done on `signum`."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action: the process ends by this signal


def die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when process `parent_pid`, our parent, ends, however it ends (SIGKILL too).

    For a process a supervisor started (a sweep's trial, `mlflow run`'s command): without
    this, a supervisor killed outright leaves it training on its own. Linux has the kernel
    send the signal (prctl PR_SET_PDEATHSIG); elsewhere a thread watches for the parent to go.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # it ended before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
