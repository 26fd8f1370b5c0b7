"""Work on a thread with its outcome handed back (`Background`), and SIGTERM raised as an exception like SIGINT's
KeyboardInterrupt, so that every temporary output is removed on the way out (`sigterm_interrupts`), a second
signal during that cleanup ignored.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class Background:
    """Call `fn` on a thread now; `result()` waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._call, args=(fn,), daemon=True)
        self._thread.start()

    def _call(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def join(self) -> None:
        """Wait for `fn` to end, whatever its outcome."""
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt, so that every temporary
    output is removed on the way out (the atomic writers clean up on BaseException)."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Interrupted` (and SIGINT KeyboardInterrupt, as it does anyway).
    The first of either ends the run; from then on both are ignored until the block ends, so that a second
    one (Ctrl-C pressed twice) cannot cut short the cleanup that the first set going (removing a half-written
    output, reporting). The previous handlers come back afterwards. Outside the main thread, where handlers
    cannot be set, both keep theirs."""
    signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)

    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: a handler set outside Python, which cannot be put back
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
