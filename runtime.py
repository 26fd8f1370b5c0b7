"""The plumbing of a run, apart from what it computes: progress lines, per-stage timing, loading on a
thread, and SIGTERM as an exception."""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

# ---------------------------------------------------------------- progress and stages


class Log:
    """Progress lines and bars, silenced by --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def bar(self, iterable, total: int, desc: str):
        """A progress bar over a long loop (layers, evaluation windows); the bare iterable when quiet."""
        if self.quiet:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


_stage = ["checking the flags"]


def set_stage(name: str) -> None:
    """Name what the run does now, for the one-line message of an unexpected error or an interruption."""
    _stage[0] = name


def current_stage() -> str:
    return _stage[0]


class Stages:
    """Wall time and peak GPU memory of each stage of a run (for --results_json and bench.py)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, gpu: bool = True):
        """Time a stage; `gpu=False` for CPU-only stages, which then neither wait for nor measure the GPU."""
        cuda = gpu and self.dev.type == "cuda"
        set_stage(name)
        if cuda:
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        tick = time.time()
        yield
        if cuda:
            torch.cuda.synchronize(self.dev)
            self.peak_gib[name] = torch.cuda.max_memory_allocated(self.dev) / 2 ** 30
        self.seconds[name] = time.time() - tick


# ---------------------------------------------------------------- threads and signals


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
    """While the block runs, SIGTERM raises `Interrupted`; its previous handler comes back afterwards.
    Outside the main thread, where handlers cannot be set, SIGTERM keeps its handler."""
    def terminate(signum, frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
