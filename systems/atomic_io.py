"""The one way files and directories are written: atomically.

Atomic writes go to a temporary name in the target's own directory (same file system, so the final
`os.replace` is one rename), get the modes `open()`/`mkdir()` would give under the user's umask, and
are removed if anything, a signal included, interrupts them: a reader never sees half an output.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
