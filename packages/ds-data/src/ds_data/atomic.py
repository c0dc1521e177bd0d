"""Atomic file writes: a temp file in the destination's directory, then ``os.replace``, so a reader
(or a crash) never sees half a file."""

from __future__ import annotations

import os
import tempfile


def temp_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    return tmp


class AtomicFile:
    """``with AtomicFile(path, "w") as f``: written to a temp file beside ``path``, renamed on success."""

    def __init__(self, path: str, mode: str = "w"):
        self.path, self.mode = path, mode
        self.tmp = temp_path(path)

    def __enter__(self):
        self._f = open(self.tmp, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8"}))
        return self._f

    def __exit__(self, exc_type, exc, tb):
        self._f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def write_atomic(path: str, data: str | bytes) -> None:
    with AtomicFile(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
