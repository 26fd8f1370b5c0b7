"""The plumbing of a run, apart from what it computes: progress lines, per-stage timing, loading on a
thread, SIGTERM as an exception (and a second signal ignored during the cleanup), and the one way files
and directories are written atomically.

Atomic writes go to a temporary name in the target's own directory (same file system, so the final
`os.replace` is one rename), get the modes `open()`/`mkdir()` would give under the user's umask, and
are removed if anything, a signal included, interrupts them: a reader never sees half an output.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
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


_quiet = [False]


def libraries_quiet() -> bool:
    """Whether a `quiet_libraries` block is running: libraries imported only on some paths (datasets, for the hub's
    data) quiet themselves where they are used."""
    return _quiet[0]


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """--quiet for the libraries a run drives, while the block runs: transformers' progress bars (the shards --save
    writes, a hub download) and huggingface_hub's, and their log lines below ERROR (datasets: datautils, lm-eval:
    lm_eval_tasks.silenced, where they run). The log levels and huggingface_hub's bars come back as they were
    afterwards, so that a process running several runs (the tests, bench.py) is left as it was; transformers' bars
    stay off, as modelutils.load_opt has always left them after a quiet load."""
    if not quiet:
        yield
        return
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub", "accelerate")]
    levels = [logger.level for logger in loggers]
    hub_bars = not are_progress_bars_disabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    _quiet[0] = True
    try:
        yield
    finally:
        _quiet[0] = False
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if hub_bars:
            enable_progress_bars()


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


def process_seconds() -> float:
    """Seconds since this process started, from the kernel's record of its start (Linux), so that the
    interpreter's start and the imports before any of our code ran are counted; elsewhere, since this
    module was imported."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


_IMPORTED = time.time()


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


# ---------------------------------------------------------------- atomic writes


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask sets it, for all threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode(directory: bool = False) -> int:
    """What open() or mkdir() would give under the umask: mkstemp/mkdtemp create owner-only entries."""
    return (0o777 if directory else 0o666) & ~umask()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; when the block ends it takes the umask's modes
    and is renamed to `path`, and if the block fails or is interrupted it is removed."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path), suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_directory(directory: str | os.PathLike, *, prefix: str) -> Iterator[str]:
    """A new directory written whole or not at all: yields a temporary directory beside `directory` (named
    `prefix`...), which takes the umask's modes and is renamed to it when the block ends, and is removed
    if the block fails or is interrupted. `directory` must be absent or empty (ValueError otherwise)."""
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ValueError(f"directory {directory} exists and is not empty; choose a new one")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
    try:
        yield tmp
        _open_permissions(tmp)
        if os.path.isdir(directory):
            os.rmdir(directory)  # checked empty above
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_permissions(directory: str) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the tree the modes mkdir/open would."""
    os.chmod(directory, _umask_mode(directory=True))
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), _umask_mode(directory=True))
        for f in files:
            os.chmod(os.path.join(root, f), _umask_mode())


def nonfinite_path(obj: Any, path: str = "") -> str | None:
    """Where in a JSON-like object the first NaN or infinity is (e.g. `layers[3].error`), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "value")
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for where, value in items:
        found = nonfinite_path(value, where)
        if found is not None:
            return found
    return None


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic, and strict JSON: a NaN or infinity anywhere is a RuntimeError naming where, and nothing is written."""
    where = nonfinite_path(obj)
    if where is not None:
        raise RuntimeError(f"{path} would hold NaN/inf at {where}; not written")
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
