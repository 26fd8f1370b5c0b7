"""The tuned launch configuration of each (GPU, layer shape, width mix, group size, batch) on disk, so that a
second process -- or the next run of the benchmark -- launches the tuned kernel without timing anything.

One JSON object per file, key -> configuration (a dict of KernelConfig's fields). The file lives at
$SERVING_AUTOTUNE_CACHE if set, else $XDG_CACHE_HOME/opt-enhanced/serving-autotune.json (XDG_CACHE_HOME
defaulting to ~/.cache). Writers take an exclusive lock on a sibling lock file, merge with what is on disk
and replace the file atomically, so concurrent processes neither lose entries nor read half a file.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


def cache_path() -> Path:
    explicit = os.environ.get("SERVING_AUTOTUNE_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "opt-enhanced" / "serving-autotune.json"


def make_key(**fields: Any) -> str:
    """A stable string of the fields (sorted, JSON): what the tuned configuration depends on."""
    return json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"))


class TuneCache:
    """The on-disk table, read once per process and re-read on a miss (another process may have tuned it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_path()
        self._entries: dict[str, dict[str, Any]] | None = None

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        if self._entries is None or key not in self._entries:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, key: str, config: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(self.path) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            entries[key] = config
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".serving-autotune-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        self._entries = entries
