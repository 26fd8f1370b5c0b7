"""What a run reports while it works: progress lines and bars (`Log`, silenced by --quiet; its named stages
are what a benchmark times), the name of the stage it is in (for the one-line message of an error or an
interruption), per-stage wall time and peak GPU memory (`Stages`), and the process's age.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch


class Log:
    """Progress lines and bars, silenced by --quiet; and the named stages of a long step (`stage`), which cost
    nothing here and which a benchmark's Log times (bench.py --stages)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def stage(self, name: str) -> ContextManager[None]:
        """A stage of the work inside a step (the solve, the cost model, ...): untimed here."""
        return nullcontext()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def bar(self, iterable, total: int, desc: str):
        """A progress bar over a long loop (layers, evaluation windows); the bare iterable when quiet."""
        if self.quiet:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class TimeLeft:
    """The time a loop over `total` like items (decoder layers: the same shapes each) has left, from the mean time
    of the items done so far, for a progress line ("about 40 s of planning left")."""

    def __init__(self, total: int, task: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.task, self.clock, self.done = total, task, clock, 0
        self.started = clock()

    def step(self) -> str:
        """Count one item done and say what is left."""
        self.done += 1
        if self.done >= self.total:
            return f"{self.task} done"
        left = (self.clock() - self.started) / self.done * (self.total - self.done)
        amount = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"
        return f"about {amount} of {self.task} left"


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
    stay off, as modelutils.load_model leaves them after a quiet load."""
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
