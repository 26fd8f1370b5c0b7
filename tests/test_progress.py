"""systems/progress.py and systems/interrupts.py: the process's age, and work on a thread."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from systems.interrupts import Background


def test_process_seconds_counts_from_the_start_of_the_process():
    """The start-up a run reports includes what ran before our code was imported: a process that sleeps 1 s
    before importing systems.progress is at least 1 s old by its count."""
    code = "import time; time.sleep(1.0); from systems import progress; print(progress.process_seconds())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 1.0 <= float(done.stdout) < 60.0


def test_background_returns_the_value_or_raises_the_error():
    assert Background(lambda: 42).result() == 42
    with pytest.raises(ZeroDivisionError):
        Background(lambda: 1 / 0).result()
