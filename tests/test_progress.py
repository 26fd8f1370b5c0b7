"""systems/progress.py and systems/interrupts.py: the process's age, and work on a thread."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from systems.interrupts import Background
from systems.progress import TimeLeft


def test_process_seconds_counts_from_the_start_of_the_process():
    """The start-up a run reports includes what ran before our code was imported: a process that sleeps 0.3 s
    before importing systems.progress is at least 0.3 s old by its count."""
    code = "import time; time.sleep(0.3); from systems import progress; print(progress.process_seconds())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 0.3 <= float(done.stdout) < 60.0


def test_background_returns_the_value_or_raises_the_error():
    assert Background(lambda: 42).result() == 42
    with pytest.raises(ZeroDivisionError):
        Background(lambda: 1 / 0).result()


def test_time_left_is_the_mean_time_per_item_times_the_items_left():
    ticks = iter([100.0, 110.0, 130.0, 700.0, 701.0])  # started at 100; items done at 110, 130, 700, 701
    left = TimeLeft(4, "compression", clock=lambda: next(ticks))
    assert left.step() == "about 30 s of compression left"  # 10 s for one item, three to go
    assert left.step() == "about 30 s of compression left"  # 30 s for two, two to go
    assert left.step() == "about 3 min of compression left"  # 600 s for three, one to go: 200 s
    assert left.step() == "compression done"
