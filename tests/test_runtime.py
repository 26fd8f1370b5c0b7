"""The atomic writers every output goes through: whole or absent, the umask's modes, nothing left behind."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

from systems.atomic_io import atomic_directory, atomic_file



@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_appears_whole_with_the_umask_mode(tmp_path: Path, umask_022):
    target = tmp_path / "sub" / "out.txt"
    with atomic_file(target) as tmp:
        Path(tmp).write_text("done")
        assert not target.exists() and Path(tmp).parent == target.parent
    assert target.read_text() == "done"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["out.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_file_interrupted_leaves_the_old_file(tmp_path: Path, error: BaseException):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_file(target) as tmp:
            Path(tmp).write_text("half")
            raise error
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_directory_appears_whole_with_the_umask_modes(tmp_path: Path, umask_022):
    target = tmp_path / "out"
    target.mkdir()  # an empty directory may be replaced
    with atomic_directory(target, prefix=".test-") as tmp:
        os.chmod(tmp, 0o700)
        Path(tmp, "a.bin").write_bytes(b"x")
        os.chmod(Path(tmp, "a.bin"), 0o600)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["a.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "a.bin").stat().st_mode) == 0o644


def test_atomic_directory_refuses_a_full_one_and_leaves_nothing_on_failure(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        with atomic_directory(tmp_path / "full", prefix=".test-"):
            pytest.fail("entered the block")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(tmp_path / "new", prefix=".test-") as tmp:
            Path(tmp, "half.bin").write_bytes(b"x")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == ["full"] and os.listdir(tmp_path / "full") == ["keep.txt"]


def test_process_seconds_counts_from_the_start_of_the_process():
    """The start-up a run reports includes what ran before our code was imported: a process that sleeps 1 s
    before importing systems.progress is at least 1 s old by its count."""
    code = "import time; time.sleep(1.0); from systems import progress; print(progress.process_seconds())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 1.0 <= float(done.stdout) < 60.0


def test_transformers_is_imported_without_scikit_learn_which_stays_importable():
    """modelutils.import_transformers keeps transformers from importing scikit-learn (seconds of start-up, unused),
    leaves it importable afterwards, and falls back to an ordinary import when a hidden package is one transformers
    needs (safetensors)."""
    pytest.importorskip("sklearn")
    root = ROOT
    checks = {
        "hidden": "import sys, modelutils; modelutils.import_transformers(); "
                  "assert 'transformers.generation' in sys.modules and 'sklearn' not in sys.modules; "
                  "import sklearn.metrics",
        "needed": "import sys, modelutils; modelutils.import_transformers(('safetensors',)); "
                  "import transformers; assert sys.modules['safetensors'] is not None",
    }
    procs = {k: subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, code in checks.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}"
