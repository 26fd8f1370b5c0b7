"""The atomic writers every output goes through: whole or absent, the umask's modes, nothing left behind."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

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


